"""The non-linear 4-bit search shared by IQ4_NL and IQ4_XS: ggml-quants.c quantize_row_iq4_nl_impl.

Each 32-element block gets a scale d so that x ~= d * kvalues_iq4nl[L]; the 16 code values are non-uniform
(-127 ... 113). The reference tries the scale from the block's largest magnitude and 15 more (itry = -7..7,
inverse scale (itry - 127) / max), each a full pass rounding every element to the nearest code value
(best_index_int8, a binary search) and summing sum(w q x) and sum(w q q) in float32, and keeps the least-squares
scale of the best pass. IQ4_XS then quantizes the 8 block scales of a 256-superblock to 6 bits against one fp16
superscale and re-rounds every element with its block's quantized scale.

How it runs here, bit for bit but faster:
- best_index_int8 is a count of the midpoints between neighbouring code values that the value reaches: the
  reference returns the upper neighbour when ``x - v[k] < v[k+1] - x`` is false, i.e. (both subtractions being
  exact near a midpoint m, where the decision can turn) when x >= m. So q = kvalues[index] is -127 plus the step
  to each midpoint reached: 15 comparisons and masked adds that vectorise, no table look-up. A NaN (possible
  only in the final re-rounding, when a scale is NaN or 1/scale overflows) goes to index 15 as in the
  reference.
- the 16 passes are independent until the accept/reject step, so they run side by side as SIMD lanes, each
  lane summing element after element in the reference's order; accept/reject then runs in the reference's
  trial order.

    quantize_superblock(x, base, qw, qo, nsub, out, o, s): one IQ4_NL block (nsub 1) or IQ4_XS superblock
        (nsub 8) of x[base:], importance weights qw[qo:] (qw empty: none), bytes written at out[o:].
    make_scratch(): the scratch tuple a thread reuses.
    dequantize helpers: KVALUES (float32), best_index (exact, any float).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import F32, GROUP_MAX_EPS, U32, U64, nearest_int_c, put_fp16

KVALUES_I8 = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int32)
KVALUES = KVALUES_I8.astype(np.float32)
# midpoints between neighbouring code values (exact in float32) and the step up to the next value
MIDS = ((KVALUES_I8[:-1] + KVALUES_I8[1:]) / 2).astype(np.float32)
STEPS = (KVALUES_I8[1:] - KVALUES_I8[:-1]).astype(np.float32)
NTRY = 7
NL = 2 * NTRY + 2  # lanes: the first rounding, then itry = -7..7
QB = 32            # elements per scale block


@njit(cache=True, inline="always")
def best_index(v):
    """best_index_int8(16, kvalues_iq4nl, v) for any float32 v (NaN -> 15)."""
    c = 0
    for k in range(15):
        c += 1 if v >= MIDS[k] else 0
    return 15 if v != v else c


@njit(cache=True, inline="always")
def _code(al):
    """kvalues_iq4nl[best_index_int8(al)] as float32 for a finite al."""
    q = F32(-127.0)
    for k in range(15):
        q += STEPS[k] if al >= MIDS[k] else F32(0.0)
    return q


@njit(cache=True)
def make_scratch():
    return (np.empty(QB, np.float32),        # weight
            np.empty(NL, np.float32),        # inverse scales of the lanes
            np.empty(NL, np.float32),        # sum w q x per lane
            np.empty(NL, np.float32),        # sum w q q per lane
            np.empty(8, np.float32),         # block scales
            np.empty(256, np.int32))         # L


@njit(cache=True, inline="always", error_model="numpy")
def _block_scale(x, xo, weight, ids, sqx, sq2):
    """The search of one 32-block at x[xo:] with weights weight[0:32]: (scale, True), or (0, False) when the
    block's largest magnitude is below GROUP_MAX_EPS."""
    amax = F32(0.0)
    mx = F32(0.0)
    for j in range(QB):
        v = x[U64(xo + j)]
        if abs(v) > amax:
            amax = abs(v)
            mx = v
    if amax < GROUP_MAX_EPS:
        return F32(0.0), False
    d0 = F32(-mx / F32(-127.0))       # ntry > 0: -max / values[0]
    ids[0] = F32(1.0) / d0
    for t in range(1, NL):
        ids[t] = F32(t - 1 - NTRY - 127) / mx   # (itry + values[0]) / max
    for t in range(NL):
        sqx[t] = F32(0.0)
        sq2[t] = F32(0.0)
    for j in range(QB):
        xj = x[U64(xo + j)]
        w = weight[j]
        for t in range(NL):
            q = _code(F32(ids[t] * xj))
            wq = F32(w * q)
            sqx[t] = F32(sqx[t] + F32(wq * xj))
            sq2[t] = F32(sq2[t] + F32(wq * q))
    sumqx = sqx[0]
    sumq2 = sq2[0]
    d = F32(sumqx / sumq2) if sumq2 > 0 else F32(0.0)
    best = F32(d * sumqx)
    for t in range(1, NL):
        sumqx = sqx[t]
        sumq2 = sq2[t]
        if sumq2 > 0 and F32(sumqx * sumqx) > F32(best * sumq2):
            d = F32(sumqx / sumq2)
            best = F32(d * sumqx)
    return d, True


@njit(cache=True, inline="always", error_model="numpy")
def _round_block(x, xo, idl, L, lo):
    for j in range(QB):
        L[U64(lo + j)] = best_index(F32(idl * x[U64(xo + j)]))


@njit(cache=True, error_model="numpy")
def quantize_superblock(x, base, qw, qo, nsub, out, o, s):
    """quantize_row_iq4_nl_impl(super_block_size = 32 * nsub, block_size = 32, ntry = 7) as quantize_iq4_nl
    (nsub 1: block_iq4_nl, d + qs[16]) and quantize_iq4_xs (nsub 8: block_iq4_xs, d + scales_h + scales_l[4]
    + qs[128]) call it. qw.size == 0: no importance matrix (weights x*x)."""
    weight, ids, sqx, sq2, scales, L = s
    n = QB * nsub
    sigma2 = F32(0.0)
    for j in range(n):
        v = x[U64(base + j)]
        sigma2 = F32(sigma2 + F32(v * v))
    sigma2 = F32(sigma2 * F32(F32(2.0) / F32(n)))
    has_w = qw.size > 0
    max_scale = F32(0.0)
    amax_scale = F32(0.0)
    for ib in range(nsub):
        xo = base + QB * ib
        if has_w:
            for j in range(QB):
                v = x[U64(xo + j)]
                weight[j] = F32(qw[U64(qo + QB * ib + j)] * np.sqrt(F32(sigma2 + F32(v * v))))
        else:
            for j in range(QB):
                v = x[U64(xo + j)]
                weight[j] = F32(v * v)
        d, nonzero = _block_scale(x, xo, weight, ids, sqx, sq2)
        scales[ib] = d
        if not nonzero:
            continue
        if abs(d) > amax_scale:
            amax_scale = abs(d)
            max_scale = d
    if nsub > 1:
        # IQ4_XS: 6-bit block scales l - 32 against the fp16 superscale d = -max_scale / 32
        d = F32(-max_scale / F32(32.0))
        put_fp16(out, o, d)
        idd = F32(F32(1.0) / d) if d != F32(0.0) else F32(0.0)
        sh = U32(0)
        for ib in range(nsub):
            l = nearest_int_c(F32(idd * scales[ib]))
            l = max(-32, min(31, l))
            dl = F32(d * F32(l))
            idl = F32(F32(1.0) / dl) if dl != F32(0.0) else F32(0.0)
            _round_block(x, base + QB * ib, idl, L, QB * ib)
            l += 32
            if ib % 2 == 0:
                out[U64(o + 4 + ib // 2)] = np.uint8(l & 0xF)
            else:
                out[U64(o + 4 + ib // 2)] |= np.uint8((l & 0xF) << 4)
            sh |= U32(l >> 4) << U32(2 * ib)
        out[U64(o + 2)] = np.uint8(sh & U32(0xFF))
        out[U64(o + 3)] = np.uint8(sh >> U32(8))
        qs = o + 8
    else:
        # IQ4_NL: the block scale itself in fp16, elements re-rounded with it
        d = scales[0]
        put_fp16(out, o, d)
        idd = F32(F32(1.0) / d) if d != F32(0.0) else F32(0.0)
        _round_block(x, base, idd, L, 0)
        qs = o + 2
    for i in range(nsub):
        for j in range(16):
            out[U64(qs + 16 * i + j)] = np.uint8(L[U64(32 * i + j)] | (L[U64(32 * i + 16 + j)] << 4))

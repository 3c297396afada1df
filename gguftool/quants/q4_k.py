"""Q4_K: 256-element super-blocks of 8 sub-blocks x 32, 4-bit levels with a 6-bit scale and 6-bit min per
sub-block and fp16 super-scales. Byte-exact port of ggml-quants.c quantize_row_q4_K_ref / _impl.

Block layout (144 bytes): d (fp16), dmin (fp16), scales[12] (6-bit packed), qs[128] (two 4-bit levels each).

The type-module interface of registry.py (an empty imatrix selects the reference path, as llama.cpp's
quantize_q4_K does with a NULL imatrix).

The shared part of Q4_K and Q5_K (the sub-block searches and the 6-bit scale/min quantization, which only
differ by nmax and search parameters) is ``affine_k_scales_ref`` / ``affine_k_scales_impl``; Q5_K imports them.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from gguftool.gguf.constants import GGMLType
from gguftool.quants.bits import get_fp16, nearest_int_c, put_fp16, select_f32
from gguftool.quants.blocks import no_row_state
from gguftool.quants.k_scales import get_scale_min_k4, pack_scale_min_k4
from gguftool.quants.search_affine import SCRATCH_PER_ELEM, make_qp_quants

GGML_TYPE = GGMLType.Q4_K
USES_IMATRIX = True

QK_K = 256
BLOCK_BYTES = 144

# Lane workspace (float32, see _qkx_lanes): 3 planes of 32x8 (element-major, lane = sub-block) + 16 rows of 8.
_NW = 3 * QK_K + 16 * 8


@njit(cache=True, error_model="numpy")
def make_scratch():
    """Per-thread scratch: L[256], Laux[32], Ls[8], Lm[8] (uint8); weights[32], sw[8], mins[8], scales[8],
    fs[5*32] (the searches' float32 scratch), lane workspace[_NW] (float32)."""
    return (np.zeros(QK_K, np.uint8), np.zeros(32, np.uint8), np.zeros(8, np.uint8), np.zeros(8, np.uint8),
            np.zeros(32, np.float32), np.zeros(8, np.float32), np.zeros(8, np.float32), np.zeros(8, np.float32),
            np.zeros(SCRATCH_PER_ELEM * 32, np.float32), np.zeros(_NW, np.float32))


@njit(cache=True, inline="always", error_model="numpy")
def _levels(X, isc, mn, LA, nl, nmax):
    """LA[8*i + j] = clamp(nearest_int(isc[j] * (X[8*i + j] - mn[j])), 0, nmax) for every lane j (float32)."""
    for i in range(32):
        for j in range(nl):
            l = nearest_int_c(isc[np.uint64(j)] * (X[np.uint64(8 * i + j)] - mn[np.uint64(j)]))
            l = nmax if nmax < l else l
            l = 0 if 0 > l else l
            LA[np.uint64(8 * i + j)] = np.float32(l)


@njit(cache=True, inline="always", error_model="numpy")
def _qkx_lanes(x, ws, L, scales, mins, nmax, rmin, rdelta, nstep, le_check):
    """The 8 make_qkx2/3_quants(32, nmax, ...) searches of one super-block (squared error), side by side as
    SIMD lanes: the same scheme as q2_k._qkx_lanes (which see), for 8 sub-blocks of 32.

    Bit-identical with ``search_affine.qkx_search`` on each sub-block: lane j carries sub-block j through the
    reference's float32 operations, every sum accumulated element after element in the reference's order;
    branches become per-lane selects; steps whose levels repeat are evaluated too (equal errors never win
    under the strict <); the winning levels are rounded again at the end from the winning step's iscale and
    min. A flat sub-block (max == min, or max <= min for le_check) gets the reference's early result.

    ws: float32[_NW]: on entry plane 1 (ws[256:512], [8*i + j]) holds the weight of element i of sub-block j;
    plane 0 gets x transposed the same way. Writes L[256] (uint8, sub-block-major as x), scales[8] (the
    returned scales) and mins[8] (the returned the_min). nstep >= 1. Lane loops run to ``nl`` (8, but a run-time
    value) so that LLVM keeps them as loops and vectorises them."""
    nl = scales.size
    X = ws[0:256]
    W = ws[256:512]
    LA = ws[512:768]
    V = ws[768:896]
    mn = V[0:8]
    mx = V[8:16]
    sw = V[16:24]
    sx = V[24:32]
    scale = V[32:40]
    best = V[40:48]
    isc = V[48:56]
    sl = V[56:64]
    sl2 = V[64:72]
    sxl = V[72:80]
    ce = V[80:88]
    tsc = V[88:96]
    tmn = V[96:104]
    wisc = V[104:112]
    wmn = V[112:120]
    mn0 = V[120:128]
    rmin = np.float32(rmin)
    rdelta = np.float32(rdelta)
    fnmax = np.float32(nmax)
    zero = np.float32(0.0)
    for i in range(32):
        for j in range(nl):
            X[np.uint64(8 * i + j)] = x[np.uint64(32 * j + i)]
    for j in range(nl):
        v = X[np.uint64(j)]
        mn[np.uint64(j)] = v
        mx[np.uint64(j)] = v
        w = W[np.uint64(j)]
        sw[np.uint64(j)] = w
        sx[np.uint64(j)] = w * v
    for i in range(1, 32):
        for j in range(nl):
            xi = X[np.uint64(8 * i + j)]
            a = mn[np.uint64(j)]
            mn[np.uint64(j)] = select_f32(xi < a, xi, a)
            b = mx[np.uint64(j)]
            mx[np.uint64(j)] = select_f32(xi > b, xi, b)
            w = W[np.uint64(8 * i + j)]
            sw[np.uint64(j)] = sw[np.uint64(j)] + w
            sx[np.uint64(j)] = sx[np.uint64(j)] + w * xi
    for j in range(nl):
        a = mn[np.uint64(j)]
        a = select_f32(a > zero, zero, a)
        mn[np.uint64(j)] = a
        mn0[np.uint64(j)] = a
        c = fnmax / (mx[np.uint64(j)] - a)
        isc[np.uint64(j)] = c
        wisc[np.uint64(j)] = c
        wmn[np.uint64(j)] = a
        scale[np.uint64(j)] = np.float32(1.0) / c
        best[np.uint64(j)] = zero
    _levels(X, isc, mn, LA, nl, nmax)
    for i in range(32):
        for j in range(nl):
            diff = scale[np.uint64(j)] * LA[np.uint64(8 * i + j)] + mn[np.uint64(j)] - X[np.uint64(8 * i + j)]
            best[np.uint64(j)] = best[np.uint64(j)] + W[np.uint64(8 * i + j)] * (diff * diff)
    for istep in range(nstep + 1):
        num = rmin + rdelta * np.float32(istep) + fnmax
        for j in range(nl):
            isc[np.uint64(j)] = num / (mx[np.uint64(j)] - mn[np.uint64(j)])
            sl[np.uint64(j)] = zero
            sl2[np.uint64(j)] = zero
            sxl[np.uint64(j)] = zero
            ce[np.uint64(j)] = zero
        # (separate loops with few arrays each: LLVM vectorises them across the lanes)
        _levels(X, isc, mn, LA, nl, nmax)
        for i in range(32):
            for j in range(nl):
                fl = LA[np.uint64(8 * i + j)]
                wl = W[np.uint64(8 * i + j)] * fl
                sl[np.uint64(j)] = sl[np.uint64(j)] + wl
                sl2[np.uint64(j)] = sl2[np.uint64(j)] + wl * fl
        for i in range(32):
            for j in range(nl):
                k = np.uint64(8 * i + j)
                sxl[np.uint64(j)] = sxl[np.uint64(j)] + (W[k] * LA[k]) * X[k]
        for j in range(nl):
            a = sl[np.uint64(j)]
            b = sl2[np.uint64(j)]
            c = sxl[np.uint64(j)]
            sw_ = sw[np.uint64(j)]
            sx_ = sx[np.uint64(j)]
            D = sw_ * b - a * a
            ts = (sw_ * c - sx_ * a) / D
            tm = (b * sx_ - a * c) / D
            alt = c / b
            pos = tm > zero
            tsc[np.uint64(j)] = select_f32(pos, alt, ts)
            tmn[np.uint64(j)] = select_f32(pos, zero, tm)
        for i in range(32):
            for j in range(nl):
                k = np.uint64(8 * i + j)
                diff = tsc[np.uint64(j)] * LA[k] + tmn[np.uint64(j)] - X[k]
                ce[np.uint64(j)] = ce[np.uint64(j)] + W[k] * (diff * diff)
        for j in range(nl):
            a = sl[np.uint64(j)]
            D = sw[np.uint64(j)] * sl2[np.uint64(j)] - a * a
            c = ce[np.uint64(j)]
            upd = (D > zero) & (c < best[np.uint64(j)])
            m = mn[np.uint64(j)]
            best[np.uint64(j)] = select_f32(upd, c, best[np.uint64(j)])
            scale[np.uint64(j)] = select_f32(upd, tsc[np.uint64(j)], scale[np.uint64(j)])
            wisc[np.uint64(j)] = select_f32(upd, isc[np.uint64(j)], wisc[np.uint64(j)])
            wmn[np.uint64(j)] = select_f32(upd, m, wmn[np.uint64(j)])
            mn[np.uint64(j)] = select_f32(upd, tmn[np.uint64(j)], m)
    for j in range(8):
        a = mn0[j]
        b = mx[j]
        flat = (b <= a) if le_check else (b == a)
        if flat:
            scales[j] = zero
            mins[j] = -a
            for i in range(32):
                L[32 * j + i] = 0
        else:
            scales[j] = scale[j]
            mins[j] = -mn[j]
            c = wisc[j]
            m = wmn[j]
            for i in range(32):
                l = nearest_int_c(c * (x[32 * j + i] - m))
                l = nmax if nmax < l else l
                l = 0 if 0 > l else l
                L[32 * j + i] = l


@njit(cache=True, inline="always", error_model="numpy")
def _requantize(x, y, L, nmax):
    """Final pass shared by ref and impl: levels from the stored (fp16 / 6-bit) scales and mins."""
    dd = get_fp16(y, 0)
    dmm = get_fp16(y, 2)
    q = y[4:16]
    for j in range(8):
        sc, m = get_scale_min_k4(j, q)
        d = dd * np.float32(sc)
        if d == np.float32(0.0):
            continue
        dm = dmm * np.float32(m)
        for ii in range(32):
            l = nearest_int_c((x[32 * j + ii] + dm) / d)
            l = nmax if nmax < l else l
            l = 0 if 0 > l else l
            L[32 * j + ii] = l


@njit(cache=True, inline="always", error_model="numpy")
def affine_k_scales_ref(x, y, s, nmax, rmin, rdelta, nstep):
    """quantize_row_q{4,5}_K_ref up to the level packing: writes d, dmin, scales[12] into y[0:16], levels in L."""
    L, Laux, Ls, Lm, weights, sw, mins, scales, fs, ws = s
    max_scale = np.float32(0.0)
    max_min = np.float32(0.0)
    W = ws[256:512]
    for j in range(8):
        sum_x2 = np.float32(0.0)
        for l in range(32):
            sum_x2 += x[32 * j + l] * x[32 * j + l]
        av_x = np.float32(np.sqrt(sum_x2 / np.float32(32.0)))
        for l in range(32):
            W[8 * l + j] = av_x + abs(x[32 * j + l])
    # the 8 make_qkx2_quants(32, nmax, ..., rmin, rdelta, nstep, false) as lanes
    _qkx_lanes(x, ws, L, scales, mins, nmax, rmin, rdelta, nstep, False)
    for j in range(8):
        sc = scales[j]
        mn = mins[j]
        if sc > max_scale:
            max_scale = sc
        if mn > max_min:
            max_min = mn
    inv_scale = np.float32(63.0) / max_scale if max_scale > np.float32(0.0) else np.float32(0.0)
    inv_min = np.float32(63.0) / max_min if max_min > np.float32(0.0) else np.float32(0.0)
    q = y[4:16]
    for j in range(8):
        ls = nearest_int_c(inv_scale * scales[j]) & 0xFF
        lm = nearest_int_c(inv_min * mins[j]) & 0xFF
        ls = 63 if 63 < ls else ls
        lm = 63 if 63 < lm else lm
        pack_scale_min_k4(q, j, ls, lm)
    put_fp16(y, 0, max_scale / np.float32(63.0))
    put_fp16(y, 2, max_min / np.float32(63.0))
    _requantize(x, y, L, nmax)


@njit(cache=True, inline="always", error_model="numpy")
def affine_k_scales_impl(x, qw, y, s, nmax, clamp63):
    """quantize_row_q{4,5}_K_impl (with quant_weights) up to the level packing. clamp63: Q5_K's MIN(63, .)."""
    L, Laux, Ls, Lm, weights, sw, mins, scales, fs, ws = s
    sum_x2 = np.float32(0.0)
    for l in range(QK_K):
        sum_x2 += x[l] * x[l]
    sigma2 = np.float32(2.0) * sum_x2 / np.float32(256.0)
    W = ws[256:512]
    for j in range(8):
        sumw = np.float32(0.0)
        for l in range(32):
            w = qw[32 * j + l] * np.float32(np.sqrt(sigma2 + x[32 * j + l] * x[32 * j + l]))
            W[8 * l + j] = w
            sumw += w
        sw[j] = sumw
    # the 8 make_qkx3_quants(32, nmax, ..., -0.9f, 0.05f, 36, false) as lanes
    _qkx_lanes(x, ws, L, scales, mins, nmax, np.float32(-0.9), np.float32(0.05), 36, True)
    d_block = make_qp_quants(8, 63, scales, Ls, sw)
    m_block = make_qp_quants(8, 63, mins, Lm, sw)
    q = y[4:16]
    for j in range(8):
        ls = int(Ls[j])
        lm = int(Lm[j])
        if clamp63:
            ls = 63 if 63 < ls else ls
            lm = 63 if 63 < lm else lm
        pack_scale_min_k4(q, j, ls, lm)
    put_fp16(y, 0, d_block)
    put_fp16(y, 2, m_block)
    _requantize(x, y, L, nmax)


@njit(cache=True, inline="always", error_model="numpy")
def _pack_q4(y, L):
    for j in range(4):
        for l in range(32):
            y[16 + 32 * j + l] = L[64 * j + l] | (L[64 * j + l + 32] << 4)


@njit(cache=True, error_model="numpy")
def _quantize_block_ref(x, y, s):
    affine_k_scales_ref(x, y, s, 15, np.float32(-1.0), np.float32(0.1), 20)
    _pack_q4(y, s[0])


@njit(cache=True, error_model="numpy")
def _quantize_block_impl(x, qw, y, s):
    affine_k_scales_impl(x, qw, y, s, 15, False)
    _pack_q4(y, s[0])


prepare_row = no_row_state


@njit(cache=True, error_model="numpy")
def quantize_block(x, qw, y, s):
    """One block (the registry's convention): the importance path when qw is not empty, else the reference."""
    if qw.size > 0:
        _quantize_block_impl(x, qw, y, s)
    else:
        _quantize_block_ref(x, y, s)


@njit(cache=True, error_model="numpy")
def dequantize_block(y, out):
    d = get_fp16(y, 0)
    mn = get_fp16(y, 2)
    q = y[4:16]
    for j in range(4):
        sc, m = get_scale_min_k4(2 * j, q)
        d1 = d * np.float32(sc)
        m1 = mn * np.float32(m)
        sc, m = get_scale_min_k4(2 * j + 1, q)
        d2 = d * np.float32(sc)
        m2 = mn * np.float32(m)
        for l in range(32):
            out[64 * j + l] = d1 * np.float32(y[16 + 32 * j + l] & 0xF) - m1
        for l in range(32):
            out[64 * j + 32 + l] = d2 * np.float32(y[16 + 32 * j + l] >> 4) - m2


@njit(cache=True, parallel=True, error_model="numpy")
def quantize_rows(x, imatrix, out):
    nrows = x.shape[0]
    nb = x.shape[1] // QK_K
    use_imatrix = imatrix.size > 0
    for r in prange(nrows):
        s = make_scratch()
        for i in range(nb):
            xb = x[r, QK_K * i:QK_K * (i + 1)]
            yb = out[r, BLOCK_BYTES * i:BLOCK_BYTES * (i + 1)]
            if use_imatrix:
                _quantize_block_impl(xb, imatrix[QK_K * i:QK_K * (i + 1)], yb, s)
            else:
                _quantize_block_ref(xb, yb, s)


quantize_rows_screened = None  # no fused NaN/Inf screen: the API screens first (see registry)


@njit(cache=True, parallel=True, error_model="numpy")
def dequantize_rows(data, out):
    nrows = data.shape[0]
    nb = out.shape[1] // QK_K
    for r in prange(nrows):
        for i in range(nb):
            dequantize_block(data[r, BLOCK_BYTES * i:BLOCK_BYTES * (i + 1)], out[r, QK_K * i:QK_K * (i + 1)])

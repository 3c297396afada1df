"""Q2_K: 256-element super-blocks of 16 sub-blocks x 16, 2-bit levels with a 4-bit scale and 4-bit min per
sub-block and fp16 super-scales. Byte-exact port of ggml-quants.c quantize_row_q2_K_ref / _impl.

Block layout (84 bytes): scales[16] (low nibble scale, high nibble min), qs[64] (four 2-bit levels each),
d (fp16), dmin (fp16).

The type-module interface of registry.py (an empty imatrix selects the reference path, as llama.cpp's
quantize_q2_K does with a NULL imatrix).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from gguftool.gguf.constants import GGMLType
from gguftool.quants.bits import get_fp16, nearest_int_c, put_fp16, select_f32
from gguftool.quants.blocks import no_row_state
from gguftool.quants.search_affine import SCRATCH_PER_ELEM, make_qp_quants

GGML_TYPE = GGMLType.Q2_K
USES_IMATRIX = True

QK_K = 256
BLOCK_BYTES = 84
_OFF_QS = 16
_OFF_D = 80
_OFF_DMIN = 82


# Lane workspace (float32, see _qkx_lanes): 5 planes of 16x16 (element-major, lane = sub-block) + 16 rows of 16.
_NW = 5 * QK_K + 16 * 16


@njit(cache=True, error_model="numpy")
def make_scratch():
    """L[256], Laux[16], Ls[16], Lm[16] (uint8); weights[16], sw[16], mins[16], scales[16], fs[5*16],
    lane workspace[_NW] (float32)."""
    return (np.zeros(QK_K, np.uint8), np.zeros(16, np.uint8), np.zeros(16, np.uint8), np.zeros(16, np.uint8),
            np.zeros(16, np.float32), np.zeros(16, np.float32), np.zeros(16, np.float32), np.zeros(16, np.float32),
            np.zeros(SCRATCH_PER_ELEM * 16, np.float32), np.zeros(_NW, np.float32))


@njit(cache=True, inline="always", error_model="numpy")
def _levels(X, isc, mn, LA, nl):
    """LA[16*i + j] = clamp(nearest_int(isc[j] * (X[16*i + j] - mn[j])), 0, 3) for every lane j (as float32)."""
    for i in range(16):
        for j in range(nl):
            l = nearest_int_c(isc[np.uint64(j)] * (X[np.uint64(16 * i + j)] - mn[np.uint64(j)]))
            l = 3 if 3 < l else l
            l = 0 if 0 > l else l
            LA[np.uint64(16 * i + j)] = np.float32(l)


@njit(cache=True, inline="always", error_model="numpy")
def _qkx_lanes(x, ws, L, scales, mins, rmin, rdelta, nstep, use_mad, le_check):
    """The 16 make_qkx2/3_quants(16, 3, ...) searches of one super-block, side by side as SIMD lanes.

    Bit-identical with ``search_affine.qkx_search`` run on each sub-block: the sub-blocks' searches are
    independent, so lane j carries sub-block j through exactly the reference's float32 operations, every sum
    accumulated element after element in the reference's order; branches become per-lane selects. Steps whose
    levels repeat are evaluated too (their error equals one already compared, so under the strict < they
    never win, as in the reference). The winning levels are not copied at every improvement: the lane keeps
    the winning step's iscale and the min it rounded with, and the levels are rounded again from them at the
    end (the same float32 operations, so the same levels). A flat sub-block (max == min, or max <= min for
    le_check) gets the reference's early result (levels 0, scale 0, min -min).

    ws: float32[_NW]: on entry plane 1 (ws[256:512], [i*16 + j]) holds the weight of element i of sub-block j;
    plane 0 gets x transposed the same way. Writes L[256] (uint8, sub-block-major as x), scales[16], mins[16].
    Lane loops run to ``nl`` (16, but a run-time value) so that LLVM keeps them as loops and vectorises them."""
    nl = scales.size
    X = ws[0:256]
    W = ws[256:512]
    LA = ws[512:768]
    V = ws[1280:1536]
    mn = V[0:16]
    mx = V[16:32]
    sw = V[32:48]
    sx = V[48:64]
    scale = V[64:80]
    best = V[80:96]
    isc = V[96:112]
    sl = V[112:128]
    sl2 = V[128:144]
    sxl = V[144:160]
    ce = V[160:176]
    tsc = V[176:192]
    tmn = V[192:208]
    wisc = V[208:224]
    wmn = V[224:240]
    mn0 = V[240:256]
    rmin = np.float32(rmin)
    rdelta = np.float32(rdelta)
    fnmax = np.float32(3.0)
    zero = np.float32(0.0)
    for i in range(16):
        for j in range(nl):
            X[np.uint64(16 * i + j)] = x[np.uint64(16 * j + i)]
    for j in range(nl):
        v = X[np.uint64(j)]
        mn[np.uint64(j)] = v
        mx[np.uint64(j)] = v
        w = W[np.uint64(j)]
        sw[np.uint64(j)] = w
        sx[np.uint64(j)] = w * v
    for i in range(1, 16):
        for j in range(nl):
            xi = X[np.uint64(16 * i + j)]
            a = mn[np.uint64(j)]
            mn[np.uint64(j)] = select_f32(xi < a, xi, a)
            b = mx[np.uint64(j)]
            mx[np.uint64(j)] = select_f32(xi > b, xi, b)
            w = W[np.uint64(16 * i + j)]
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
    _levels(X, isc, mn, LA, nl)
    for i in range(16):
        for j in range(nl):
            diff = scale[np.uint64(j)] * LA[np.uint64(16 * i + j)] + mn[np.uint64(j)] - X[np.uint64(16 * i + j)]
            diff = abs(diff) if use_mad else diff * diff
            best[np.uint64(j)] = best[np.uint64(j)] + W[np.uint64(16 * i + j)] * diff
    for istep in range(nstep + 1):
        num = rmin + rdelta * np.float32(istep) + fnmax
        for j in range(nl):
            isc[np.uint64(j)] = num / (mx[np.uint64(j)] - mn[np.uint64(j)])
            sl[np.uint64(j)] = zero
            sl2[np.uint64(j)] = zero
            sxl[np.uint64(j)] = zero
            ce[np.uint64(j)] = zero
        # (separate loops with few arrays each: LLVM vectorises them across the lanes)
        _levels(X, isc, mn, LA, nl)
        for i in range(16):
            for j in range(nl):
                fl = LA[np.uint64(16 * i + j)]
                wl = W[np.uint64(16 * i + j)] * fl
                sl[np.uint64(j)] = sl[np.uint64(j)] + wl
                sl2[np.uint64(j)] = sl2[np.uint64(j)] + wl * fl
        for i in range(16):
            for j in range(nl):
                k = np.uint64(16 * i + j)
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
        for i in range(16):
            for j in range(nl):
                k = np.uint64(16 * i + j)
                diff = tsc[np.uint64(j)] * LA[k] + tmn[np.uint64(j)] - X[k]
                diff = abs(diff) if use_mad else diff * diff
                ce[np.uint64(j)] = ce[np.uint64(j)] + W[k] * diff
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
    for j in range(16):
        a = mn0[j]
        b = mx[j]
        flat = (b <= a) if le_check else (b == a)
        if flat:
            scales[j] = zero
            mins[j] = -a
            for i in range(16):
                L[16 * j + i] = 0
        else:
            scales[j] = scale[j]
            mins[j] = -mn[j]
            c = wisc[j]
            m = wmn[j]
            for i in range(16):
                l = nearest_int_c(c * (x[16 * j + i] - m))
                l = 3 if 3 < l else l
                l = 0 if 0 > l else l
                L[16 * j + i] = l


@njit(cache=True, inline="always", error_model="numpy")
def _requantize(x, y, L, dd, dmm):
    for j in range(16):
        sc = int(y[j])
        d = dd * np.float32(sc & 0xF)
        if d == np.float32(0.0):
            continue
        m = dmm * np.float32(sc >> 4)
        for ii in range(16):
            l = nearest_int_c((x[16 * j + ii] + m) / d)
            l = 3 if 3 < l else l
            l = 0 if 0 > l else l
            L[16 * j + ii] = l


@njit(cache=True, inline="always", error_model="numpy")
def _pack_q2(y, L):
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            y[_OFF_QS + 32 * h + l] = (int(L[b]) | (int(L[b + 32]) << 2) | (int(L[b + 64]) << 4)
                                       | (int(L[b + 96]) << 6)) & 0xFF


@njit(cache=True, error_model="numpy")
def _quantize_block_ref(x, y, s):
    L, Laux, Ls, Lm, weights, sw, mins, scales, fs, ws = s
    q4scale = np.float32(15.0)
    for j in range(16):
        for l in range(16):
            ws[256 + 16 * l + j] = abs(x[16 * j + l])
    _qkx_lanes(x, ws, L, scales, mins, np.float32(-0.5), np.float32(0.1), 15, True, False)
    max_scale = np.float32(0.0)
    max_min = np.float32(0.0)
    for j in range(16):
        sc = scales[j]
        mn = mins[j]
        if sc > max_scale:
            max_scale = sc
        if mn > max_min:
            max_min = mn
    if max_scale > np.float32(0.0):
        iscale = q4scale / max_scale
        for j in range(16):
            y[j] = nearest_int_c(iscale * scales[j]) & 0xFF
        put_fp16(y, _OFF_D, max_scale / q4scale)
    else:
        for j in range(16):
            y[j] = 0
        put_fp16(y, _OFF_D, np.float32(0.0))
    if max_min > np.float32(0.0):
        iscale = q4scale / max_min
        for j in range(16):
            l = nearest_int_c(iscale * mins[j])
            y[j] = (int(y[j]) | (l << 4)) & 0xFF
        put_fp16(y, _OFF_DMIN, max_min / q4scale)
    else:
        put_fp16(y, _OFF_DMIN, np.float32(0.0))
    _requantize(x, y, L, get_fp16(y, _OFF_D), get_fp16(y, _OFF_DMIN))
    _pack_q2(y, L)


@njit(cache=True, error_model="numpy")
def _quantize_block_impl(x, qw, y, s):
    L, Laux, Ls, Lm, weight, sw, mins, scales, fs, ws = s
    sumx2 = np.float32(0.0)
    for j in range(QK_K):
        sumx2 += x[j] * x[j]
    sigma2 = sumx2 / np.float32(256.0)
    for j in range(16):
        acc = np.float32(0.0)
        for l in range(16):
            w = qw[16 * j + l] * np.float32(np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]))
            ws[256 + 16 * l + j] = w
            acc += w
        sw[j] = acc
    _qkx_lanes(x, ws, L, scales, mins, np.float32(-0.9), np.float32(0.05), 36, False, True)
    dm = make_qp_quants(16, 15, scales, Ls, sw)
    mm = make_qp_quants(16, 15, mins, Lm, sw)
    put_fp16(y, _OFF_D, dm)
    put_fp16(y, _OFF_DMIN, mm)
    for j in range(16):
        y[j] = (int(Ls[j]) | (int(Lm[j]) << 4)) & 0xFF
    _requantize(x, y, L, get_fp16(y, _OFF_D), get_fp16(y, _OFF_DMIN))
    _pack_q2(y, L)


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
    d = get_fp16(y, _OFF_D)
    mn = get_fp16(y, _OFF_DMIN)
    idx = 0
    isc = 0
    for h in range(2):
        qo = _OFF_QS + 32 * h
        for shift in range(0, 8, 2):
            for half in range(2):
                sc = int(y[isc])
                isc += 1
                dl = d * np.float32(sc & 0xF)
                ml = mn * np.float32(sc >> 4)
                for l in range(16):
                    out[idx] = dl * np.float32((int(y[qo + 16 * half + l]) >> shift) & 3) - ml
                    idx += 1


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

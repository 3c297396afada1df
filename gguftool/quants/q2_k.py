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
from gguftool.quants.bits import get_fp16, nearest_int_c, put_fp16
from gguftool.quants.blocks import no_row_state
from gguftool.quants.search_affine import SCRATCH_PER_ELEM, make_qp_quants
from gguftool.quants.search_lanes import qkx_lanes, qkx_workspace

GGML_TYPE = GGMLType.Q2_K
USES_IMATRIX = True

QK_K = 256
BLOCK_BYTES = 84
_OFF_QS = 16
_OFF_D = 80
_OFF_DMIN = 82


# Lane workspace (float32, see search_lanes.qkx_lanes): 16 lanes (sub-blocks) of 16 elements.
_NW = qkx_workspace(16, 16)


@njit(cache=True, error_model="numpy")
def make_scratch():
    """L[256], Laux[16], Ls[16], Lm[16] (uint8); weights[16], sw[16], mins[16], scales[16], fs[5*16],
    lane workspace[_NW] (float32)."""
    return (np.zeros(QK_K, np.uint8), np.zeros(16, np.uint8), np.zeros(16, np.uint8), np.zeros(16, np.uint8),
            np.zeros(16, np.float32), np.zeros(16, np.float32), np.zeros(16, np.float32), np.zeros(16, np.float32),
            np.zeros(SCRATCH_PER_ELEM * 16, np.float32), np.zeros(_NW, np.float32))


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
    qkx_lanes(x, ws, L, scales, mins, 16, 16, 3, np.float32(-0.5), np.float32(0.1), 15, True, False)
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
    qkx_lanes(x, ws, L, scales, mins, 16, 16, 3, np.float32(-0.9), np.float32(0.05), 36, False, True)
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

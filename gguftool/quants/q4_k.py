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
from gguftool.quants.bits import get_fp16, nearest_int_c, put_fp16
from gguftool.quants.blocks import no_row_state
from gguftool.quants.k_scales import get_scale_min_k4, pack_scale_min_k4
from gguftool.quants.search_affine import SCRATCH_PER_ELEM, make_qp_quants
from gguftool.quants.search_lanes import qkx_lanes, qkx_workspace

GGML_TYPE = GGMLType.Q4_K
USES_IMATRIX = True

QK_K = 256
BLOCK_BYTES = 144

# Lane workspace (float32, see search_lanes.qkx_lanes): 8 lanes (sub-blocks) of 32 elements.
_NW = qkx_workspace(32, 8)


@njit(cache=True, error_model="numpy")
def make_scratch():
    """Per-thread scratch: L[256], Laux[32], Ls[8], Lm[8] (uint8); weights[32], sw[8], mins[8], scales[8],
    fs[5*32] (the searches' float32 scratch), lane workspace[_NW] (float32)."""
    return (np.zeros(QK_K, np.uint8), np.zeros(32, np.uint8), np.zeros(8, np.uint8), np.zeros(8, np.uint8),
            np.zeros(32, np.float32), np.zeros(8, np.float32), np.zeros(8, np.float32), np.zeros(8, np.float32),
            np.zeros(SCRATCH_PER_ELEM * 32, np.float32), np.zeros(_NW, np.float32))


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
    qkx_lanes(x, ws, L, scales, mins, 32, 8, nmax, rmin, rdelta, nstep, False, False)
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
    qkx_lanes(x, ws, L, scales, mins, 32, 8, nmax, np.float32(-0.9), np.float32(0.05), 36, False, True)
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

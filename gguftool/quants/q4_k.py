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

# Lane workspace (float32, see search_lanes.qkx_lanes): 16 lanes = the 8 sub-blocks of 32 of two super-blocks,
# searched together (a 16-lane loop runs as two AVX2 vectors in one iteration; 8 lanes ran as two 4-wide
# remainder iterations, 1.6x the time per super-block). Lanes are independent, so the bytes do not change.
LANES = 16
_NW = qkx_workspace(32, LANES)


@njit(cache=True, error_model="numpy")
def make_scratch():
    """Per-thread scratch for up to two super-blocks: L[512], Laux[32], Ls[8], Lm[8] (uint8); weights[32],
    sw[16], mins[16], scales[16], fs[5*32] (the searches' float32 scratch), lane workspace[_NW] (float32)."""
    return (np.zeros(2 * QK_K, np.uint8), np.zeros(32, np.uint8), np.zeros(8, np.uint8), np.zeros(8, np.uint8),
            np.zeros(32, np.float32), np.zeros(16, np.float32), np.zeros(16, np.float32), np.zeros(16, np.float32),
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
def _finish_ref(x, y, L, scales, mins, nmax):
    """One super-block of quantize_row_q{4,5}_K_ref after its 8 searches: the 6-bit scales and mins, d, dmin."""
    max_scale = np.float32(0.0)
    max_min = np.float32(0.0)
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
def affine_k_scales_ref(x, y, s, nmax, rmin, rdelta, nstep, bb):
    """quantize_row_q{4,5}_K_ref up to the level packing for the nblk = x.size // 256 (1 or 2) super-blocks in
    x: writes d, dmin, scales[12] into y[bb*b:bb*b+16] (bb: the type's block bytes), levels in L[256*b:]."""
    L, Laux, Ls, Lm, weights, sw, mins, scales, fs, ws = s
    nblk = x.size // QK_K
    P = 32 * LANES
    W = ws[P:2 * P]
    for j in range(8 * nblk):
        sum_x2 = np.float32(0.0)
        for l in range(32):
            sum_x2 += x[32 * j + l] * x[32 * j + l]
        av_x = np.float32(np.sqrt(sum_x2 / np.float32(32.0)))
        for l in range(32):
            W[LANES * l + j] = av_x + abs(x[32 * j + l])
    # the 8 * nblk make_qkx2_quants(32, nmax, ..., rmin, rdelta, nstep, false) as lanes
    qkx_lanes(x, ws, L, scales[:8 * nblk], mins[:8 * nblk], 32, LANES, nmax, rmin, rdelta, nstep, False, False)
    for b in range(nblk):
        _finish_ref(x[QK_K * b:QK_K * (b + 1)], y[bb * b:bb * (b + 1)], L[QK_K * b:QK_K * (b + 1)],
                    scales[8 * b:8 * b + 8], mins[8 * b:8 * b + 8], nmax)


@njit(cache=True, inline="always", error_model="numpy")
def affine_k_scales_impl(x, qw, y, s, nmax, clamp63, bb):
    """quantize_row_q{4,5}_K_impl (with quant_weights) up to the level packing, for the 1 or 2 super-blocks in
    x as affine_k_scales_ref (qw: their importances). clamp63: Q5_K's MIN(63, .)."""
    L, Laux, Ls, Lm, weights, sw, mins, scales, fs, ws = s
    nblk = x.size // QK_K
    P = 32 * LANES
    W = ws[P:2 * P]
    for b in range(nblk):
        sum_x2 = np.float32(0.0)
        for l in range(QK_K):
            sum_x2 += x[QK_K * b + l] * x[QK_K * b + l]
        sigma2 = np.float32(2.0) * sum_x2 / np.float32(256.0)
        for j in range(8 * b, 8 * b + 8):
            sumw = np.float32(0.0)
            for l in range(32):
                w = qw[32 * j + l] * np.float32(np.sqrt(sigma2 + x[32 * j + l] * x[32 * j + l]))
                W[LANES * l + j] = w
                sumw += w
            sw[j] = sumw
    # the 8 * nblk make_qkx3_quants(32, nmax, ..., -0.9f, 0.05f, 36, false) as lanes
    qkx_lanes(x, ws, L, scales[:8 * nblk], mins[:8 * nblk], 32, LANES, nmax, np.float32(-0.9), np.float32(0.05),
              36, False, True)
    for b in range(nblk):
        yb = y[bb * b:bb * (b + 1)]
        d_block = make_qp_quants(8, 63, scales[8 * b:8 * b + 8], Ls, sw[8 * b:8 * b + 8])
        m_block = make_qp_quants(8, 63, mins[8 * b:8 * b + 8], Lm, sw[8 * b:8 * b + 8])
        q = yb[4:16]
        for j in range(8):
            ls = int(Ls[j])
            lm = int(Lm[j])
            if clamp63:
                ls = 63 if 63 < ls else ls
                lm = 63 if 63 < lm else lm
            pack_scale_min_k4(q, j, ls, lm)
        put_fp16(yb, 0, d_block)
        put_fp16(yb, 2, m_block)
        _requantize(x[QK_K * b:QK_K * (b + 1)], yb, L[QK_K * b:QK_K * (b + 1)], nmax)


@njit(cache=True, inline="always", error_model="numpy")
def _pack_q4(y, L):
    for j in range(4):
        for l in range(32):
            y[16 + 32 * j + l] = L[64 * j + l] | (L[64 * j + l + 32] << 4)


@njit(cache=True, error_model="numpy")
def _quantize_blocks_ref(x, y, s):
    """The 1 or 2 super-blocks in x into y."""
    affine_k_scales_ref(x, y, s, 15, np.float32(-1.0), np.float32(0.1), 20, BLOCK_BYTES)
    for b in range(x.size // QK_K):
        _pack_q4(y[BLOCK_BYTES * b:BLOCK_BYTES * (b + 1)], s[0][QK_K * b:QK_K * (b + 1)])


@njit(cache=True, error_model="numpy")
def _quantize_blocks_impl(x, qw, y, s):
    affine_k_scales_impl(x, qw, y, s, 15, False, BLOCK_BYTES)
    for b in range(x.size // QK_K):
        _pack_q4(y[BLOCK_BYTES * b:BLOCK_BYTES * (b + 1)], s[0][QK_K * b:QK_K * (b + 1)])


prepare_row = no_row_state


@njit(cache=True, error_model="numpy")
def quantize_block(x, qw, y, s):
    """One block (the registry's convention): the importance path when qw is not empty, else the reference."""
    if qw.size > 0:
        _quantize_blocks_impl(x, qw, y, s)
    else:
        _quantize_blocks_ref(x, y, s)


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
        for i in range(0, nb, 2):  # two super-blocks at a time (the last alone when nb is odd)
            e = min(i + 2, nb)
            xb = x[r, QK_K * i:QK_K * e]
            yb = out[r, BLOCK_BYTES * i:BLOCK_BYTES * e]
            if use_imatrix:
                _quantize_blocks_impl(xb, imatrix[QK_K * i:QK_K * e], yb, s)
            else:
                _quantize_blocks_ref(xb, yb, s)


quantize_rows_screened = None  # no fused NaN/Inf screen: the API screens first (see registry)


@njit(cache=True, parallel=True, error_model="numpy")
def dequantize_rows(data, out):
    nrows = data.shape[0]
    nb = out.shape[1] // QK_K
    for r in prange(nrows):
        for i in range(nb):
            dequantize_block(data[r, BLOCK_BYTES * i:BLOCK_BYTES * (i + 1)], out[r, QK_K * i:QK_K * (i + 1)])

"""Q5_K: 256-element super-blocks of 8 sub-blocks x 32, 5-bit levels with a 6-bit scale and 6-bit min per
sub-block and fp16 super-scales. Byte-exact port of ggml-quants.c quantize_row_q5_K_ref / _impl.

Block layout (176 bytes): d (fp16), dmin (fp16), scales[12] (6-bit packed), qh[32] (high bits), qs[128]
(low 4 bits, two levels each).

The type-module interface of registry.py; the scratch and the scale search are Q4_K's
(``q4_k.make_scratch``, ``q4_k.affine_k_scales_ref`` / ``affine_k_scales_impl``).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from gguftool.gguf.constants import GGMLType
from gguftool.quants.bits import get_fp16
from gguftool.quants.blocks import no_row_state
from gguftool.quants.k_scales import get_scale_min_k4
from gguftool.quants.q4_k import affine_k_scales_impl, affine_k_scales_ref, make_scratch

GGML_TYPE = GGMLType.Q5_K
USES_IMATRIX = True

QK_K = 256
BLOCK_BYTES = 176


@njit(cache=True, inline="always", error_model="numpy")
def _pack_q5(y, L):
    for j in range(32):
        y[16 + j] = 0
    m1 = 1
    m2 = 2
    for n in range(4):
        for j in range(32):
            l1 = int(L[64 * n + j])
            if l1 > 15:
                l1 -= 16
                y[16 + j] |= m1
            l2 = int(L[64 * n + j + 32])
            if l2 > 15:
                l2 -= 16
                y[16 + j] |= m2
            y[48 + 32 * n + j] = (l1 | (l2 << 4)) & 0xFF
        m1 <<= 2
        m2 <<= 2


@njit(cache=True, error_model="numpy")
def _quantize_blocks_ref(x, y, s):
    """The 1 or 2 super-blocks in x into y (two share one 16-lane search, see q4_k.LANES)."""
    affine_k_scales_ref(x, y, s, 31, np.float32(-0.5), np.float32(0.1), 15, BLOCK_BYTES)
    for b in range(x.size // QK_K):
        _pack_q5(y[BLOCK_BYTES * b:BLOCK_BYTES * (b + 1)], s[0][QK_K * b:QK_K * (b + 1)])


@njit(cache=True, error_model="numpy")
def _quantize_blocks_impl(x, qw, y, s):
    affine_k_scales_impl(x, qw, y, s, 31, True, BLOCK_BYTES)
    for b in range(x.size // QK_K):
        _pack_q5(y[BLOCK_BYTES * b:BLOCK_BYTES * (b + 1)], s[0][QK_K * b:QK_K * (b + 1)])


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
    u1 = 1
    u2 = 2
    for j in range(4):
        sc, m = get_scale_min_k4(2 * j, q)
        d1 = d * np.float32(sc)
        m1 = mn * np.float32(m)
        sc, m = get_scale_min_k4(2 * j + 1, q)
        d2 = d * np.float32(sc)
        m2 = mn * np.float32(m)
        for l in range(32):
            ql = int(y[48 + 32 * j + l])
            qh = int(y[16 + l])
            out[64 * j + l] = d1 * np.float32((ql & 0xF) + (16 if qh & u1 else 0)) - m1
        for l in range(32):
            ql = int(y[48 + 32 * j + l])
            qh = int(y[16 + l])
            out[64 * j + 32 + l] = d2 * np.float32((ql >> 4) + (16 if qh & u2 else 0)) - m2
        u1 <<= 2
        u2 <<= 2


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

"""Q5_1: blocks of 32 weights as 5-bit unsigned levels with an fp16 scale and an fp16 minimum (24 bytes).

Mirrors quantize_row_q5_1_ref (no imatrix), quantize_row_q5_1_impl (imatrix: importance-weighted
make_qkx3_quants search) and dequantize_row_q5_1 of ggml-quants.c.

Block layout (ggml-common.h block_q5_1):
    d   fp16       bytes 0..1    scale
    m   fp16       bytes 2..3    minimum; x ~= d * q + m
    qh  u32 (LE)   bytes 4..7    bit j: 5th bit of element j (j < 16 low half, j + 16 high half)
    qs  u8[16]     bytes 8..23   low nibble: element j, high nibble: element j + 16 (low 4 bits each)
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .legacy import F32, QK, block_weights, c_uint8, get_fp16, get_u32, put_fp16, put_u32, row_sigma2
from .search_affine import make_qkx3_quants

GGML_TYPE = GGMLType.Q5_1
USES_IMATRIX = True
BLOCK_BYTES = 24
FLT_MAX = np.float32(3.4028234663852886e38)


# --- per block
@njit(cache=True, error_model="numpy")
def quantize_block_ref(x, off, out, o):
    """quantize_row_q5_1_ref for one block (note: no MIN(31, ...) clamp in the reference)."""
    mn = FLT_MAX
    mx = -FLT_MAX
    for j in range(QK):
        v = x[off + j]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    d = (mx - mn) / F32(31.0)
    idd = F32(1.0) / d if d != 0 else F32(0.0)
    put_fp16(out, o, d)
    put_fp16(out, o + 2, mn)
    qh = 0
    for j in range(QK // 2):
        x0 = (x[off + j] - mn) * idd
        x1 = (x[off + QK // 2 + j] - mn) * idd
        xi0 = c_uint8(x0 + F32(0.5))
        xi1 = c_uint8(x1 + F32(0.5))
        out[o + 8 + j] = ((xi0 & 0x0F) | ((xi1 & 0x0F) << 4)) & 0xFF
        qh |= ((xi0 & 0x10) >> 4) << j
        qh |= ((xi1 & 0x10) >> 4) << (j + QK // 2)
    put_u32(out, o + 4, qh)


@njit(cache=True, error_model="numpy")
def quantize_block_impl(x, off, qw, sigma2, weight, L, Laux, out, o):
    """One block of quantize_row_q5_1_impl: make_qkx3_quants(32, 31, -0.9, 0.05, 36 steps, squared error)."""
    block_weights(x, qw, off, sigma2, weight)
    d, the_min = make_qkx3_quants(QK, 31, x[off:off + QK], weight, L, Laux, -0.9, 0.05, 36, False)
    put_fp16(out, o, d)
    put_fp16(out, o + 2, -the_min)
    qh = 0
    for j in range(QK // 2):
        xi0 = np.int32(L[j])
        xi1 = np.int32(L[j + 16])
        out[o + 8 + j] = ((xi0 & 0x0F) | ((xi1 & 0x0F) << 4)) & 0xFF
        qh |= ((xi0 & 0x10) >> 4) << j
        qh |= ((xi1 & 0x10) >> 4) << (j + QK // 2)
    put_u32(out, o + 4, qh)


@njit(cache=True, error_model="numpy")
def dequantize_block(data, o, y, off):
    d = get_fp16(data, o)
    m = get_fp16(data, o + 2)
    qh = np.int64(get_u32(data, o + 4))
    for j in range(QK // 2):
        q = np.int32(data[o + 8 + j])
        xh0 = ((qh >> j) << 4) & 0x10
        xh1 = (qh >> (j + 12)) & 0x10
        y[off + j] = F32((q & 0x0F) | xh0) * d + m
        y[off + j + QK // 2] = F32((q >> 4) | xh1) * d + m


# --- row drivers
@njit(cache=True, parallel=True, error_model="numpy")
def quantize_rows(x, imatrix, out):
    nb = x.shape[1] // QK
    use_w = imatrix.size > 0
    for r in prange(x.shape[0]):
        xr = x[r]
        orow = out[r]
        if use_w:
            weight = np.empty(QK, np.float32)
            L = np.empty(QK, np.uint8)
            Laux = np.empty(QK, np.uint8)
            sigma2 = row_sigma2(xr)
            for b in range(nb):
                quantize_block_impl(xr, b * QK, imatrix, sigma2, weight, L, Laux, orow, b * BLOCK_BYTES)
        else:
            for b in range(nb):
                quantize_block_ref(xr, b * QK, orow, b * BLOCK_BYTES)


@njit(cache=True, parallel=True, error_model="numpy")
def dequantize_rows(data, out):
    nb = out.shape[1] // QK
    for r in prange(out.shape[0]):
        dr = data[r]
        yr = out[r]
        for b in range(nb):
            dequantize_block(dr, b * BLOCK_BYTES, yr, b * QK)

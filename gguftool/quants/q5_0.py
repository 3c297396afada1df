"""Q5_0: blocks of 32 weights as 5-bit signed levels with one fp16 scale (22 bytes).

Mirrors quantize_row_q5_0_ref (no imatrix), quantize_row_q5_0_impl (imatrix: importance-weighted
make_qx_quants search) and dequantize_row_q5_0 of ggml-quants.c.

Block layout (ggml-common.h block_q5_0):
    d   fp16       bytes 0..1    scale; x ~= d * (q - 16)
    qh  u32 (LE)   bytes 2..5    bit j: 5th bit of element j (j < 16 low half, j + 16 high half)
    qs  u8[16]     bytes 6..21   low nibble: element j, high nibble: element j + 16 (low 4 bits each)
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .legacy import F32, QK, block_weights, c_int8, get_fp16, get_u32, put_fp16, put_u32, row_sigma2
from .search_symmetric import make_qx_quants

GGML_TYPE = GGMLType.Q5_0
USES_IMATRIX = True
BLOCK_BYTES = 22


# --- per block
@njit(cache=True, error_model="numpy")
def quantize_block_ref(x, off, out, o):
    """quantize_row_q5_0_ref for one block."""
    amax = F32(0.0)
    mx = F32(0.0)
    for j in range(QK):
        v = x[off + j]
        if amax < abs(v):
            amax = abs(v)
            mx = v
    d = mx / F32(-16.0)
    idd = F32(1.0) / d if d != 0 else F32(0.0)
    put_fp16(out, o, d)
    qh = 0
    for j in range(QK // 2):
        x0 = x[off + j] * idd
        x1 = x[off + QK // 2 + j] * idd
        xi0 = c_int8(x0 + F32(16.5))
        xi1 = c_int8(x1 + F32(16.5))
        xi0 = (31 if 31 < xi0 else xi0) & 0xFF  # (uint8_t) MIN(31, (int8_t)...)
        xi1 = (31 if 31 < xi1 else xi1) & 0xFF
        out[o + 6 + j] = ((xi0 & 0x0F) | ((xi1 & 0x0F) << 4)) & 0xFF
        qh |= ((xi0 & 0x10) >> 4) << j
        qh |= ((xi1 & 0x10) >> 4) << (j + QK // 2)
    put_u32(out, o + 2, qh)


@njit(cache=True, error_model="numpy")
def quantize_block_impl(x, off, qw, sigma2, weight, L, out, o):
    """One block of quantize_row_q5_0_impl: weights qw*sqrt(sigma2 + x^2), make_qx_quants(32, 16, rmse 1)."""
    block_weights(x, qw, off, sigma2, weight)
    d = make_qx_quants(QK, 16, x[off:off + QK], L, 1, weight)
    put_fp16(out, o, d)
    qh = 0
    for j in range(QK // 2):
        xi0 = np.int32(L[j]) & 0xFF
        xi1 = np.int32(L[j + 16]) & 0xFF
        out[o + 6 + j] = ((xi0 & 0x0F) | ((xi1 & 0x0F) << 4)) & 0xFF
        qh |= ((xi0 & 0x10) >> 4) << j
        qh |= ((xi1 & 0x10) >> 4) << (j + QK // 2)
    put_u32(out, o + 2, qh)


@njit(cache=True, error_model="numpy")
def dequantize_block(data, o, y, off):
    d = get_fp16(data, o)
    qh = np.int64(get_u32(data, o + 2))
    for j in range(QK // 2):
        q = np.int32(data[o + 6 + j])
        xh0 = ((qh >> j) << 4) & 0x10
        xh1 = (qh >> (j + 12)) & 0x10
        y[off + j] = F32(((q & 0x0F) | xh0) - 16) * d
        y[off + j + QK // 2] = F32(((q >> 4) | xh1) - 16) * d


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
            L = np.empty(QK, np.int8)
            sigma2 = row_sigma2(xr)
            for b in range(nb):
                quantize_block_impl(xr, b * QK, imatrix, sigma2, weight, L, orow, b * BLOCK_BYTES)
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

"""Q4_0: blocks of 32 weights as 4-bit signed levels with one fp16 scale (18 bytes).

Mirrors quantize_row_q4_0_ref (no imatrix), quantize_row_q4_0_impl (imatrix: importance-weighted
make_qx_quants search) and dequantize_row_q4_0 of ggml-quants.c.

Block layout (ggml-common.h block_q4_0):
    d   fp16       bytes 0..1    scale; x ~= d * (q - 8)
    qs  u8[16]     bytes 2..17   low nibble: element j, high nibble: element j + 16
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .legacy import F32, QK, block_weights, c_int8, get_fp16, put_fp16, row_sigma2
from .search_symmetric import make_qx_quants

GGML_TYPE = GGMLType.Q4_0
USES_IMATRIX = True
BLOCK_BYTES = 18


# --- per block
@njit(cache=True, error_model="numpy")
def quantize_block_ref(x, off, out, o):
    """quantize_row_q4_0_ref for one block."""
    amax = F32(0.0)
    mx = F32(0.0)
    for j in range(QK):
        v = x[off + j]
        if amax < abs(v):
            amax = abs(v)
            mx = v
    d = mx / F32(-8.0)
    idd = F32(1.0) / d if d != 0 else F32(0.0)
    put_fp16(out, o, d)
    for j in range(QK // 2):
        x0 = x[off + j] * idd
        x1 = x[off + QK // 2 + j] * idd
        xi0 = c_int8(x0 + F32(8.5))
        xi1 = c_int8(x1 + F32(8.5))
        xi0 = 15 if 15 < xi0 else xi0  # MIN(15, (int8_t)...)
        xi1 = 15 if 15 < xi1 else xi1
        out[o + 2 + j] = ((xi0 & 0xFF) | ((xi1 & 0xFF) << 4)) & 0xFF


@njit(cache=True, error_model="numpy")
def quantize_block_impl(x, off, qw, sigma2, weight, L, out, o):
    """One block of quantize_row_q4_0_impl: weights qw*sqrt(sigma2 + x^2), make_qx_quants(32, 8, rmse 1)."""
    block_weights(x, qw, off, sigma2, weight)
    d = make_qx_quants(QK, 8, x[off:off + QK], L, 1, weight)
    put_fp16(out, o, d)
    for j in range(QK // 2):
        out[o + 2 + j] = (np.int32(L[j]) | (np.int32(L[j + 16]) << 4)) & 0xFF


@njit(cache=True, error_model="numpy")
def dequantize_block(data, o, y, off):
    d = get_fp16(data, o)
    for j in range(QK // 2):
        q = np.int32(data[o + 2 + j])
        y[off + j] = F32((q & 0x0F) - 8) * d
        y[off + j + QK // 2] = F32((q >> 4) - 8) * d


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

"""Q8_0: blocks of 32 weights as int8 with one fp16 scale (34 bytes).

Mirrors quantize_row_q8_0_ref / dequantize_row_q8_0 of ggml-quants.c. llama.cpp's quantize_q8_0 ignores the
importance matrix, so there is only the reference path.

Block layout (ggml-common.h block_q8_0):
    d   fp16        bytes 0..1   scale = amax / 127
    qs  int8[32]    bytes 2..33  round(x / d), halfway cases away from zero
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .legacy import F32, QK, c_int8, get_fp16, put_fp16, roundf

GGML_TYPE = GGMLType.Q8_0
USES_IMATRIX = False
BLOCK_BYTES = 34


# --- per block
@njit(cache=True, error_model="numpy")
def quantize_block(x, off, out, o):
    amax = F32(0.0)
    for j in range(QK):
        a = abs(x[off + j])
        amax = amax if amax > a else a  # MAX(amax, fabsf(v))
    d = amax / F32(127.0)
    idd = F32(1.0) / d if d != 0 else F32(0.0)
    put_fp16(out, o, d)
    for j in range(QK):
        out[o + 2 + j] = c_int8(roundf(x[off + j] * idd)) & 0xFF


@njit(cache=True, error_model="numpy")
def dequantize_block(data, o, y, off):
    d = get_fp16(data, o)
    for j in range(QK):
        q = np.int32(data[o + 2 + j])
        if q >= 128:
            q -= 256
        y[off + j] = F32(q) * d


# --- row drivers
@njit(cache=True, parallel=True, error_model="numpy")
def quantize_rows(x, imatrix, out):
    nb = x.shape[1] // QK
    for r in prange(x.shape[0]):
        xr = x[r]
        orow = out[r]
        for b in range(nb):
            quantize_block(xr, b * QK, orow, b * BLOCK_BYTES)


@njit(cache=True, parallel=True, error_model="numpy")
def dequantize_rows(data, out):
    nb = out.shape[1] // QK
    for r in prange(out.shape[0]):
        dr = data[r]
        yr = out[r]
        for b in range(nb):
            dequantize_block(dr, b * BLOCK_BYTES, yr, b * QK)

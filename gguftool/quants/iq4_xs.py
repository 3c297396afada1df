"""IQ4_XS: 256-element superblocks of 4-bit indices into kvalues_iq4nl, with 6-bit block scales (136 bytes).

Mirrors quantize_iq4_xs (quantize_row_iq4_nl_impl with super_block_size = 256, block_size = 32, ntry = 7, with
or without importance weights) and dequantize_row_iq4_xs of ggml-quants.c; the search is in search_iq4.py.

Block layout (ggml-common.h block_iq4_xs):
    d         fp16       bytes 0..1     superscale
    scales_h  uint16     bytes 2..3     bits 2ib..2ib+1: high 2 bits of block ib's scale ls (0..63)
    scales_l  uint8[4]   bytes 4..7     scales_l[ib / 2] >> 4 (ib % 2): low 4 bits of ls
    qs        uint8[128] bytes 8..135   block ib: qs[16 ib + j] = L[32 ib + j] | L[32 ib + 16 + j] << 4
    x[32 ib + j] ~= d * (ls - 32) * kvalues_iq4nl[L]
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .bits import F32, U64, get_fp16
from .blocks import no_row_state
from .search_iq4 import KVALUES, make_scratch, quantize_superblock

GGML_TYPE = GGMLType.IQ4_XS
USES_IMATRIX = True
BLOCK_BYTES = 136
QK_K = 256

prepare_row = no_row_state


@njit(cache=True, error_model="numpy")
def quantize_block(x, qw, y, s):
    quantize_superblock(x, 0, qw, 0, 8, y, 0, s)


@njit(cache=True, error_model="numpy")
def _dequantize_block_at(data, o, y, off):
    d = get_fp16(data, o)
    sh = np.int32(data[U64(o + 2)]) | (np.int32(data[U64(o + 3)]) << 8)
    for ib in range(8):
        ls = ((np.int32(data[U64(o + 4 + ib // 2)]) >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4)
        dl = d * F32(ls - 32)
        for j in range(16):
            b = np.int32(data[U64(o + 8 + 16 * ib + j)])
            y[U64(off + 32 * ib + j)] = dl * KVALUES[b & 15]
            y[U64(off + 32 * ib + 16 + j)] = dl * KVALUES[b >> 4]


@njit(cache=True, error_model="numpy")
def dequantize_block(y, out):
    _dequantize_block_at(y, 0, out, 0)


@njit(cache=True, parallel=True, error_model="numpy")
def quantize_rows(x, imatrix, out):
    """quantize_iq4_xs: imatrix empty -> no importance weights."""
    rows, n = x.shape
    nb = n // QK_K
    for r in prange(rows):
        s = make_scratch()
        xr = x[r]
        orow = out[r]
        for b in range(nb):
            quantize_superblock(xr, b * QK_K, imatrix, b * QK_K, 8, orow, b * BLOCK_BYTES, s)


quantize_rows_screened = None  # the API screens for NaN/Inf first


@njit(cache=True, parallel=True, error_model="numpy")
def dequantize_rows(data, out):
    nb = out.shape[1] // QK_K
    for r in prange(out.shape[0]):
        dr = data[r]
        yr = out[r]
        for b in range(nb):
            _dequantize_block_at(dr, b * BLOCK_BYTES, yr, b * QK_K)

"""IQ4_NL: 32-element blocks of 4-bit indices into the non-linear table kvalues_iq4nl, one fp16 scale (18 bytes).

Mirrors quantize_iq4_nl (quantize_row_iq4_nl_impl with super_block_size = block_size = 32, ntry = 7, with or
without importance weights) and dequantize_row_iq4_nl of ggml-quants.c; the search is in search_iq4.py.

Block layout (ggml-common.h block_iq4_nl):
    d   fp16       bytes 0..1    scale;   x[j] ~= d * kvalues_iq4nl[L[j]]
    qs  uint8[16]  bytes 2..17   qs[j] = L[j] | L[j + 16] << 4
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .bits import U64, get_fp16
from .blocks import no_row_state
from .search_iq4 import KVALUES, make_scratch, quantize_superblock

GGML_TYPE = GGMLType.IQ4_NL
USES_IMATRIX = True
BLOCK_BYTES = 18
QK = 32

prepare_row = no_row_state


@njit(cache=True, error_model="numpy")
def quantize_block(x, qw, y, s):
    quantize_superblock(x, 0, qw, 0, 1, y, 0, s)


@njit(cache=True, error_model="numpy")
def _dequantize_block_at(data, o, y, off):
    d = get_fp16(data, o)
    for j in range(16):
        b = np.int32(data[U64(o + 2 + j)])
        y[U64(off + j)] = d * KVALUES[b & 15]
        y[U64(off + 16 + j)] = d * KVALUES[b >> 4]


@njit(cache=True, error_model="numpy")
def dequantize_block(y, out):
    _dequantize_block_at(y, 0, out, 0)


@njit(cache=True, parallel=True, error_model="numpy")
def quantize_rows(x, imatrix, out):
    """quantize_iq4_nl: imatrix empty -> no importance weights."""
    rows, n = x.shape
    nb = n // QK
    for r in prange(rows):
        s = make_scratch()
        xr = x[r]
        orow = out[r]
        for b in range(nb):
            quantize_superblock(xr, b * QK, imatrix, b * QK, 1, orow, b * BLOCK_BYTES, s)


quantize_rows_screened = None  # the API screens for NaN/Inf first


@njit(cache=True, parallel=True, error_model="numpy")
def dequantize_rows(data, out):
    nb = out.shape[1] // QK
    for r in prange(out.shape[0]):
        dr = data[r]
        yr = out[r]
        for b in range(nb):
            _dequantize_block_at(dr, b * BLOCK_BYTES, yr, b * QK)

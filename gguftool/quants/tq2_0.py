"""TQ2_0: ternary weights {-1, 0, 1} * d in 256-element blocks, 2 bits each, one fp16 scale (66 bytes).

Mirrors quantize_row_tq2_0_ref / dequantize_row_tq2_0 of ggml-quants.c; quantize_tq2_0 ignores the importance
matrix. d is the block's largest magnitude; each weight becomes lroundf(x / d) + 1 in {0, 1, 2}.

Block layout (ggml-common.h block_tq2_0):
    qs  uint8[64]   bytes 0..63   for chunk c in {0, 1} (128 elements each) and m in 0..31:
                                  qs[32c + m] = t[128c + m] | t[128c + 32 + m] << 2
                                               | t[128c + 64 + m] << 4 | t[128c + 96 + m] << 6
    d   fp16        bytes 64..65  x ~= (t - 1) * d
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .bits import F32, U64, get_fp16, put_fp16
from .blocks import no_row_state
from .ternary import QK_K, block_amax, inv_scale, trits

GGML_TYPE = GGMLType.TQ2_0
USES_IMATRIX = False
BLOCK_BYTES = 66
_OFF_D = 64


@njit(cache=True, error_model="numpy")
def _quantize_block_at(xr, base, out, o, t):
    d = block_amax(xr, base)
    put_fp16(out, o + _OFF_D, d)
    trits(xr, base, inv_scale(d), t)
    for c in range(2):
        for m in range(32):
            k = 128 * c + m
            q = (t[U64(k)] & 3) | ((t[U64(k + 32)] & 3) << 2) | ((t[U64(k + 64)] & 3) << 4) \
                | ((t[U64(k + 96)] & 3) << 6)
            out[U64(o + 32 * c + m)] = np.uint8(q)


@njit(cache=True, error_model="numpy")
def _dequantize_block_at(data, o, y, off):
    d = get_fp16(data, o + _OFF_D)
    for c in range(2):
        for n in range(4):
            for m in range(32):
                q = (np.int32(data[U64(o + 32 * c + m)]) >> (2 * n)) & 3
                y[U64(off + 128 * c + 32 * n + m)] = F32(q - 1) * d


# --- block functions (registry.py's convention)
@njit(cache=True)
def make_scratch():
    return (np.empty(QK_K, np.int32),)


prepare_row = no_row_state


@njit(cache=True, error_model="numpy")
def quantize_block(x, qw, y, s):
    """quantize_row_tq2_0_ref for one block (qw ignored)."""
    _quantize_block_at(x, 0, y, 0, s[0])


@njit(cache=True, error_model="numpy")
def dequantize_block(y, out):
    _dequantize_block_at(y, 0, out, 0)


# --- row drivers
@njit(cache=True, parallel=True, error_model="numpy")
def _quantize_rows(x, out):
    rows, n = x.shape
    nb = n // QK_K
    for r in prange(rows):
        t = np.empty(QK_K, np.int32)
        xr = x[r]
        orow = out[r]
        for b in range(nb):
            _quantize_block_at(xr, b * QK_K, orow, b * BLOCK_BYTES, t)


def quantize_rows(x, imatrix, out):
    """The registry's row driver (imatrix ignored, as quantize_tq2_0 does)."""
    _quantize_rows(x, out)


quantize_rows_screened = None  # the API screens for NaN/Inf first


@njit(cache=True, parallel=True, error_model="numpy")
def dequantize_rows(data, out):
    nb = out.shape[1] // QK_K
    for r in prange(out.shape[0]):
        dr = data[r]
        yr = out[r]
        for b in range(nb):
            _dequantize_block_at(dr, b * BLOCK_BYTES, yr, b * QK_K)

"""TQ1_0: ternary weights {-1, 0, 1} * d in 256-element blocks, 5 trits per byte (1.6875 bpw, 54 bytes).

Mirrors quantize_row_tq1_0_ref / dequantize_row_tq1_0 of ggml-quants.c; quantize_tq1_0 ignores the importance
matrix. d is the block's largest magnitude; each weight becomes the trit t = lroundf(x / d) + 1 in {0, 1, 2}.
A byte holds trits as a base-3 fraction: q = ceil(256 * (sum of t_n 3^(4-n)) / 243), so that the trits come back
out as the top bits of q * 3^n * 3 (mod 256 for q * 3^n).

Block layout (ggml-common.h block_tq1_0):
    qs  uint8[48]  bytes 0..47   qs[m]      (m < 32): trits of elements m + 32n,        n = 0..4 (first = most significant)
                                 qs[32 + m] (m < 16): trits of elements 160 + m + 16n,  n = 0..4
    qh  uint8[4]   bytes 48..51  qh[j]      (j < 4):  trits of elements 240 + j + 4n,   n = 0..3, then * 3
    d   fp16       bytes 52..53  x ~= (t - 1) * d
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .bits import F32, U64, get_fp16, put_fp16
from .blocks import no_row_state
from .ternary import QK_K, block_amax, inv_scale, trits

GGML_TYPE = GGMLType.TQ1_0
USES_IMATRIX = False
BLOCK_BYTES = 54
_OFF_QH = 48
_OFF_D = 52


@njit(cache=True, inline="always")
def _pack(q):
    """((uint16_t)q * 256 + 242) / 243 stored in a uint8 (q is already reduced mod 256 as the uint8 it was)."""
    return np.uint8(((q & 0xFF) * 256 + 242) // 243)


@njit(cache=True, error_model="numpy")
def _quantize_block_at(xr, base, out, o, t):
    d = block_amax(xr, base)
    put_fp16(out, o + _OFF_D, d)
    trits(xr, base, inv_scale(d), t)
    for m in range(32):  # 5 trits per byte along 32 bytes
        q = np.int32(0)
        for n in range(5):
            q = q * 3 + t[U64(m + 32 * n)]
        out[U64(o + m)] = _pack(q)
    for m in range(16):  # along 16 bytes
        q = np.int32(0)
        for n in range(5):
            q = q * 3 + t[U64(160 + m + 16 * n)]
        out[U64(o + 32 + m)] = _pack(q)
    for j in range(4):  # 4 trits per byte, shifted to the top
        q = np.int32(0)
        for n in range(4):
            q = q * 3 + t[U64(240 + j + 4 * n)]
        out[U64(o + _OFF_QH + j)] = _pack(q * 3)


@njit(cache=True, inline="always")
def _trit(byte, pow3):
    q = (np.int32(byte) * pow3) & 0xFF
    return ((q * 3) >> 8) - 1


@njit(cache=True, error_model="numpy")
def _dequantize_block_at(data, o, y, off):
    d = get_fp16(data, o + _OFF_D)
    k = 0
    p = 1
    for n in range(5):
        for m in range(32):
            y[U64(off + k + m)] = F32(_trit(data[U64(o + m)], p)) * d
        k += 32
        p *= 3
    p = 1
    for n in range(5):
        for m in range(16):
            y[U64(off + k + m)] = F32(_trit(data[U64(o + 32 + m)], p)) * d
        k += 16
        p *= 3
    p = 1
    for n in range(4):
        for j in range(4):
            y[U64(off + k + j)] = F32(_trit(data[U64(o + _OFF_QH + j)], p)) * d
        k += 4
        p *= 3


# --- block functions (registry.py's convention)
@njit(cache=True)
def make_scratch():
    return (np.empty(QK_K, np.int32),)


prepare_row = no_row_state


@njit(cache=True, error_model="numpy")
def quantize_block(x, qw, y, s):
    """quantize_row_tq1_0_ref for one block (qw ignored)."""
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
    """The registry's row driver (imatrix ignored, as quantize_tq1_0 does)."""
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

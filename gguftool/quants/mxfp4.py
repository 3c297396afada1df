"""MXFP4: OCP microscaling FP4 — 32 E2M1 values sharing one E8M0 (power of two) scale (17 bytes).

Mirrors quantize_row_mxfp4_ref / dequantize_row_mxfp4 of ggml-quants.c; quantize_mxfp4 ignores the importance
matrix. The code table kvalues_mxfp4 holds the E2M1 values doubled (0, 1, 2, 3, 4, 6, 8, 12 and negatives), so
the scale used is GGML_E8M0_TO_FP32_HALF(e) = 2^(e - 128).

    e = amax > 0 ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0
    each x -> the first index i of the smallest |kvalues_mxfp4[i] * d - x| (strict <, so +0 beats -0)

Block layout (ggml-common.h block_mxfp4):
    e   uint8       byte 0         E8M0 exponent
    qs  uint8[16]   bytes 1..16    qs[j] = i(x[j]) | i(x[j + 16]) << 4
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .bits import F32, U32, U64, u32_as_f32
from .blocks import no_row_state, no_scratch
from .legacy import cvtt_i32

GGML_TYPE = GGMLType.MXFP4
USES_IMATRIX = False
BLOCK_BYTES = 17
QK = 32

KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


@njit(cache=True, inline="always")
def e8m0_to_fp32_half(e):
    """GGML_E8M0_TO_FP32_HALF: 2^(e - 128) as float32 (subnormal for e < 2)."""
    e = U32(e)
    bits = U32(0x00200000) << e if e < U32(2) else (e - U32(1)) << U32(23)
    return u32_as_f32(U32(bits))


@njit(cache=True, inline="always")
def floor_log2f(a):
    """floorf(log2f(a)) for a finite a > 0, as an int.

    log2f(a) lies in [E, E + 1) for a = m * 2^E (1 <= m < 2), so its floor is E unless the float32 result of
    log2f rounds up to E + 1, which happens only for m just below 2. That float32 rounding is taken from a
    float64 log2 rounded to float32 (glibc's log2f is computed the same way: a double-precision evaluation
    rounded once); tests/test_quants_iq4_tq_mxfp4.py checks it against the C library's log2f for the values
    where the floor can turn.
    """
    return int(math.floor(F32(math.log2(np.float64(a)))))


@njit(cache=True, error_model="numpy")
def _quantize_block_at(xr, base, out, o):
    xu = xr.view(np.uint32)
    m = U32(0)
    for j in range(QK):  # amax as an integer max over |x|'s bits (the float order for non-negative floats)
        a = xu[U64(base + j)] & U32(0x7FFFFFFF)
        m = a if a > m else m
    amax = u32_as_f32(U32(m))
    if amax > F32(0.0):
        # (uint8_t)(float): cvttss2si to int32, low byte (negative exponents of tiny amax wrap as in C)
        e = cvtt_i32(F32(F32(floor_log2f(amax)) - F32(2.0) + F32(127.0))) & 0xFF
    else:
        e = 0
    out[U64(o)] = np.uint8(e)
    d = e8m0_to_fp32_half(e)
    for j in range(QK // 2):
        lo = _best_index(xr[U64(base + j)], d)
        hi = _best_index(xr[U64(base + QK // 2 + j)], d)
        out[U64(o + 1 + j)] = np.uint8(lo | (hi << 4))


@njit(cache=True, inline="always")
def _best_index(x, d):
    """best_index_mxfp4: the first i of least fabsf(kvalues_mxfp4[i] * d - x)."""
    best = 0
    best_err = abs(F32(0.0) * d - x)
    for i in range(1, 16):
        err = abs(KVALUES[i] * d - x)
        if err < best_err:
            best = i
            best_err = err
    return best


@njit(cache=True, error_model="numpy")
def _dequantize_block_at(data, o, y, off):
    d = e8m0_to_fp32_half(data[U64(o)])
    for j in range(QK // 2):
        b = np.int32(data[U64(o + 1 + j)])
        y[U64(off + j)] = KVALUES[b & 15] * d
        y[U64(off + QK // 2 + j)] = KVALUES[b >> 4] * d


# --- block functions (registry.py's convention)
make_scratch = no_scratch
prepare_row = no_row_state


@njit(cache=True, error_model="numpy")
def quantize_block(x, qw, y, s):
    """quantize_row_mxfp4_ref for one block (qw ignored)."""
    _quantize_block_at(x, 0, y, 0)


@njit(cache=True, error_model="numpy")
def dequantize_block(y, out):
    _dequantize_block_at(y, 0, out, 0)


# --- row drivers
@njit(cache=True, parallel=True, error_model="numpy")
def _quantize_rows(x, out):
    rows, n = x.shape
    nb = n // QK
    for r in prange(rows):
        xr = x[r]
        orow = out[r]
        for b in range(nb):
            _quantize_block_at(xr, b * QK, orow, b * BLOCK_BYTES)


def quantize_rows(x, imatrix, out):
    """The registry's row driver (imatrix ignored, as quantize_mxfp4 does)."""
    _quantize_rows(x, out)


quantize_rows_screened = None  # the API screens for NaN/Inf first


@njit(cache=True, parallel=True, error_model="numpy")
def dequantize_rows(data, out):
    nb = out.shape[1] // QK
    for r in prange(out.shape[0]):
        dr = data[r]
        yr = out[r]
        for b in range(nb):
            _dequantize_block_at(dr, b * BLOCK_BYTES, yr, b * QK)

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
from .bits import F32, U32, U64, f32_as_u32, u32_as_f32
from .blocks import no_row_state, no_scratch
from .legacy import cvtt_i32

GGML_TYPE = GGMLType.MXFP4
USES_IMATRIX = False
BLOCK_BYTES = 17
QK = 32

KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)
MIDS = np.array([0.5, 1.5, 2.5, 3.5, 5.0, 7.0, 10.0], dtype=np.float32)  # between neighbouring magnitudes


@njit(cache=True, inline="always")
def e8m0_to_fp32_half(e):
    """GGML_E8M0_TO_FP32_HALF: 2^(e - 128) as float32 (subnormal for e < 2)."""
    e = U32(e)
    bits = U32(0x00200000) << e if e < U32(2) else (e - U32(1)) << U32(23)
    return u32_as_f32(U32(bits))


def _floor_log2_thresholds() -> np.ndarray:
    """THR[b] for each biased exponent b = 1..254 of a normal float32 a: the smallest bit pattern in
    [2^(b-127), 2^(b-126)) whose floorf(log2f(a)) is b - 126 (log2f rounded up to the next integer), or
    0xFFFFFFFF when none is. floorf(log2f(a)) never decreases as a grows, so a binary search per exponent over
    the mantissa finds it."""
    thr = np.full(256, 0xFFFFFFFF, dtype=np.uint32)
    for b in range(1, 255):
        lo = b << 23
        hi = (b << 23) | 0x7FFFFF
        if _floor_log2f_slow(_bits_f32(hi)) == b - 127:
            continue
        while lo < hi:  # smallest pattern whose floor is b - 126
            mid = (lo + hi) // 2
            if _floor_log2f_slow(_bits_f32(mid)) == b - 127:
                lo = mid + 1
            else:
                hi = mid
        thr[b] = lo
    return thr


def _bits_f32(u: int) -> float:
    return float(np.array([u], dtype=np.uint32).view(np.float32)[0])


def _floor_log2f_slow(a: float) -> int:
    return math.floor(np.float32(math.log2(a)))


# floorf(log2f(a)) of glibc's log2f (a double-precision evaluation rounded once to float32): the float64 log2
# rounded to float32. tests/test_quants_iq4_tq_mxfp4.py checks it against the C library's log2f near every
# power of two, where the floor can turn.
LOG2_THR = _floor_log2_thresholds()


@njit(cache=True, inline="always")
def floor_log2f(a):
    """floorf(log2f(a)) for a finite a > 0, as an int: the exponent of a, plus one where log2f rounds up to
    the next integer (a just below a power of two; LOG2_THR). Subnormal a (rare) takes the float64 log2."""
    u = f32_as_u32(a)
    b = u >> U32(23)
    if b == U32(0):
        return int(math.floor(F32(math.log2(np.float64(a)))))
    return int(b) - 127 + int(u >= LOG2_THR[b])


@njit(cache=True, inline="always", error_model="numpy")
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
        lo = best_index(xr[U64(base + j)], d)
        hi = best_index(xr[U64(base + QK // 2 + j)], d)
        out[U64(o + 1 + j)] = np.uint8(lo | (hi << np.int32(4)))


@njit(cache=True, inline="always", error_model="numpy")
def best_index(x, d):
    """best_index_mxfp4(x, d) for finite x and d = GGML_E8M0_TO_FP32_HALF(e), as a count of midpoints.

    d is a power of two, so kvalues[i] * d is exact, y = x / d is exact (or so small that the answer is 0
    anyway), and fabsf(kvalues[i] * d - x) orders the candidates exactly as |kvalues[i] - y| does: where two
    of them come close (y near a midpoint between neighbouring values) both differences are exact, and a
    difference that rounds into the subnormal range is exact too. The reference keeps the first index of the
    least error: between neighbours the one of smaller magnitude (the table lists magnitudes in increasing
    order), and +0 (index 0) before -0 (index 8). So with c = the number of midpoints below |y|:
    index = c for y >= 0, 8 + c for y < 0, and 0 when c == 0. (e <= 252 always: 12 * d stays finite.)
    best_index_ref is the reference's loop.
    """
    a = abs(x)
    c = np.int32(0)
    for k in range(7):  # |y| > m  <=>  |x| > m * d  (m * d exact, even subnormal; hoisted out of the caller's loop)
        c += np.int32(a > F32(MIDS[k] * d))
    return np.int32(0) if c == 0 else (c + np.int32(8) if x < F32(0.0) else c)


@njit(cache=True, error_model="numpy")
def best_index_ref(x, d):
    """best_index_mxfp4 as written in ggml-quants.c (for the tests): the first i of least
    fabsf(kvalues_mxfp4[i] * d - x)."""
    best = 0
    best_err = abs(F32(KVALUES[0] * d) - x)
    for i in range(1, 16):
        err = abs(F32(KVALUES[i] * d) - x)
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

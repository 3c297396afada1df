"""Helpers shared by the 32-element "legacy" block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).

ggml-quants.c's reference quantizers convert floats to small integers with C casts (`(int8_t)(x + 8.5f)`,
`(uint8_t)(x + 0.5f)`) and `roundf`; the importance paths weight each element by
`qw[j] * sqrtf(sigma2 + x[j]*x[j])`. These helpers reproduce exactly what the x86-64 build computes, including
the out-of-range cases that only arise with extreme inputs (a block scale so small that 1/d overflows).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .common import fp16_bits_to_fp32, fp32_to_fp16_bits

F32 = np.float32
QK = 32  # elements per block of every legacy type


# --- C float -> integer conversions as the x86-64 build performs them
@njit(cache=True, inline="always")
def cvtt_i32(f):
    """(int32_t)f as cvttss2si computes it: truncation toward zero; NaN or out of range gives INT32_MIN."""
    if f > F32(-2147483904.0) and f < F32(2147483648.0):
        return int(f)
    return -2147483648


@njit(cache=True, inline="always")
def c_int8(f):
    """(int8_t)f: the compiler converts to int32 and keeps the low byte (as a signed value)."""
    v = cvtt_i32(f) & 0xFF
    return v - 256 if v >= 128 else v


@njit(cache=True, inline="always")
def c_uint8(f):
    """(uint8_t)f: int32 conversion, low byte."""
    return cvtt_i32(f) & 0xFF


@njit(cache=True, inline="always")
def roundf(f):
    """C roundf: nearest integer, halfway cases away from zero (float32 in, float32 out)."""
    t = np.trunc(f)
    if abs(f - t) >= F32(0.5):  # f - t is exact for every float32
        t = t + F32(1.0) if f > 0 else t - F32(1.0)
    return F32(t)


# --- block header fields
@njit(cache=True, inline="always")
def put_fp16(out, off, f):
    """Store GGML_FP32_TO_FP16(f) little-endian at out[off:off+2]."""
    h = fp32_to_fp16_bits(f)
    out[off] = h & 0xFF
    out[off + 1] = (h >> 8) & 0xFF


@njit(cache=True, inline="always")
def get_fp16(data, off):
    """GGML_FP16_TO_FP32 of the little-endian half at data[off:off+2] (exact)."""
    return fp16_bits_to_fp32(np.uint16(data[off]) | (np.uint16(data[off + 1]) << np.uint16(8)))


@njit(cache=True, inline="always")
def put_u32(out, off, v):
    """Store a uint32 little-endian (memcpy of qh on x86-64)."""
    out[off] = v & 0xFF
    out[off + 1] = (v >> 8) & 0xFF
    out[off + 2] = (v >> 16) & 0xFF
    out[off + 3] = (v >> 24) & 0xFF


@njit(cache=True, inline="always")
def get_u32(data, off):
    return (np.uint32(data[off]) | (np.uint32(data[off + 1]) << np.uint32(8))
            | (np.uint32(data[off + 2]) << np.uint32(16)) | (np.uint32(data[off + 3]) << np.uint32(24)))


# --- importance weights of the quantize_row_q*_impl functions
@njit(cache=True)
def row_sigma2(x):
    """sum_x2/n_per_row with sum_x2 accumulated sequentially in float32 (as in quantize_row_q4_0_impl)."""
    s = F32(0.0)
    for j in range(x.size):
        s += x[j] * x[j]
    return s / F32(x.size)


@njit(cache=True, inline="always")
def block_weights(x, qw, off, sigma2, weight):
    """weight[j] = qw[j] * sqrtf(sigma2 + xb[j]*xb[j]) for the block starting at off."""
    for j in range(QK):
        v = x[off + j]
        weight[j] = qw[off + j] * np.sqrt(sigma2 + v * v)

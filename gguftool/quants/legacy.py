"""Helpers shared by the 32-element "legacy" block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).

ggml-quants.c's reference quantizers convert floats to small integers with C casts (`(int8_t)(x + 8.5f)`,
`(uint8_t)(x + 0.5f)`) and `roundf`; the importance paths weight each element by
`qw[j] * sqrtf(sigma2 + x[j]*x[j])`. These helpers reproduce exactly what the x86-64 build computes, including
the out-of-range cases that only arise with extreme inputs (a block scale so small that 1/d overflows).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import F32, FLT_MAX, U64

QK = 32          # elements per block of every legacy type
ROWS_PER_TASK = 4  # rows per parallel task of the row drivers (each task allocates its scratch once)


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


# --- block scans of the reference paths, in forms that vectorise
@njit(cache=True, inline="always")
def first_absmax(xr, base):
    """The (amax, max) scan of quantize_row_q4_0_ref / q5_0_ref for the block at base: the first element of
    largest magnitude (+0.0 if all are zero), with C's comparisons. Returns (max, amax)."""
    amax = F32(0.0)
    mx = F32(0.0)
    for j in range(QK):
        v = xr[U64(base + j)]
        if amax < abs(v):
            amax = abs(v)
            mx = v
    return mx, amax


# Not inline="always": numba-level inlining would compile the body with the caller's (strict) flags. As a
# separate function LLVM inlines it and keeps the per-instruction nnan/nsz flags, which let the two
# reductions become vector min/max.
@njit(cache=True, fastmath={"nnan", "nsz"})
def block_minmax(xr, base):
    """The (min, max) scan of quantize_row_q4_1_ref / q5_1_ref for the block at base, vectorised. Exact for
    finite values except the sign of a zero result: C keeps the first of -0.0 / +0.0 met, so a caller must
    take the scalar path when the min or max compares equal to zero (the sign reaches the stored fp16
    fields). With a NaN in the block the result is meaningless: callers detect NaN otherwise (a NaN level
    converts to INT32_MIN)."""
    mn = FLT_MAX
    mx = -FLT_MAX
    for j in range(QK):
        v = xr[U64(base + j)]
        mn = v if v < mn else mn
        mx = v if v > mx else mx
    return mn, mx


@njit(cache=True)
def has_nonfinite(xr):
    """True if the row holds a NaN or an Inf (scalar scan: only run on rows the fast paths rejected)."""
    for j in range(xr.size):
        v = xr[j]
        if v - v != 0:  # NaN - NaN and Inf - Inf are NaN
            return True
    return False


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
        v = x[U64(off + j)]
        weight[j] = qw[U64(off + j)] * np.sqrt(sigma2 + v * v)

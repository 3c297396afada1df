"""Scalar helpers shared by every quantization kernel: ggml's rounding and half-precision conversions.

All functions are numba-compiled and float32-exact. They are written arithmetically (no bit casts of scalars)
so they inline into the per-block kernels.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

F32 = np.float32


# --- rounding
@njit(cache=True, inline="always")
def nearest_int(fval):
    """ggml-quants.c nearest_int: adds 12582912.f (1.5 * 2^23) and takes the low mantissa bits.

    For |fval| <= 2^22 the float32 addition rounds fval to the nearest integer, ties to even (12582912 is even,
    so the parity of the sum is the parity of the rounded value); that is exactly rint in float32.
    """
    return int(np.rint(np.float32(fval)))


# --- fp16 (IEEE binary16), round-to-nearest-even like F16C's _cvtss_sh(x, 0) and ggml's software path
@njit(cache=True)
def fp32_to_fp16_bits(f):
    """float32 -> binary16 bit pattern (uint16), round to nearest even. NaN -> 0x7E00 (with sign)."""
    f = np.float32(f)
    sign = 0x8000 if math.copysign(1.0, f) < 0 else 0     # sign bit, also of -0.0 and of NaN
    if f != f:
        return np.uint16(sign | 0x7E00)
    a = abs(f)
    if a >= np.float32(65520.0):            # halfway between 65504 and 65536 rounds (to even) up: inf
        return np.uint16(sign | 0x7C00)
    if a < np.float32(6.103515625e-05):     # below 2^-14: subnormal, unit 2^-24 (q == 1024 is the smallest normal)
        q = int(np.rint(a * np.float32(16777216.0)))
        return np.uint16(sign | q)
    m, e = math.frexp(a)                    # a = m * 2^e, m in [0.5, 1): unbiased exponent E = e - 1
    E = e - 1
    # a * 2^(10-E) lies in [1024, 2048); scaling by a power of two is exact in float32
    q = int(np.rint(a * np.float32(2.0 ** (10 - E))))
    # q == 2048 carries into the exponent field by itself
    return np.uint16(sign | (((E + 14) << 10) + q))


@njit(cache=True)
def fp16_bits_to_fp32(h):
    """binary16 bit pattern -> float32 (exact)."""
    h = int(h)
    sign = -1.0 if h & 0x8000 else 1.0
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0:
        v = mant * 2.0 ** -24
    elif exp == 31:
        v = np.inf if mant == 0 else np.nan
    else:
        v = (1024 + mant) * 2.0 ** (exp - 25)
    return np.float32(math.copysign(v, sign))          # keeps the sign of NaN too


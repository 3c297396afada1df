"""Helpers of the ternary types TQ1_0 and TQ2_0 (BitNet b1.58 / TriLM weights, 256-element blocks).

Both reference quantizers (quantize_row_tq1_0_ref / quantize_row_tq2_0_ref in ggml-quants.c) scale a block by its
largest magnitude d and map each weight to the trit ``lroundf(x * (1/d)) + 1`` in {0, 1, 2}; llama.cpp ignores the
importance matrix for them. Here: the block scan and that trit, computed in lanes (branch-free) for a whole block.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import F32, U32, U64, u32_as_f32

QK_K = 256


@njit(cache=True, inline="always")
def block_amax(xr, base):
    """max |x| over the 256-block at base (MAX(amax, fabsf(v)) from 0; x finite): an integer max over the bit
    patterns of |x| (the same order for non-negative floats), which vectorises."""
    xu = xr.view(np.uint32)
    m = U32(0)
    for j in range(QK_K):
        a = xu[U64(base + j)] & U32(0x7FFFFFFF)
        m = a if a > m else m
    return u32_as_f32(U32(m))


@njit(cache=True, inline="always")
def inv_scale(d):
    """``d ? 1.0f/d : 0.0f``."""
    return F32(1.0) / d if d != F32(0.0) else F32(0.0)


@njit(cache=True, inline="always")
def trits(xr, base, idd, t):
    """t[j] = lroundf(x[base + j] * idd) + 1 as int32 for the 256 elements of a block.

    lroundf rounds halfway cases away from zero. With a finite idd |x * idd| <= 1 (up to one rounding), so the
    branch-free truncate-and-adjust below is exact. An infinite idd (d a subnormal whose reciprocal overflows)
    makes every product +-Inf or NaN: glibc's lroundf returns LONG_MIN for those, whose low 32 bits (the int
    the reference stores it in) are 0, so the trit is 1.
    """
    if abs(idd) < np.inf:
        for j in range(QK_K):
            v = xr[U64(base + j)] * idd
            tr = np.trunc(v)
            f = v - tr  # exact
            t[j] = np.int32(tr) + np.int32(f >= F32(0.5)) - np.int32(f <= F32(-0.5)) + np.int32(1)
    else:
        for j in range(QK_K):
            t[j] = np.int32(1)


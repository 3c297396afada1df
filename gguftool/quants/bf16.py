"""BF16 rows: a plain per-element conversion (block size 1), no imatrix.

Mirrors ggml_quantize_chunk's BF16 case (ggml_fp32_to_bf16_row_ref -> ggml_compute_fp32_to_bf16:
round-to-nearest-even on the bits, NaN forced quiet by setting bit 6 of the truncated pattern, subnormals
kept). The row loops work on the integer bit patterns, so they vectorise.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .bits import U32, f32_as_u32, u32_as_f32
from .blocks import no_row_state, no_scratch

GGML_TYPE = GGMLType.BF16
USES_IMATRIX = False
BLOCK_BYTES = 2


@njit(cache=True, inline="always")
def f32_bits_to_bf16_bits(u):
    """ggml_compute_fp32_to_bf16 on the bit pattern."""
    rounded = (u + (U32(0x7FFF) + ((u >> U32(16)) & U32(1)))) >> U32(16)
    quiet_nan = (u >> U32(16)) | U32(64)                # NaN: truncate and force quiet
    return quiet_nan if (u & U32(0x7FFFFFFF)) > U32(0x7F800000) else rounded


# --- block functions (the registry's convention; the row drivers below convert whole rows instead)
make_scratch = no_scratch
prepare_row = no_row_state


@njit(cache=True)
def quantize_block(x, qw, y, s):
    h = f32_bits_to_bf16_bits(f32_as_u32(np.float32(x[0])))
    y[0] = h & U32(0xFF)
    y[1] = (h >> U32(8)) & U32(0xFF)


@njit(cache=True)
def dequantize_block(y, out):
    out[0] = u32_as_f32(U32((U32(y[0]) | (U32(y[1]) << U32(8))) << U32(16)))  # (numba widens the shift)


# --- row drivers
@njit(cache=True, parallel=True)
def quantize_rows_screened(x, out, bad):
    """The conversion fused with the NaN/Inf screen (see registry): bad[r] = True when row r holds one."""
    n = x.shape[1]
    for r in prange(x.shape[0]):
        xu = x[r].view(np.uint32)
        ou = out[r].view(np.uint16)
        m = U32(0)
        for j in range(n):
            u = xu[j]
            e = u & U32(0x7F800000)
            m = e if e > m else m
            ou[j] = np.uint16(f32_bits_to_bf16_bits(u))
        bad[r] = m == U32(0x7F800000)


def quantize_rows(x, imatrix, out):
    """The screened conversion, flags discarded (x is finite; the imatrix is ignored)."""
    quantize_rows_screened(x, out, np.zeros(x.shape[0], np.bool_))


@njit(cache=True, parallel=True)
def dequantize_rows(data, out):
    n = out.shape[1]
    for r in prange(out.shape[0]):
        hu = data[r].view(np.uint16)
        ou = out[r].view(np.uint32)
        for j in range(n):
            ou[j] = U32(hu[j]) << U32(16)

"""F16 rows: a plain per-element conversion (block size 1), no imatrix.

Mirrors ggml_quantize_chunk's F16 case (ggml_fp32_to_fp16_row -> GGML_FP32_TO_FP16, ggml-impl.h's
ggml_compute_fp32_to_fp16: IEEE round-to-nearest-even, NaN -> 0x7E00 with the sign). The row loops work on
the integer bit patterns (rows viewed as uint32 / uint16) with quants.bits' branch-free conversions, so they
vectorise.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .bits import U32, f16_bits_to_f32_bits, fp16_bits_from_f32, get_fp16, put_fp16
from .blocks import no_row_state, no_scratch

GGML_TYPE = GGMLType.F16
USES_IMATRIX = False
BLOCK_BYTES = 2


# --- block functions (the registry's convention; the row drivers below convert whole rows instead)
make_scratch = no_scratch
prepare_row = no_row_state


@njit(cache=True)
def quantize_block(x, qw, y, s):
    put_fp16(y, 0, x[0])


@njit(cache=True)
def dequantize_block(y, out):
    out[0] = get_fp16(y, 0)


# --- row drivers
@njit(cache=True, parallel=True)
def quantize_rows_screened(x, out, bad):
    """The conversion fused with the NaN/Inf screen (see registry): bad[r] = True when row r holds one."""
    n = x.shape[1]
    for r in prange(x.shape[0]):
        xr = x[r]
        xu = xr.view(np.uint32)
        ou = out[r].view(np.uint16)
        m = U32(0)
        for j in range(n):
            u = xu[j]
            e = u & U32(0x7F800000)
            m = e if e > m else m
            ou[j] = np.uint16(fp16_bits_from_f32(xr[j], u))
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
            ou[j] = f16_bits_to_f32_bits(U32(hu[j]))

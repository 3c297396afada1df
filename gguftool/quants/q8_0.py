"""Q8_0: blocks of 32 weights as int8 with one fp16 scale (34 bytes).

Mirrors quantize_row_q8_0_ref / dequantize_row_q8_0 of ggml-quants.c. llama.cpp's quantize_q8_0 ignores the
importance matrix, so there is only the reference path.

Block layout (ggml-common.h block_q8_0):
    d   fp16        bytes 0..1   scale = amax / 127
    qs  int8[32]    bytes 2..33  round(x / d), halfway cases away from zero
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .bits import F32, U32, U64, get_fp16, put_fp16, u32_as_f32
from .blocks import no_row_state, no_scratch
from .legacy import QK, ROWS_PER_TASK, c_int8, has_nonfinite, roundf

GGML_TYPE = GGMLType.Q8_0
USES_IMATRIX = False
BLOCK_BYTES = 34


# --- per block: every C conversion emulated (any input, including NaN/Inf)
@njit(cache=True, error_model="numpy")
def _quantize_block_at(x, off, out, o):
    amax = F32(0.0)
    for j in range(QK):
        a = abs(x[off + j])
        amax = amax if amax > a else a  # MAX(amax, fabsf(v))
    d = amax / F32(127.0)
    idd = F32(1.0) / d if d != 0 else F32(0.0)
    put_fp16(out, o, d)
    for j in range(QK):
        out[o + 2 + j] = c_int8(roundf(x[off + j] * idd)) & 0xFF


@njit(cache=True, inline="always")
def block_absmax_bits(xu, base):
    """The bits of max |x| over the block at base, from the float32 bits xu: for non-negative floats the
    integer order is the float order (+Inf = 0x7F800000, NaN above it), and an integer max reduction
    vectorises where a float one would need fastmath."""
    m = U32(0)
    for j in range(QK):
        a = xu[U64(base + j)] & U32(0x7FFFFFFF)
        m = a if a > m else m
    return m


@njit(cache=True, error_model="numpy")
def _quantize_row_fast(xr, orow):
    """quantize_row_q8_0_ref over a whole row in loops that vectorise: amax as an integer max over the bits,
    roundf as trunc plus a select on the (exact) fraction, the int8 conversion as a plain int32 truncation.

    Valid while amax and 1/d are finite: then |x*id| <= 127 up to rounding, so the level fits an int8. Returns
    False when a block needs the scalar path, and for every row holding a NaN or an Inf (the screened driver
    relies on it)."""
    xu = xr.view(np.uint32)
    nb = xr.size // QK
    ok = True  # accumulated, not an early exit: an exit in this loop stops LLVM from unrolling it
    for b in range(nb):
        base = b * QK
        o = b * BLOCK_BYTES
        bits = block_absmax_bits(xu, base)
        amax = u32_as_f32(U32(bits))
        d = amax / F32(127.0)
        idd = F32(1.0) / d if d != 0 else F32(0.0)
        ok &= (bits < U32(0x7F800000)) & (abs(idd) < np.inf)
        put_fp16(orow, o, d)
        for j in range(QK):  # garbage when not ok: the row is then redone by the scalar path
            v = xr[U64(base + j)] * idd
            t = np.trunc(v)
            f = v - t  # exact
            q = np.int32(t) + np.int32(f >= F32(0.5)) - np.int32(f <= F32(-0.5))
            orow[U64(o + 2 + j)] = np.uint8(q & 0xFF)
    return ok


@njit(cache=True, error_model="numpy")
def _dequantize_block_at(data, o, y, off):
    d = get_fp16(data, o)
    for j in range(QK):
        q = np.int32(data[o + 2 + j])
        if q >= 128:
            q -= 256
        y[off + j] = F32(q) * d


# --- block functions (the registry's convention). The row drivers call the offset forms above directly on
# whole rows, which saves a view per 32-element block.
make_scratch = no_scratch
prepare_row = no_row_state


@njit(cache=True, error_model="numpy")
def quantize_block(x, qw, y, s):
    """quantize_row_q8_0_ref for one block (qw ignored: Q8_0 has no importance path)."""
    _quantize_block_at(x, 0, y, 0)


@njit(cache=True, error_model="numpy")
def dequantize_block(y, out):
    _dequantize_block_at(y, 0, out, 0)


# --- row drivers
@njit(cache=True, parallel=True, error_model="numpy")
def quantize_rows_screened(x, out, bad):
    """The rows quantized, fused with the API's NaN/Inf screen: bad[r] = True when row r holds a NaN or an Inf
    (its bytes are then meaningless). The fast path rejects every such row, so only rejected rows are scanned."""
    rows, n = x.shape
    nb = n // QK
    ntask = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for t in prange(ntask):
        for r in range(t * ROWS_PER_TASK, min(rows, (t + 1) * ROWS_PER_TASK)):
            xr = x[r]
            orow = out[r]
            if not _quantize_row_fast(xr, orow):
                if has_nonfinite(xr):
                    bad[r] = True
                else:
                    for b in range(nb):
                        _quantize_block_at(xr, b * QK, orow, b * BLOCK_BYTES)


def quantize_rows(x, imatrix, out):
    """The registry's row driver (imatrix ignored: Q8_0 has no importance path). x must be finite (the API
    checks); subnormal, huge and overflowing values are handled exactly."""
    quantize_rows_screened(x, out, np.zeros(x.shape[0], np.bool_))


@njit(cache=True, parallel=True, error_model="numpy")
def dequantize_rows(data, out):
    nb = out.shape[1] // QK
    for r in prange(out.shape[0]):
        dr = data[r]
        yr = out[r]
        for b in range(nb):
            _dequantize_block_at(dr, b * BLOCK_BYTES, yr, b * QK)

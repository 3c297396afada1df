"""Q4_1: blocks of 32 weights as 4-bit unsigned levels with an fp16 scale and an fp16 minimum (20 bytes).

Mirrors quantize_row_q4_1_ref (no imatrix), quantize_row_q4_1_impl (imatrix: importance-weighted
make_qkx3_quants search) and dequantize_row_q4_1 of ggml-quants.c.

Block layout (ggml-common.h block_q4_1):
    d   fp16       bytes 0..1    scale
    m   fp16       bytes 2..3    minimum; x ~= d * q + m
    qs  u8[16]     bytes 4..19   low nibble: element j, high nibble: element j + 16
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .bits import F32, FLT_MAX, U64, get_fp16, put_fp16
from .legacy import QK, ROWS_PER_TASK, block_minmax, block_weights, c_int8, has_nonfinite, row_sigma2
from .search_affine import SCRATCH_PER_ELEM, make_qkx3_quants
from .search_lanes import legacy_qkx3_lanes, qkx_workspace

GGML_TYPE = GGMLType.Q4_1
USES_IMATRIX = True
BLOCK_BYTES = 20


# --- reference path
@njit(cache=True, error_model="numpy")
def _quantize_block_ref(x, off, out, o):
    """quantize_row_q4_1_ref for one block, every C conversion emulated (any input, including NaN/Inf)."""
    mn = FLT_MAX
    mx = -FLT_MAX
    for j in range(QK):
        v = x[off + j]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    d = (mx - mn) / F32(15.0)
    idd = F32(1.0) / d if d != 0 else F32(0.0)
    put_fp16(out, o, d)
    put_fp16(out, o + 2, mn)
    for j in range(QK // 2):
        xi0 = c_int8((x[off + j] - mn) * idd + F32(0.5))
        xi1 = c_int8((x[off + QK // 2 + j] - mn) * idd + F32(0.5))
        xi0 = 15 if 15 < xi0 else xi0  # MIN(15, (int8_t)...)
        xi1 = 15 if 15 < xi1 else xi1
        out[o + 4 + j] = ((xi0 & 0xFF) | ((xi1 & 0xFF) << 4)) & 0xFF


@njit(cache=True, error_model="numpy")
def _quantize_row_ref(xr, orow, q):
    """quantize_row_q4_1_ref over a whole row in one pass that vectorises: per block min/max and scale, then
    the 32 levels (x - min)*id + 0.5 truncated and packed straight into the nibbles (q: unused scratch, kept
    for the drivers' signature).

    Valid while d and 1/d are finite (then (x - min)*id lies in [0, 15] up to rounding and the C cast is a
    truncation), no block has a zero as its min or max (signed zeros: see legacy.block_minmax) and no level
    is negative (a NaN converts to INT32_MIN). Returns False when a block needs the scalar path."""
    n = xr.size
    nb = n // QK
    ok = True  # accumulated, not an early exit: an exit in this loop stops LLVM from unrolling it
    neg = np.int32(0)  # OR of all levels: the sign bit flags a NaN
    for b in range(nb):
        base = b * QK
        o = b * BLOCK_BYTES
        mn, mx = block_minmax(xr, base)
        d = (mx - mn) / F32(15.0)
        idd = F32(1.0) / d if d != 0 else F32(0.0)
        ok &= (mn != 0) & (mx != 0) & (abs(d) < np.inf) & (abs(idd) < np.inf)
        put_fp16(orow, o, d)
        put_fp16(orow, o + 2, mn)
        for j in range(QK // 2):  # garbage when not ok: the row is then redone by the scalar path
            v0 = np.int32((xr[U64(base + j)] - mn) * idd + F32(0.5))
            v1 = np.int32((xr[U64(base + QK // 2 + j)] - mn) * idd + F32(0.5))
            neg = np.int32(neg | v0 | v1)  # kept int32: an int64 accumulator blocks the vectoriser
            v0 = v0 if v0 < 15 else np.int32(15)
            v1 = v1 if v1 < 15 else np.int32(15)
            orow[U64(o + 4 + j)] = np.uint8((v0 | (v1 << 4)) & 0xFF)
    return ok & (neg >= 0)


# --- importance path
@njit(cache=True, inline="always", error_model="numpy")
def _quantize_block_impl(x, off, qw, sigma2, weight, L, Laux, fs, out, o):
    """One block of quantize_row_q4_1_impl: make_qkx3_quants(32, 15, -0.9, 0.05, 36 steps, squared error)."""
    block_weights(x, qw, off, sigma2, weight)
    d, the_min = make_qkx3_quants(QK, 15, x[off:off + QK], weight, L, Laux, -0.9, 0.05, 36, False, fs)
    put_fp16(out, o, d)
    put_fp16(out, o + 2, -the_min)
    for j in range(QK // 2):
        out[U64(o + 4 + j)] = (np.int32(L[j]) | (np.int32(L[j + 16]) << 4)) & 0xFF


# Lanes: the make_qkx3_quants searches of up to LANES consecutive blocks of a row side by side (search_lanes).
LANES = 8
_NW = qkx_workspace(QK, LANES)


@njit(cache=True, inline="always", error_model="numpy")
def _quantize_group_impl(x, off, nl, qw, sigma2, ws, L, scales, mins, out, o):
    """Blocks off/QK .. off/QK + nl - 1 (nl <= LANES) of quantize_row_q4_1_impl at once: the same weights and
    make_qkx3_quants(32, 15, -0.9, 0.05, 36 steps, squared error) per block, run as lanes; bit-identical
    with _quantize_block_impl on each block. ws: float32[_NW]; L: uint8[QK*LANES]; scales, mins: float32[LANES]."""
    legacy_qkx3_lanes(x, off, nl, qw, sigma2, ws, L, scales, mins, QK, LANES, 15)
    for j in range(nl):
        ob = o + BLOCK_BYTES * j
        put_fp16(out, ob, scales[j])
        put_fp16(out, ob + 2, -mins[j])
        for i in range(QK // 2):
            out[U64(ob + 4 + i)] = (np.int32(L[QK * j + i]) | (np.int32(L[QK * j + i + 16]) << 4)) & 0xFF


# --- dequantization
@njit(cache=True, inline="always", error_model="numpy")
def _dequantize_block_at(data, o, y, off):
    d = get_fp16(data, o)
    m = get_fp16(data, o + 2)
    for j in range(QK // 2):
        q = np.int32(data[U64(o + 4 + j)])
        y[U64(off + j)] = F32(q & 0x0F) * d + m
        y[U64(off + j + QK // 2)] = F32(q >> 4) * d + m


# --- block functions (the registry's convention). The row drivers call the offset forms above directly on
# whole rows, which saves a view per 32-element block.
@njit(cache=True, error_model="numpy")
def make_scratch():
    """weight float32[32], L and Laux uint8[32], fs float32 (the importance search), row float32[1] (sigma2)."""
    return (np.empty(QK, np.float32), np.empty(QK, np.uint8), np.empty(QK, np.uint8),
            np.empty(SCRATCH_PER_ELEM * QK, np.float32), np.zeros(1, np.float32))


@njit(cache=True, error_model="numpy")
def prepare_row(x, qw, s):
    """sigma2 = mean of x^2 over the row, which quantize_row_q4_1_impl weights every element with."""
    if qw.size > 0:
        s[4][0] = row_sigma2(x)


@njit(cache=True, error_model="numpy")
def quantize_block(x, qw, y, s):
    weight, L, Laux, fs, row = s
    if qw.size > 0:
        _quantize_block_impl(x, 0, qw, row[0], weight, L, Laux, fs, y, 0)
    else:
        _quantize_block_ref(x, 0, y, 0)


@njit(cache=True, error_model="numpy")
def dequantize_block(y, out):
    _dequantize_block_at(y, 0, out, 0)


# --- row drivers
@njit(cache=True, parallel=True, error_model="numpy")
def quantize_rows(x, imatrix, out):
    """x must be finite (the API checks); subnormal, huge and overflowing values are handled exactly."""
    rows, n = x.shape
    nb = n // QK
    use_w = imatrix.size > 0
    ntask = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for t in prange(ntask):
        q = np.empty(n, np.int32)
        ws = np.empty(_NW, np.float32)
        Lg = np.empty(QK * LANES, np.uint8)
        scales = np.empty(LANES, np.float32)
        mins = np.empty(LANES, np.float32)
        for r in range(t * ROWS_PER_TASK, min(rows, (t + 1) * ROWS_PER_TASK)):
            xr = x[r]
            orow = out[r]
            if use_w:
                sigma2 = row_sigma2(xr)
                for b in range(0, nb, LANES):
                    _quantize_group_impl(xr, b * QK, min(LANES, nb - b), imatrix, sigma2, ws, Lg, scales, mins,
                                         orow, b * BLOCK_BYTES)
            elif not _quantize_row_ref(xr, orow, q):
                for b in range(nb):
                    _quantize_block_ref(xr, b * QK, orow, b * BLOCK_BYTES)


@njit(cache=True, parallel=True, error_model="numpy")
def quantize_rows_screened(x, out, bad):
    """quantize_rows without an imatrix, fused with the API's NaN/Inf screen: bad[r] = True when row r holds
    a NaN or an Inf (its bytes are then meaningless). The screen costs nothing on rows the vectorised path
    accepts (it rejects every row with a NaN or an Inf); only rejected rows are scanned."""
    rows, n = x.shape
    nb = n // QK
    ntask = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for t in prange(ntask):
        q = np.empty(n, np.int32)
        for r in range(t * ROWS_PER_TASK, min(rows, (t + 1) * ROWS_PER_TASK)):
            xr = x[r]
            orow = out[r]
            if not _quantize_row_ref(xr, orow, q):
                if has_nonfinite(xr):
                    bad[r] = True
                else:
                    for b in range(nb):
                        _quantize_block_ref(xr, b * QK, orow, b * BLOCK_BYTES)


@njit(cache=True, parallel=True, error_model="numpy")
def dequantize_rows(data, out):
    nb = out.shape[1] // QK
    for r in prange(out.shape[0]):
        dr = data[r]
        yr = out[r]
        for b in range(nb):
            _dequantize_block_at(dr, b * BLOCK_BYTES, yr, b * QK)

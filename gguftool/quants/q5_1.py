"""Q5_1: blocks of 32 weights as 5-bit unsigned levels with an fp16 scale and an fp16 minimum (24 bytes).

Mirrors quantize_row_q5_1_ref (no imatrix), quantize_row_q5_1_impl (imatrix: importance-weighted
make_qkx3_quants search) and dequantize_row_q5_1 of ggml-quants.c.

Block layout (ggml-common.h block_q5_1):
    d   fp16       bytes 0..1    scale
    m   fp16       bytes 2..3    minimum; x ~= d * q + m
    qh  u32 (LE)   bytes 4..7    bit j: 5th bit of element j (j < 16 low half, j + 16 high half)
    qs  u8[16]     bytes 8..23   low nibble: element j, high nibble: element j + 16 (low 4 bits each)
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .bits import F32, FLT_MAX, U64, get_fp16, get_u32, put_fp16, put_u32
from .legacy import QK, ROWS_PER_TASK, block_minmax, block_weights, c_uint8, has_nonfinite, row_sigma2
from .search_affine import SCRATCH_PER_ELEM, make_qkx3_quants
from .search_lanes import legacy_qkx3_lanes, qkx_workspace

GGML_TYPE = GGMLType.Q5_1
USES_IMATRIX = True
BLOCK_BYTES = 24


# --- packing shared by both paths
@njit(cache=True, inline="always")
def pack_block(q, qo, out, o):
    """Levels q[qo:qo+32] (0..31, or C's wrapped values) into qs nibbles and the qh bit field."""
    qh = 0
    for j in range(QK // 2):
        xi0 = np.int64(q[U64(qo + j)]) & 0xFF
        xi1 = np.int64(q[U64(qo + j + 16)]) & 0xFF
        out[U64(o + 8 + j)] = ((xi0 & 0x0F) | ((xi1 & 0x0F) << 4)) & 0xFF
        qh |= ((xi0 & 0x10) >> 4) << j
        qh |= ((xi1 & 0x10) >> 4) << (j + QK // 2)
    put_u32(out, o + 4, qh)


# --- reference path
@njit(cache=True, error_model="numpy")
def _quantize_block_ref(x, off, out, o, qb):
    """quantize_row_q5_1_ref for one block, every C conversion emulated (any input, including NaN/Inf).
    Note: the reference has no MIN(31, ...) clamp here. qb: int32[32] scratch."""
    mn = FLT_MAX
    mx = -FLT_MAX
    for j in range(QK):
        v = x[off + j]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    d = (mx - mn) / F32(31.0)
    idd = F32(1.0) / d if d != 0 else F32(0.0)
    put_fp16(out, o, d)
    put_fp16(out, o + 2, mn)
    for j in range(QK):
        qb[j] = c_uint8((x[off + j] - mn) * idd + F32(0.5))
    pack_block(qb, 0, out, o)


@njit(cache=True, error_model="numpy")
def _quantize_row_ref(xr, orow, q):
    """quantize_row_q5_1_ref over a whole row in one pass that vectorises (see q4_1._quantize_row_ref): per
    block min/max and scale, then the levels (x - min)*id + 0.5 truncated and packed straight into qs and qh
    (q: unused scratch, kept for the drivers' signature). Valid while d and 1/d are finite, so the levels lie
    in [0, 32) and the C cast truncates, no block has a zero as its min or max, and no level is negative
    (NaN). False: use the scalar path."""
    n = xr.size
    nb = n // QK
    ok = True  # accumulated, not an early exit: an exit in this loop stops LLVM from unrolling it
    neg = np.int32(0)  # OR of all levels: the sign bit flags a NaN
    for b in range(nb):
        base = b * QK
        o = b * BLOCK_BYTES
        mn, mx = block_minmax(xr, base)
        d = (mx - mn) / F32(31.0)
        idd = F32(1.0) / d if d != 0 else F32(0.0)
        ok &= (mn != 0) & (mx != 0) & (abs(d) < np.inf) & (abs(idd) < np.inf)
        put_fp16(orow, o, d)
        put_fp16(orow, o + 2, mn)
        qh = np.uint32(0)
        for j in range(QK // 2):  # garbage when not ok: the row is then redone by the scalar path
            v0 = np.int32((xr[U64(base + j)] - mn) * idd + F32(0.5))
            v1 = np.int32((xr[U64(base + QK // 2 + j)] - mn) * idd + F32(0.5))
            neg = np.int32(neg | v0 | v1)  # kept int32: an int64 accumulator blocks the vectoriser
            orow[U64(o + 8 + j)] = np.uint8(((v0 & 0x0F) | ((v1 & 0x0F) << 4)) & 0xFF)
            qh = np.uint32(qh | (np.uint32((v0 >> 4) & 1) << np.uint32(j))
                           | (np.uint32((v1 >> 4) & 1) << np.uint32(j + QK // 2)))
        put_u32(orow, o + 4, qh)
    return ok & (neg >= 0)


# --- importance path
@njit(cache=True, inline="always", error_model="numpy")
def _quantize_block_impl(x, off, qw, sigma2, weight, L, Laux, fs, out, o):
    """One block of quantize_row_q5_1_impl: make_qkx3_quants(32, 31, -0.9, 0.05, 36 steps, squared error)."""
    block_weights(x, qw, off, sigma2, weight)
    d, the_min = make_qkx3_quants(QK, 31, x[off:off + QK], weight, L, Laux, -0.9, 0.05, 36, False, fs)
    put_fp16(out, o, d)
    put_fp16(out, o + 2, -the_min)
    pack_block(L, 0, out, o)


# Lanes: the make_qkx3_quants searches of up to LANES consecutive blocks of a row side by side (search_lanes).
LANES = 8
_NW = qkx_workspace(QK, LANES)


@njit(cache=True, inline="always", error_model="numpy")
def _quantize_group_impl(x, off, nl, qw, sigma2, ws, L, scales, mins, out, o):
    """Blocks off/QK .. off/QK + nl - 1 (nl <= LANES) of quantize_row_q5_1_impl at once: the same weights and
    make_qkx3_quants(32, 31, -0.9, 0.05, 36 steps, squared error) per block, run as lanes; bit-identical
    with _quantize_block_impl on each block. ws: float32[_NW]; L: uint8[QK*LANES]; scales, mins: float32[LANES]."""
    legacy_qkx3_lanes(x, off, nl, qw, sigma2, ws, L, scales, mins, QK, LANES, 31)
    for j in range(nl):
        ob = o + BLOCK_BYTES * j
        put_fp16(out, ob, scales[j])
        put_fp16(out, ob + 2, -mins[j])
        pack_block(L, QK * j, out, ob)


# --- dequantization
@njit(cache=True, inline="always", error_model="numpy")
def _dequantize_block_at(data, o, y, off):
    d = get_fp16(data, o)
    m = get_fp16(data, o + 2)
    qh = np.int64(get_u32(data, o + 4))
    for j in range(QK // 2):
        q = np.int32(data[U64(o + 8 + j)])
        xh0 = ((qh >> j) << 4) & 0x10
        xh1 = (qh >> (j + 12)) & 0x10
        y[U64(off + j)] = F32((q & 0x0F) | xh0) * d + m
        y[U64(off + j + QK // 2)] = F32((q >> 4) | xh1) * d + m


# --- block functions (the registry's convention). The row drivers call the offset forms above directly on
# whole rows, which saves a view per 32-element block.
@njit(cache=True, error_model="numpy")
def make_scratch():
    """weight float32[32], L and Laux uint8[32], fs float32 (the importance search), row float32[1] (sigma2),
    qb int32[32] (the reference levels)."""
    return (np.empty(QK, np.float32), np.empty(QK, np.uint8), np.empty(QK, np.uint8),
            np.empty(SCRATCH_PER_ELEM * QK, np.float32), np.zeros(1, np.float32), np.empty(QK, np.int32))


@njit(cache=True, error_model="numpy")
def prepare_row(x, qw, s):
    """sigma2 = mean of x^2 over the row, which quantize_row_q5_1_impl weights every element with."""
    if qw.size > 0:
        s[4][0] = row_sigma2(x)


@njit(cache=True, error_model="numpy")
def quantize_block(x, qw, y, s):
    weight, L, Laux, fs, row, qb = s
    if qw.size > 0:
        _quantize_block_impl(x, 0, qw, row[0], weight, L, Laux, fs, y, 0)
    else:
        _quantize_block_ref(x, 0, y, 0, qb)


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
                    _quantize_block_ref(xr, b * QK, orow, b * BLOCK_BYTES, q)


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
                        _quantize_block_ref(xr, b * QK, orow, b * BLOCK_BYTES, q)


@njit(cache=True, parallel=True, error_model="numpy")
def dequantize_rows(data, out):
    nb = out.shape[1] // QK
    for r in prange(out.shape[0]):
        dr = data[r]
        yr = out[r]
        for b in range(nb):
            _dequantize_block_at(dr, b * BLOCK_BYTES, yr, b * QK)

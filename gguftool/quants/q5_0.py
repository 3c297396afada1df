"""Q5_0: blocks of 32 weights as 5-bit signed levels with one fp16 scale (22 bytes).

Mirrors quantize_row_q5_0_ref (no imatrix), quantize_row_q5_0_impl (imatrix: importance-weighted
make_qx_quants search) and dequantize_row_q5_0 of ggml-quants.c.

Block layout (ggml-common.h block_q5_0):
    d   fp16       bytes 0..1    scale; x ~= d * (q - 16)
    qh  u32 (LE)   bytes 2..5    bit j: 5th bit of element j (j < 16 low half, j + 16 high half)
    qs  u8[16]     bytes 6..21   low nibble: element j, high nibble: element j + 16 (low 4 bits each)
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .bits import F32, U64, get_fp16, get_u32, put_fp16, put_u32
from .legacy import QK, ROWS_PER_TASK, block_weights, c_int8, first_absmax, has_nonfinite, row_sigma2
from .search_symmetric import NT, make_qx_quants_w

GGML_TYPE = GGMLType.Q5_0
USES_IMATRIX = True
BLOCK_BYTES = 22


# --- packing shared by both paths
@njit(cache=True, inline="always")
def pack_block(q, qo, out, o):
    """Levels q[qo:qo+32] (0..31, or C's wrapped values) into qs nibbles and the qh bit field."""
    qh = 0
    for j in range(QK // 2):
        xi0 = np.int64(q[U64(qo + j)]) & 0xFF
        xi1 = np.int64(q[U64(qo + j + 16)]) & 0xFF
        out[U64(o + 6 + j)] = ((xi0 & 0x0F) | ((xi1 & 0x0F) << 4)) & 0xFF
        qh |= ((xi0 & 0x10) >> 4) << j
        qh |= ((xi1 & 0x10) >> 4) << (j + QK // 2)
    put_u32(out, o + 2, qh)


# --- reference path
@njit(cache=True, error_model="numpy")
def _quantize_block_ref(x, off, out, o, qb):
    """quantize_row_q5_0_ref for one block, every C conversion emulated (any input, including NaN/Inf).
    qb: int32[32] scratch."""
    amax = F32(0.0)
    mx = F32(0.0)
    for j in range(QK):
        v = x[off + j]
        if amax < abs(v):
            amax = abs(v)
            mx = v
    d = mx / F32(-16.0)
    idd = F32(1.0) / d if d != 0 else F32(0.0)
    put_fp16(out, o, d)
    for j in range(QK):
        xi = c_int8(x[off + j] * idd + F32(16.5))
        qb[j] = 31 if 31 < xi else xi  # (uint8_t) MIN(31, (int8_t)...): the low byte is taken when packing
    pack_block(qb, 0, out, o)


@njit(cache=True, error_model="numpy")
def _quantize_row_ref(xr, orow, q):
    """quantize_row_q5_0_ref over a whole row in vectorisable passes (see q4_0._quantize_row_ref): valid while
    1/d is finite, so that x*id + 16.5 lies in (0, 33) and the C cast truncates. False: use the scalar path;
    also returned for every row holding a NaN or an Inf (quantize_rows_screened relies on it)."""
    n = xr.size
    nb = n // QK
    ok = True  # accumulated, not an early exit: an exit in this loop stops LLVM from unrolling it
    neg = np.int32(0)  # OR of all levels: the sign bit flags a NaN (INT32_MIN; x*id + 16.5 > 0 otherwise)
    for b in range(nb):
        base = b * QK
        mx, amax = first_absmax(xr, base)
        d = mx / F32(-16.0)
        idd = F32(1.0) / d if d != 0 else F32(0.0)
        ok &= (abs(idd) < np.inf) & (amax < np.inf)
        put_fp16(orow, b * BLOCK_BYTES, d)
        for j in range(QK):  # garbage when not ok: the row is then redone by the scalar path
            v = np.int32(xr[U64(base + j)] * idd + F32(16.5))
            neg = np.int32(neg | v)  # kept int32: an int64 accumulator blocks the vectoriser
            q[U64(base + j)] = v if v < 31 else 31
    if not ok or neg < 0:
        return False
    for b in range(nb):
        pack_block(q, b * QK, orow, b * BLOCK_BYTES)
    return True


# --- importance path
@njit(cache=True, inline="always", error_model="numpy")
def _quantize_block_impl(x, off, qw, sigma2, weight, L, work, out, o):
    """One block of quantize_row_q5_0_impl: weights qw*sqrt(sigma2 + x^2), make_qx_quants(32, 16, rmse 1)."""
    block_weights(x, qw, off, sigma2, weight)
    d = make_qx_quants_w(QK, 16, x, off, L, 0, weight, work)
    put_fp16(out, o, d)
    pack_block(L, 0, out, o)


# --- dequantization
@njit(cache=True, inline="always", error_model="numpy")
def _dequantize_block_at(data, o, y, off):
    d = get_fp16(data, o)
    qh = np.int64(get_u32(data, o + 2))
    for j in range(QK // 2):
        q = np.int32(data[U64(o + 6 + j)])
        xh0 = ((qh >> j) << 4) & 0x10
        xh1 = (qh >> (j + 12)) & 0x10
        y[U64(off + j)] = F32(((q & 0x0F) | xh0) - 16) * d
        y[U64(off + j + QK // 2)] = F32(((q >> 4) | xh1) - 16) * d


# --- block functions (the registry's convention). The row drivers call the offset forms above directly on
# whole rows, which saves a view per 32-element block.
@njit(cache=True, error_model="numpy")
def make_scratch():
    """weight float32[32], L int8[32], work float32[3*NT] (the importance search), row float32[1] (sigma2),
    qb int32[32] (the reference levels)."""
    return (np.empty(QK, np.float32), np.empty(QK, np.int8), np.empty(3 * NT, np.float32),
            np.zeros(1, np.float32), np.empty(QK, np.int32))


@njit(cache=True, error_model="numpy")
def prepare_row(x, qw, s):
    """sigma2 = mean of x^2 over the row, which quantize_row_q5_0_impl weights every element with."""
    if qw.size > 0:
        s[3][0] = row_sigma2(x)


@njit(cache=True, error_model="numpy")
def quantize_block(x, qw, y, s):
    weight, L, work, row, qb = s
    if qw.size > 0:
        _quantize_block_impl(x, 0, qw, row[0], weight, L, work, y, 0)
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
        weight = np.empty(QK, np.float32)
        L = np.empty(QK, np.int8)
        work = np.empty(3 * NT, np.float32)
        for r in range(t * ROWS_PER_TASK, min(rows, (t + 1) * ROWS_PER_TASK)):
            xr = x[r]
            orow = out[r]
            if use_w:
                sigma2 = row_sigma2(xr)
                for b in range(nb):
                    _quantize_block_impl(xr, b * QK, imatrix, sigma2, weight, L, work, orow, b * BLOCK_BYTES)
            elif not _quantize_row_ref(xr, orow, q):
                for b in range(nb):
                    _quantize_block_ref(xr, b * QK, orow, b * BLOCK_BYTES, q)


@njit(cache=True, parallel=True, error_model="numpy")
def quantize_rows_screened(x, out, bad):
    """quantize_rows without an imatrix, fused with the API's NaN/Inf screen: bad[r] = True when row r holds
    a NaN or an Inf (its bytes are then meaningless). The vectorised path rejects every such row, so only
    rejected rows are scanned."""
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

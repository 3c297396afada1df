"""IQ3_S: 3.4375 bpw; 256-blocks of 8 sub-blocks of 32, each 8 groups of four on a 512-point D4 lattice.

Mirrors ggml-quants.c quantize_iq3_s / quantize_row_iq3_s_impl (block size 32; the same function with and
without an importance matrix; without one the weights are x^2, with one qw * sqrt(sigma2 + x^2)) and
dequantize_row_iq3_s. The lattice tables are iq3_grids.py's (iq3xs_init_impl(512)), the per-sub-block scale
search iq3_search.py's.

Block layout (110 bytes):
    d           fp16 super-block scale (max sub-block scale / 31 * 1.033)
    qs[64]      low 8 bits of the grid indices (0..511), eight per sub-block
    qh[8]       bit k of qh[ib]: bit 8 of the grid index of group k of sub-block ib
    signs[32]   one byte per eight values (bit i: value i negated)
    scales[4]   two 4-bit sub-block scales l per byte (low nibble: even sub-block):
                    x ~= d * (1 + 2l) * grid value * sign
A quirk kept for byte identity: the reference advances its qs and signs cursors only after a sub-block that
is not all zero, so after an all-zero sub-block the next sub-blocks' qs/signs land 8/4 bytes earlier
(qh is indexed by sub-block and does not move); the last slots stay zero.

Where llama.cpp aborts (GGML_ASSERT inside the search: overflowing weighted distances, values ~1e13 and
up), quantize_rows raises QuantError naming the row instead of writing bytes.
The type-module interface of registry.py; x must be finite (the API screens it).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..errors import QuantError
from ..gguf.constants import GGMLType
from .bits import F32, get_fp16, nearest_int_c, put_fp16
from .blocks import no_row_state
from .iq3_grids import DEQUANT_GRID_S, GRID_S, SEARCH_S
from .iq3_search import make_search_scratch, search_sub_block
from .lattice_glue import raise_first_flagged

GGML_TYPE = GGMLType.IQ3_S
USES_IMATRIX = True

QK_K = 256
BLOCK_BYTES = 110
_OFF_QS = 2
_OFF_QH = 66
_OFF_SIGNS = 74
_OFF_SCALES = 106


# --- one block
@njit(cache=True, error_model="numpy")
def _quantize_block(x, qw, y, weight, waux, xval, w, scales, signs, grid, kmap, neighbours, nvalues):
    """quantize_row_iq3_s_impl on one 256-block: x float32[256], qw float32[256] or empty (no imatrix),
    y uint8[110]. Returns False where llama.cpp aborts (y is then meaningless)."""
    for i in range(BLOCK_BYTES):
        y[i] = 0
    sumx2 = F32(0.0)
    for i in range(QK_K):
        sumx2 = F32(sumx2 + F32(x[i] * x[i]))
    sigma2 = F32(F32(F32(2.0) * sumx2) / F32(QK_K))
    use_w = qw.size > 0
    max_scale = F32(0.0)
    qs = _OFF_QS            # the reference's qs and signs cursors (see the module note)
    sg = _OFF_SIGNS
    for ib in range(8):
        o = 32 * ib
        if use_w:
            for i in range(32):
                xi = x[o + i]
                weight[i] = F32(qw[o + i] * F32(np.sqrt(F32(sigma2 + F32(xi * xi)))))
        else:
            for i in range(32):
                weight[i] = F32(x[o + i] * x[o + i])
        for i in range(32):
            waux[i] = F32(np.sqrt(weight[i]))
        for k in range(4):
            s = 0
            for i in range(8):
                v = x[o + 8 * k + i]
                if v >= 0:
                    xval[8 * k + i] = v
                else:
                    xval[8 * k + i] = -v
                    s |= 1 << i
            signs[k] = s
        mx = xval[0]
        for i in range(1, 32):
            v = xval[i]
            mx = mx if mx > v else v
        if not mx:
            scales[ib] = 0
            continue
        scale, ok = search_sub_block(xval, weight, waux, w, grid, kmap, neighbours, nvalues, 9, True)
        if not ok:
            return False
        L = w.L
        if scale < 0:
            scale = -scale
            for k in range(4):
                signs[k] = (~signs[k]) & 255
        for k in range(8):
            u = 0
            for i in range(4):
                u |= np.int64(L[4 * k + i]) << (3 * i)
            gi = kmap[u]                                # a grid point: search_sub_block only leaves those
            y[qs + k] = gi & 255
            y[_OFF_QH + ib] |= (gi >> 8) << k
        qs += 8
        for k in range(4):
            y[sg + k] = signs[k]
        sg += 4
        if not scale >= 0:                              # GGML_ASSERT(scale >= 0): NaN
            return False
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale

    if not max_scale:
        return True
    d = F32(max_scale / F32(31.0))
    put_fp16(y, 0, F32(d * F32(1.033)))
    id_ = F32(F32(1.0) / d)
    for ib in range(0, 8, 2):
        l1 = nearest_int_c(F32(F32(0.5) * F32(F32(id_ * scales[ib]) - F32(1.0))))
        l1 = max(0, min(15, l1))
        l2 = nearest_int_c(F32(F32(0.5) * F32(F32(id_ * scales[ib + 1]) - F32(1.0))))
        l2 = max(0, min(15, l2))
        y[_OFF_SCALES + ib // 2] = l1 | (l2 << 4)
    return True


def make_scratch():
    """One thread's scratch: the block's working arrays, the search's (iq3_search.SearchScratch), the tables."""
    return (np.empty(32, np.float32), np.empty(32, np.float32), np.empty(32, np.float32), make_search_scratch(),
            np.empty(8, np.float32), np.empty(4, np.uint8), GRID_S, *SEARCH_S)


prepare_row = no_row_state


@njit(cache=True, error_model="numpy")
def _quantize_block_s(x, qw, y, s):
    weight, waux, xval, w, scales, signs, grid, kmap, neighbours, nvalues = s
    return _quantize_block(x, qw, y, weight, waux, xval, w, scales, signs, grid, kmap, neighbours, nvalues)


def quantize_block(x, qw, y, s):
    """quantize_row_iq3_s_impl for one block (qw: the block's 256 importance weights, or empty for none):
    x float32[256] -> y uint8[110]. QuantError where llama.cpp aborts."""
    if not _quantize_block_s(x, qw, y, s):
        raise QuantError("IQ3_S: llama.cpp aborts on this block (its lattice search overflows float32)")


@njit(cache=True, error_model="numpy")
def _dequantize_block(blk, y, dgrid):
    d = get_fp16(blk, 0)
    for ib in range(8):
        sc = np.int64(blk[_OFF_SCALES + ib // 2])
        sc = (sc & 0xF) if ib % 2 == 0 else (sc >> 4)
        db = F32(d * F32(1 + 2 * sc))
        qh = np.int64(blk[_OFF_QH + ib])
        for l in range(4):
            signs = np.int64(blk[_OFF_SIGNS + 4 * ib + l])
            for h in range(2):
                g = np.int64(blk[_OFF_QS + 8 * ib + 2 * l + h]) | (((qh >> (2 * l + h)) & 1) << 8)
                for j in range(4):
                    v = F32(db * F32(dgrid[g, j]))
                    y[32 * ib + 8 * l + 4 * h + j] = -v if (signs >> (4 * h + j)) & 1 else v


@njit(cache=True, error_model="numpy")
def dequantize_block(blk, y):
    """dequantize_row_iq3_s for one block: blk uint8[110] -> y float32[256]."""
    _dequantize_block(blk, y, DEQUANT_GRID_S)


# --- row drivers
@njit(cache=True, parallel=True, error_model="numpy")
def _quantize_rows(x, imatrix, out, failed, grid, kmap, neighbours, nvalues):
    nrows = x.shape[0]
    nb = x.shape[1] // QK_K
    use_w = imatrix.size > 0
    for r in prange(nrows):
        weight = np.empty(32, np.float32)
        waux = np.empty(32, np.float32)
        xval = np.empty(32, np.float32)
        w = make_search_scratch()
        scales = np.empty(8, np.float32)
        signs = np.empty(4, np.uint8)
        for b in range(nb):
            xb = x[r, b * QK_K:(b + 1) * QK_K]
            qw = imatrix[b * QK_K:(b + 1) * QK_K] if use_w else imatrix
            if not _quantize_block(xb, qw, out[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], weight, waux, xval, w,
                                   scales, signs, grid, kmap, neighbours, nvalues):
                failed[r] = True


def _aborts(r: int, _code: int) -> str:
    return f"row {r}: llama.cpp aborts quantizing it to IQ3_S (its lattice search overflows float32 on values " \
           f"this large)"


def quantize_rows(x, imatrix, out):
    """quantize_iq3_s: x float32 (rows, n) -> out uint8 (rows, n/256*110); imatrix empty for none.
    QuantError naming the first row on which llama.cpp's search aborts."""
    failed = np.zeros(x.shape[0], np.bool_)
    _quantize_rows(x, imatrix, out, failed, GRID_S, *SEARCH_S)
    raise_first_flagged(failed, _aborts)


quantize_rows_screened = None  # no fused NaN/Inf screen: the API screens first (see registry)


@njit(cache=True, parallel=True, error_model="numpy")
def _dequantize_rows(data, out, dgrid):
    nrows = data.shape[0]
    nb = out.shape[1] // QK_K
    for r in prange(nrows):
        for b in range(nb):
            _dequantize_block(data[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], out[r, b * QK_K:(b + 1) * QK_K], dgrid)


def dequantize_rows(data, out):
    _dequantize_rows(data, out, DEQUANT_GRID_S)

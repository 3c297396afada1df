"""IQ3_XXS: 3.0625 bpw; 256-blocks of 8 sub-blocks of 32, each 8 groups of four on a 256-point D4 lattice.

Mirrors ggml-quants.c quantize_row_iq3_xxs_impl(256, ...) (quantize_iq3_xxs: the same function with and
without an importance matrix; without one the weights are x^2, with one qw * sqrt(sigma2 + x^2)) and
dequantize_row_iq3_xxs. The lattice tables are iq3_grids.py's (iq3xs_init_impl), the per-sub-block scale
search iq3_search.py's.

Block layout (98 bytes):
    d           fp16 super-block scale (max sub-block scale / 31 * 1.0125)
    qs[64]      grid index (0..255) of group k of sub-block ib at qs[8*ib + k]
    sas[8]      one little-endian uint32 per sub-block ib at byte 66 + 4*ib:
                  bits 0..27  four 7-bit sign fields, group pair j at bits 7j (bit i: element 8j+i negated;
                              the eighth sign is implied: an even number of the eight is negative)
                  bits 28..31 the sub-block scale l:  x ~= d * (0.5 + l) * 0.5 * grid value * sign
    The grid values of dequantization are ggml-common.h's iq3xxs_grid (4, 12, ..., 52, 62 per coordinate).

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
from .iq3_grids import DEQUANT_GRID_XXS, GRID_XXS, SEARCH_XXS
from .iq3_search import make_search_scratch, search_sub_block
from .lattice_glue import raise_first_flagged

GGML_TYPE = GGMLType.IQ3_XXS
USES_IMATRIX = True

QK_K = 256
BLOCK_BYTES = 98
_OFF_QS = 2
_OFF_SAS = 66
GROUP_MAX_EPS_IQ3_XXS = F32(1e-8)


# --- one block
@njit(cache=True, error_model="numpy")
def _quantize_block(x, qw, y, weight, waux, xval, w, scales, signs, sas, grid, kmap, neighbours, nvalues):
    """quantize_row_iq3_xxs_impl on one 256-block: x float32[256], qw float32[256] or empty (no imatrix),
    y uint8[98]. Returns False where llama.cpp aborts (y is then meaningless)."""
    for i in range(BLOCK_BYTES):
        y[i] = 0
    for ib in range(8):
        sas[ib] = 0
    sumx2 = F32(0.0)
    for i in range(QK_K):
        sumx2 = F32(sumx2 + F32(x[i] * x[i]))
    sigma2 = F32(F32(F32(2.0) * sumx2) / F32(QK_K))
    use_w = qw.size > 0
    max_scale = F32(0.0)
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
            nflip = 0
            s = 0
            for i in range(8):
                v = x[o + 8 * k + i]
                if v >= 0:
                    xval[8 * k + i] = v
                else:
                    xval[8 * k + i] = -v
                    nflip += 1
                    s |= 1 << i
            if nflip % 2:
                # an odd count: the element costing least (w*x^2) keeps its sign flipped the other way
                v = x[o + 8 * k]
                imin = 0
                mn = F32(F32(weight[8 * k] * v) * v)
                for i in range(1, 8):
                    v = x[o + 8 * k + i]
                    ax = F32(F32(weight[8 * k + i] * v) * v)
                    if ax < mn:
                        mn = ax
                        imin = i
                xval[8 * k + imin] = -xval[8 * k + imin]
                s ^= 1 << imin
            signs[k] = s & 127
        mx = xval[0]
        for i in range(1, 32):
            v = xval[i]
            mx = mx if mx > v else v
        if mx < GROUP_MAX_EPS_IQ3_XXS:
            scales[ib] = 0
            continue
        scale, ok = search_sub_block(xval, weight, waux, w, grid, kmap, neighbours, nvalues, 15, False)
        if not ok:
            return False
        L = w.L
        if scale < 0:
            scale = -scale
            for k in range(4):
                signs[k] = (~signs[k]) & 127
        for k in range(8):
            u = 0
            for i in range(4):
                u |= np.int64(L[4 * k + i]) << (3 * i)
            y[_OFF_QS + 8 * ib + k] = kmap[u]      # a grid point: search_sub_block only leaves those
        sas[ib] = np.uint32(signs[0]) | (np.uint32(signs[1]) << 7) | (np.uint32(signs[2]) << 14) | \
            (np.uint32(signs[3]) << 21)
        if not scale >= 0:                          # GGML_ASSERT(scale >= 0): NaN
            return False
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale

    if not max_scale:
        for i in range(BLOCK_BYTES):
            y[i] = 0
        return True
    d = F32(max_scale / F32(31.0))
    put_fp16(y, 0, F32(d * F32(1.0125)))
    id_ = F32(F32(1.0) / d)
    for ib in range(8):
        l = nearest_int_c(F32(F32(0.5) * F32(F32(id_ * scales[ib]) - F32(1.0))))
        l = max(0, min(15, l))
        v = sas[ib] | (np.uint32(l) << 28)
        for b in range(4):
            y[_OFF_SAS + 4 * ib + b] = (v >> (8 * b)) & 0xFF
    return True


def make_scratch():
    """One thread's scratch: the block's working arrays, the search's (iq3_search.SearchScratch), the tables."""
    return (np.empty(32, np.float32), np.empty(32, np.float32), np.empty(32, np.float32), make_search_scratch(),
            np.empty(8, np.float32), np.empty(8, np.uint8), np.empty(8, np.uint32), GRID_XXS, *SEARCH_XXS)


prepare_row = no_row_state


@njit(cache=True, error_model="numpy")
def _quantize_block_s(x, qw, y, s):
    weight, waux, xval, w, scales, signs, sas, grid, kmap, neighbours, nvalues = s
    return _quantize_block(x, qw, y, weight, waux, xval, w, scales, signs, sas, grid, kmap, neighbours, nvalues)


def quantize_block(x, qw, y, s):
    """quantize_row_iq3_xxs_impl for one block (qw: the block's 256 importance weights, or empty for none):
    x float32[256] -> y uint8[98]. QuantError where llama.cpp aborts."""
    if not _quantize_block_s(x, qw, y, s):
        raise QuantError("IQ3_XXS: llama.cpp aborts on this block (its lattice search overflows float32)")


@njit(cache=True, error_model="numpy")
def dequantize_block(blk, y):
    """dequantize_row_iq3_xxs for one block: blk uint8[98] -> y float32[256]."""
    _dequantize_block(blk, y, DEQUANT_GRID_XXS)


@njit(cache=True, error_model="numpy")
def _dequantize_block(blk, y, dgrid):
    d = get_fp16(blk, 0)
    for ib in range(8):
        o = _OFF_SAS + 4 * ib
        aux = np.uint32(blk[o]) | (np.uint32(blk[o + 1]) << 8) | (np.uint32(blk[o + 2]) << 16) | \
            (np.uint32(blk[o + 3]) << 24)
        db = F32(F32(d * F32(F32(0.5) + F32(aux >> 28))) * F32(0.5))
        for l in range(4):
            s7 = (aux >> (7 * l)) & 127
            # ksigns_iq2xs: the eighth sign bit makes the count of set bits even
            par = s7 ^ (s7 >> 4)
            par ^= par >> 2
            par ^= par >> 1
            signs = s7 | ((par & 1) << 7)
            for h in range(2):
                g = blk[_OFF_QS + 8 * ib + 2 * l + h]
                for j in range(4):
                    v = F32(db * F32(dgrid[g, j]))
                    y[32 * ib + 8 * l + 4 * h + j] = -v if (signs >> (4 * h + j)) & 1 else v


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
        signs = np.empty(8, np.uint8)
        sas = np.empty(8, np.uint32)
        for b in range(nb):
            xb = x[r, b * QK_K:(b + 1) * QK_K]
            qw = imatrix[b * QK_K:(b + 1) * QK_K] if use_w else imatrix
            if not _quantize_block(xb, qw, out[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], weight, waux, xval, w,
                                   scales, signs, sas, grid, kmap, neighbours, nvalues):
                failed[r] = True


def _aborts(r: int, _code: int) -> str:
    return f"row {r}: llama.cpp aborts quantizing it to IQ3_XXS (its lattice search overflows float32 on values " \
           f"this large)"


def quantize_rows(x, imatrix, out):
    """quantize_iq3_xxs: x float32 (rows, n) -> out uint8 (rows, n/256*98); imatrix empty for none.
    QuantError naming the first row on which llama.cpp's search aborts."""
    failed = np.zeros(x.shape[0], np.bool_)
    _quantize_rows(x, imatrix, out, failed, GRID_XXS, *SEARCH_XXS)
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
    _dequantize_rows(data, out, DEQUANT_GRID_XXS)

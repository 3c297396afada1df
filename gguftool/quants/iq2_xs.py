"""IQ2_XS: 2.3125 bits per weight. 256-element super-blocks of 16 groups of 16; each 8 values are a point of a
512-point lattice grid (magnitudes) plus 7 sign bits (the 8th makes the count of minus signs even), with a
4-bit scale per group of 16 under an fp16 super-scale. Byte-exact port of ggml-quants.c
quantize_row_iq2_xs_impl (quantize_iq2_xs) and dequantize_row_iq2_xs.

Block layout (74 bytes):
    d       fp16 super-scale
    qs      32 x uint16 little-endian, one per 8 values: bits 0..8 grid index, bits 9..15 the 7 sign bits
    scales  8 bytes: group 2j in the low nibble of byte j, group 2j+1 in the high nibble
            (group scale = d * (0.5 + s) * 0.25)

llama.cpp requires an importance matrix for IQ2_XS (ggml_quantize_chunk asserts one): quantize_rows raises
QuantError without it, and on the inputs the reference aborts on (overflowing values).

The type-module interface of registry.py, with make_scratch, quantize_block and quantize_rows in Python (the
lattice tables of iq_grids_2 and the error reporting), as in iq2_xxs.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from gguftool.gguf.constants import GGMLType
from gguftool.quants import iq_grids_2 as grids
from gguftool.quants.lattice_glue import LatticeKernels
from gguftool.quants.bits import GROUP_MAX_EPS, get_fp16, nearest_int_c, put_fp16
from gguftool.quants.blocks import no_row_state

GGML_TYPE = GGMLType.IQ2_XS
USES_IMATRIX = True
REQUIRES_IMATRIX = True  # ggml_quantize_requires_imatrix

QK_K = 256
BLOCK_BYTES = 74
_OFF_QS = 2
_OFF_SCALES = 66
_KIND = grids.IQ2_XS

_ERR_NO_NEIGHBOUR = 1
_ERR_OFF_GRID = 2
_ERR_SCALE = 3
ERRORS = {
    _ERR_NO_NEIGHBOUR: "no lattice point within reach (llama.cpp's iq2_find_best_neighbour asserts)",
    _ERR_OFF_GRID: "a point off the lattice grid (llama.cpp aborts)",
    _ERR_SCALE: "a NaN group scale (llama.cpp asserts scale >= 0)",
}

_DGRID = grids.dequant_grid(_KIND)   # numba freezes module-level arrays into the code as constants
_KSIGNS = grids.KSIGNS_IQ2XS


@njit(cache=True)
def _work():
    """scales[16], weight[16], xval[16], waux[16] (float32); L[16], Laux[16] (int32); q2[32] (uint32);
    block_signs[2] (int32); on_grid[2] (bool); tab[SEARCH_SCRATCH] (float32, iq2_find_best_neighbour's scratch)."""
    return (np.zeros(16, np.float32), np.zeros(16, np.float32), np.zeros(16, np.float32), np.zeros(16, np.float32),
            np.zeros(16, np.int32), np.zeros(16, np.int32), np.zeros(32, np.uint32), np.zeros(2, np.int32),
            np.zeros(2, np.bool_), np.zeros(grids.SEARCH_SCRATCH, np.float32))


@njit(cache=True, error_model="numpy")
def _quantize_superblock(x, qw, y, grid, kmap, neigh, work):
    """quantize_row_iq2_xs_impl for one super-block x[256] with weights qw[256] into y[74]; 0 or an error."""
    scales, weight, xval, waux, L, Laux, q2, block_signs, on_grid, tab = work
    for i in range(32):
        q2[i] = 0
    max_scale = np.float32(0.0)
    sumx2 = np.float32(0.0)
    for i in range(QK_K):
        sumx2 += x[i] * x[i]
    sigma2 = sumx2 / np.float32(QK_K)
    for ib in range(16):
        xb = x[16 * ib:16 * ib + 16]
        for i in range(16):
            weight[i] = qw[16 * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i])
        for i in range(16):
            waux[i] = np.sqrt(weight[i])
        for k in range(2):
            nflip = 0
            s = 0
            for i in range(8):
                v = xb[8 * k + i]
                if v >= np.float32(0.0):
                    xval[8 * k + i] = v
                else:
                    xval[8 * k + i] = -v
                    nflip += 1
                    s |= 1 << i
            if nflip % 2:
                imin = 0
                mn = weight[8 * k] * xb[8 * k] * xb[8 * k]
                for i in range(1, 8):
                    ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
                    if ax < mn:
                        mn = ax
                        imin = i
                xval[8 * k + imin] = -xval[8 * k + imin]
                s ^= 1 << imin
            block_signs[k] = s & 127
        scale, st = grids.iq2_search_16(xval, weight, waux, L, Laux, on_grid, grid, kmap, neigh, GROUP_MAX_EPS,
                                        tab)
        if st > 0:
            return st
        if st < 0:
            scales[ib] = np.float32(0.0)
            continue
        if scale < np.float32(0.0):
            scale = -scale
            for k in range(2):
                block_signs[k] = (~block_signs[k]) & 127
        for k in range(2):
            g = kmap[grids.pack_point(L, 8 * k)]
            if g < 0:
                return _ERR_OFF_GRID
            q2[2 * ib + k] = np.uint32(g) | (np.uint32(block_signs[k]) << np.uint32(9))
        if not scale >= np.float32(0.0):
            return _ERR_SCALE
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    for i in range(2, BLOCK_BYTES):
        y[i] = 0
    if max_scale == np.float32(0.0):
        put_fp16(y, 0, np.float32(0.0))
        return 0
    d = max_scale / np.float32(31.0)
    put_fp16(y, 0, d)
    id_ = np.float32(1.0) / d
    for ib in range(16):
        l = nearest_int_c(np.float32(0.5) * (id_ * scales[ib] - np.float32(1.0)))
        l = l if l < 15 else 15
        l = l if l > 0 else 0
        y[_OFF_SCALES + ib // 2] |= np.uint8(l << (4 * (ib % 2)))
    for i in range(32):
        y[_OFF_QS + 2 * i] = q2[i] & np.uint32(0xFF)
        y[_OFF_QS + 2 * i + 1] = q2[i] >> np.uint32(8)
    return 0


@njit(cache=True, parallel=True, error_model="numpy")
def _quantize_rows(x, imatrix, out, grid, kmap, neigh, status):
    nrows = x.shape[0]
    nb = x.shape[1] // QK_K
    for r in prange(nrows):
        work = _work()
        st = 0
        for i in range(nb):
            st = _quantize_superblock(x[r, QK_K * i:QK_K * (i + 1)], imatrix[QK_K * i:QK_K * (i + 1)],
                                      out[r, BLOCK_BYTES * i:BLOCK_BYTES * (i + 1)], grid, kmap, neigh, work)
            if st != 0:
                break
        status[r] = st


@njit(cache=True, error_model="numpy")
def dequantize_block(y, out):
    """dequantize_row_iq2_xs for one block."""
    dgrid = _DGRID
    signs = _KSIGNS
    d = get_fp16(y, 0)
    for ib in range(8):
        sc = int(y[_OFF_SCALES + ib])
        db0 = d * (np.float32(0.5) + np.float32(sc & 0xF)) * np.float32(0.25)
        db1 = d * (np.float32(0.5) + np.float32(sc >> 4)) * np.float32(0.25)
        for l in range(4):
            o = _OFF_QS + 2 * (4 * ib + l)
            q = int(y[o]) | (int(y[o + 1]) << 8)
            g = q & 511
            sg = int(signs[q >> 9])
            db = db0 if l < 2 else db1
            for j in range(8):
                v = db * np.float32(dgrid[g, j])
                out[32 * ib + 8 * l + j] = -v if (sg >> j) & 1 else v


@njit(cache=True, parallel=True, error_model="numpy")
def dequantize_rows(data, out):
    nrows = data.shape[0]
    nb = out.shape[1] // QK_K
    for r in prange(nrows):
        for i in range(nb):
            dequantize_block(data[r, BLOCK_BYTES * i:BLOCK_BYTES * (i + 1)], out[r, QK_K * i:QK_K * (i + 1)])


# --- the registry interface (Python: the tables and the error reporting)
prepare_row = no_row_state
quantize_rows_screened = None  # the API screens NaN/Inf first


_KERNELS = LatticeKernels(GGML_TYPE, _KIND, ERRORS, REQUIRES_IMATRIX, _work, _quantize_superblock, _quantize_rows)
make_scratch = _KERNELS.make_scratch
quantize_block = _KERNELS.quantize_block
quantize_rows = _KERNELS.quantize_rows

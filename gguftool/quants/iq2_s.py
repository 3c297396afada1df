"""IQ2_S: 2.5625 bits per weight. 256-element super-blocks of 16 groups of 16; each 8 values are a point of a
1024-point lattice grid (magnitudes) plus 8 explicit sign bits, with a 4-bit scale per group of 16 under an
fp16 super-scale. Byte-exact port of ggml-quants.c quantize_row_iq2_s_impl (quantize_iq2_s) and
dequantize_row_iq2_s.

Block layout (82 bytes):
    d       fp16 super-scale
    qs      32 bytes: the low 8 bits of each 8-value point's grid index, then 32 bytes of signs (bit j set:
            value j of that point negative)
    qh      8 bytes: byte j holds the high 2 bits of points 4j..4j+3 (2 bits each, point 4j in bits 0..1)
    scales  8 bytes: group 2j in the low nibble of byte j, group 2j+1 in the high nibble
            (group scale = d * (0.5 + s) * 0.25)

llama.cpp accepts IQ2_S without an importance matrix (the weights are then sigma2/4 + x^2): both paths are here.

The type-module interface of registry.py, with make_scratch, quantize_block and quantize_rows in Python (the
lattice tables of iq_grids_2 and the error reporting), as in iq2_xxs.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from gguftool.gguf.constants import GGMLType
from gguftool.quants import iq_grids_2 as grids
from gguftool.quants.lattice_glue import LatticeKernels
from gguftool.quants.bits import get_fp16, nearest_int_c, put_fp16
from gguftool.quants.blocks import no_row_state

GGML_TYPE = GGMLType.IQ2_S
USES_IMATRIX = True
REQUIRES_IMATRIX = False

QK_K = 256
BLOCK_BYTES = 82
_OFF_QS = 2
_OFF_SIGNS = 34
_OFF_QH = 66
_OFF_SCALES = 74
_KIND = grids.IQ2_S
GROUP_MAX_EPS_IQ2_S = np.float32(1e-8)

_ERR_NO_NEIGHBOUR = 1
_ERR_OFF_GRID = 2
_ERR_SCALE = 3
ERRORS = {
    _ERR_NO_NEIGHBOUR: "no lattice point within reach (llama.cpp's iq2_find_best_neighbour asserts)",
    _ERR_OFF_GRID: "a point off the lattice grid (llama.cpp aborts)",
    _ERR_SCALE: "a NaN group scale (llama.cpp asserts scale >= 0)",
}

_DGRID = grids.dequant_grid(_KIND)   # numba freezes module-level arrays into the code as constants


@njit(cache=True)
def _work():
    """scales[16], weight[16], xval[16], waux[16] (float32); L[16], Laux[16] (int32); block_signs[2] (int32);
    on_grid[2] (bool); tab[SEARCH_SCRATCH] (float32, iq2_find_best_neighbour's scratch)."""
    return (np.zeros(16, np.float32), np.zeros(16, np.float32), np.zeros(16, np.float32), np.zeros(16, np.float32),
            np.zeros(16, np.int32), np.zeros(16, np.int32), np.zeros(2, np.int32), np.zeros(2, np.bool_),
            np.zeros(grids.SEARCH_SCRATCH, np.float32))


@njit(cache=True, error_model="numpy")
def _quantize_superblock(x, qw, y, grid, kmap, neigh, work):
    """quantize_row_iq2_s_impl for one super-block x[256] with weights qw[256] (empty: none) into y[82]."""
    scales, weight, xval, waux, L, Laux, block_signs, on_grid, tab = work
    use_qw = qw.size > 0
    for i in range(BLOCK_BYTES):
        y[i] = 0
    max_scale = np.float32(0.0)
    sumx2 = np.float32(0.0)
    for i in range(QK_K):
        sumx2 += x[i] * x[i]
    sigma2 = np.float32(2.0) * sumx2 / np.float32(QK_K)
    for ib in range(16):
        xb = x[16 * ib:16 * ib + 16]
        if use_qw:
            for i in range(16):
                weight[i] = qw[16 * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i])
        else:
            for i in range(16):
                weight[i] = np.float32(0.25) * sigma2 + xb[i] * xb[i]
        for i in range(16):
            waux[i] = np.sqrt(weight[i])
        for k in range(2):
            s = 0
            for i in range(8):
                v = xb[8 * k + i]
                if v >= np.float32(0.0):
                    xval[8 * k + i] = v
                else:
                    xval[8 * k + i] = -v
                    s |= 1 << i
            block_signs[k] = s
        scale, st = grids.iq2_search_16(xval, weight, waux, L, Laux, on_grid, grid, kmap, neigh,
                                        GROUP_MAX_EPS_IQ2_S, tab)
        if st > 0:
            return st
        if st < 0:
            scales[ib] = np.float32(0.0)
            continue
        if scale < np.float32(0.0):
            scale = -scale
            for k in range(2):
                block_signs[k] = (~block_signs[k]) & 255
        for k in range(2):
            g = kmap[grids.pack_point(L, 8 * k)]
            if g < 0:
                return _ERR_OFF_GRID
            i8 = 2 * ib + k
            y[_OFF_QS + i8] = g & 255
            y[_OFF_QH + i8 // 4] |= np.uint8((g >> 8) << (2 * (i8 % 4)))
            y[_OFF_SIGNS + i8] = block_signs[k]
        if not scale >= np.float32(0.0):
            return _ERR_SCALE
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == np.float32(0.0):
        return 0
    d = max_scale / np.float32(31.0)
    put_fp16(y, 0, d * np.float32(0.9875))
    id_ = np.float32(1.0) / d
    for ib in range(16):
        l = nearest_int_c(np.float32(0.5) * (id_ * scales[ib] - np.float32(1.0)))
        l = l if l < 15 else 15
        l = l if l > 0 else 0
        y[_OFF_SCALES + ib // 2] |= np.uint8(l << (4 * (ib % 2)))
    return 0


@njit(cache=True, parallel=True, error_model="numpy")
def _quantize_rows(x, imatrix, out, grid, kmap, neigh, status):
    nrows = x.shape[0]
    nb = x.shape[1] // QK_K
    use_qw = imatrix.size > 0
    for r in prange(nrows):
        work = _work()
        st = 0
        for i in range(nb):
            qw = imatrix[QK_K * i:QK_K * (i + 1)] if use_qw else imatrix[0:0]
            st = _quantize_superblock(x[r, QK_K * i:QK_K * (i + 1)], qw,
                                      out[r, BLOCK_BYTES * i:BLOCK_BYTES * (i + 1)], grid, kmap, neigh, work)
            if st != 0:
                break
        status[r] = st


@njit(cache=True, error_model="numpy")
def dequantize_block(y, out):
    """dequantize_row_iq2_s for one block."""
    dgrid = _DGRID
    d = get_fp16(y, 0)
    for ib in range(8):
        sc = int(y[_OFF_SCALES + ib])
        db0 = d * (np.float32(0.5) + np.float32(sc & 0xF)) * np.float32(0.25)
        db1 = d * (np.float32(0.5) + np.float32(sc >> 4)) * np.float32(0.25)
        qh = int(y[_OFF_QH + ib])
        for l in range(4):
            dl = db0 if l < 2 else db1
            g = int(y[_OFF_QS + 4 * ib + l]) | ((qh << (8 - 2 * l)) & 0x300)
            sg = int(y[_OFF_SIGNS + 4 * ib + l])
            for j in range(8):
                v = dl * np.float32(dgrid[g, j])
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

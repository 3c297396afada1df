"""IQ2_XXS: 2.0625 bits per weight. 256-element super-blocks of 8 groups of 32; each group of 8 values is a
point of a 256-point lattice grid (magnitudes) plus 7 sign bits (the 8th makes the count of minus signs
even), and a 4-bit scale per group under an fp16 super-scale. Byte-exact port of ggml-quants.c
quantize_row_iq2_xxs_impl (quantize_iq2_xxs) and dequantize_row_iq2_xxs.

Block layout (66 bytes):
    d       fp16 super-scale
    qs      8 groups x 2 uint32, little-endian:
              word 0: grid index of the group's four 8-value points, one byte each
              word 1: bits 0..27 four 7-bit sign fields (bit j set: value j negative),
                      bits 28..31 the group's scale s (group scale = d * (0.5 + s) * 0.25)

llama.cpp requires an importance matrix for IQ2_XXS (ggml_quantize_chunk asserts one): quantize_rows raises
QuantError without it. Inputs the reference aborts on (a GGML_ASSERT in the search, only reachable with
overflowing values) raise QuantError naming the row.

The type-module interface of registry.py, except that make_scratch, quantize_block and quantize_rows are
Python functions: they fetch the lattice tables (iq_grids_2, built on first use) and turn a failed search
into QuantError.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from gguftool.gguf.constants import GGMLType
from gguftool.quants import iq_grids_2 as grids
from gguftool.quants.lattice_glue import LatticeKernels
from gguftool.quants.bits import GROUP_MAX_EPS, get_fp16, get_u32, nearest_int_c, put_fp16, put_u32
from gguftool.quants.blocks import no_row_state
from gguftool.quants.search_affine import make_qp_quants

GGML_TYPE = GGMLType.IQ2_XXS
USES_IMATRIX = True
REQUIRES_IMATRIX = True  # ggml_quantize_requires_imatrix

QK_K = 256
BLOCK_BYTES = 66
_KIND = grids.IQ2_XXS

# status codes of the kernels (0: fine)
_ERR_NO_NEIGHBOUR = 1   # iq2_find_best_neighbour found no point (GGML_ASSERT(grid_index >= 0))
_ERR_OFF_GRID = 2       # "Oops: found point not on grid" (GGML_ABORT)
_ERR_SCALE = 3          # GGML_ASSERT(scale >= 0) (a NaN scale)
ERRORS = {
    _ERR_NO_NEIGHBOUR: "no lattice point within reach (llama.cpp's iq2_find_best_neighbour asserts)",
    _ERR_OFF_GRID: "a point off the lattice grid (llama.cpp aborts)",
    _ERR_SCALE: "a NaN group scale (llama.cpp asserts scale >= 0)",
}


_DGRID = grids.dequant_grid(_KIND)   # numba freezes module-level arrays into the code as constants
_KSIGNS = grids.KSIGNS_IQ2XS


@njit(cache=True)
def _work():
    """scales[8], weight[32], xval[32], waux[32] (float32); L[32], Laux[32] (int32); Lqp[32] (uint8: the
    levels make_qp_quants writes, never used afterwards); q2[16] (uint32); block_signs[4] (int32); tab[SEARCH_SCRATCH]
    (float32, iq2_find_best_neighbour's scratch)."""
    return (np.zeros(8, np.float32), np.zeros(32, np.float32), np.zeros(32, np.float32), np.zeros(32, np.float32),
            np.zeros(32, np.int32), np.zeros(32, np.int32), np.zeros(32, np.uint8), np.zeros(16, np.uint32),
            np.zeros(4, np.int32), np.zeros(grids.SEARCH_SCRATCH, np.float32))


@njit(cache=True, error_model="numpy")
def _quantize_superblock(x, qw, y, grid, kmap, neigh, work):
    """quantize_row_iq2_xxs_impl for one super-block x[256] with weights qw[256] into y[66]; 0 or an error."""
    scales, weight, xval, waux, L, Laux, Lqp, q2, block_signs, tab = work
    kMaxQ = 3
    for i in range(16):
        q2[i] = 0
    max_scale = np.float32(0.0)
    sumx2 = np.float32(0.0)
    for i in range(QK_K):
        sumx2 += x[i] * x[i]
    sigma2 = sumx2 / np.float32(QK_K)
    for ib in range(8):
        xb = x[32 * ib:32 * ib + 32]
        for i in range(32):
            weight[i] = qw[32 * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i])
        for i in range(32):
            waux[i] = np.sqrt(weight[i])
        for k in range(4):
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
        mx = xval[0]
        for i in range(1, 32):
            mx = mx if mx > xval[i] else xval[i]
        if mx < GROUP_MAX_EPS:
            scales[ib] = np.float32(0.0)
            continue
        scale = make_qp_quants(32, kMaxQ + 1, xval, Lqp, weight)
        eff_max = scale * np.float32(kMaxQ)
        if eff_max <= np.float32(0.0):
            scales[ib] = np.float32(0.0)
            continue
        best = np.float32(0.0)
        for is_ in range(-6, 7):
            id_ = (np.float32(2 * kMaxQ - 1) + np.float32(is_) * np.float32(0.1)) / eff_max
            this_scale = np.float32(1.0) / id_
            for k in range(4):
                for i in range(8):
                    l = nearest_int_c(np.float32(0.5) * (id_ * xval[8 * k + i] - np.float32(1.0)))
                    l = l if l < kMaxQ - 1 else kMaxQ - 1
                    Laux[8 * k + i] = l if l > 0 else 0
                u = grids.pack_point(Laux, 8 * k)
                if kmap[u] < 0:
                    g = grids.iq2_find_best_neighbour(neigh, -kmap[u] - 1, grid, xval, waux, 8 * k, this_scale, Laux, tab)
                    if g < 0:
                        return _ERR_NO_NEIGHBOUR
            sumqx = np.float32(0.0)
            sumq2 = np.float32(0.0)
            for i in range(32):
                w = weight[i]
                q = np.float32(2 * Laux[i] + 1)
                sumqx += w * xval[i] * q
                sumq2 += w * q * q
            if sumq2 > np.float32(0.0) and sumqx * sumqx > best * sumq2:
                scale = sumqx / sumq2
                best = scale * sumqx
                for i in range(32):
                    L[i] = Laux[i]
        if scale > np.float32(0.0):
            id_ = np.float32(1.0) / scale
            for k in range(4):
                u = 0
                for i in range(8):
                    l = nearest_int_c(np.float32(0.5) * (id_ * xval[8 * k + i] - np.float32(1.0)))
                    l = l if l < kMaxQ - 1 else kMaxQ - 1
                    l = l if l > 0 else 0
                    u |= l << (2 * i)
                g = kmap[u]
                if g < 0:
                    g = grids.iq2_find_best_neighbour(neigh, -g - 1, grid, xval, waux, 8 * k, scale, L, tab)
                    if g < 0:
                        return _ERR_NO_NEIGHBOUR
                for i in range(8):
                    L[8 * k + i] = (int(grid[g, i]) - 1) // 2
            sumqx = np.float32(0.0)
            sumq2 = np.float32(0.0)
            for i in range(32):
                w = weight[i]
                q = np.float32(2 * L[i] + 1)
                sumqx += w * xval[i] * q
                sumq2 += w * q * q
            if sumq2 > np.float32(0.0):
                scale = sumqx / sumq2
        if scale < np.float32(0.0):
            scale = -scale
            for k in range(4):
                block_signs[k] = (~block_signs[k]) & 127
        for k in range(4):
            u = grids.pack_point(L, 8 * k)
            g = kmap[u]
            if g < 0:
                return _ERR_OFF_GRID
            q2[2 * ib] |= np.uint32(g) << np.uint32(8 * k)
            q2[2 * ib + 1] |= np.uint32(block_signs[k]) << np.uint32(7 * k)
        if not scale >= np.float32(0.0):
            return _ERR_SCALE
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == np.float32(0.0):
        put_fp16(y, 0, np.float32(0.0))
        for i in range(2, BLOCK_BYTES):
            y[i] = 0
        return 0
    d = max_scale / np.float32(31.0)
    put_fp16(y, 0, d)
    id_ = np.float32(1.0) / d
    for ib in range(8):
        l = nearest_int_c(np.float32(0.5) * (id_ * scales[ib] - np.float32(1.0)))
        l = l if l < 15 else 15
        l = l if l > 0 else 0
        q2[2 * ib + 1] |= np.uint32(l) << np.uint32(28)
    for i in range(16):
        put_u32(y, 2 + 4 * i, q2[i])
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
    """dequantize_row_iq2_xxs for one block."""
    dgrid = _DGRID
    signs = _KSIGNS
    d = get_fp16(y, 0)
    for ib in range(8):
        a0 = get_u32(y, 2 + 8 * ib)
        a1 = get_u32(y, 6 + 8 * ib)
        db = d * (np.float32(0.5) + np.float32(a1 >> np.uint32(28))) * np.float32(0.25)
        for l in range(4):
            g = int((a0 >> np.uint32(8 * l)) & np.uint32(255))
            sg = int(signs[int((a1 >> np.uint32(7 * l)) & np.uint32(127))])
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

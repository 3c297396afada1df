"""IQ1_S: 1.5625 bits per weight. 256-element super-blocks of 8 groups of 32; each 8 values are a point of a
2048-point grid of ternary vectors (-1, 0, +1), shifted by +-IQ1S_DELTA (0.125) per group, with a 3-bit scale
per group under an fp16 super-scale. Byte-exact port of ggml-quants.c quantize_row_iq1_s_impl
(quantize_iq1_s) and dequantize_row_iq1_s.

Block layout (50 bytes):
    d       fp16 super-scale
    qs      32 bytes: the low 8 bits of each 8-value point's grid index
    qh      8 x uint16 little-endian, one per group: bits 3k..3k+2 the high 3 bits of point k's index,
            bits 12..14 the group scale s (group scale = d * (2s + 1)), bit 15 set: the shift is -DELTA

The search per group is exact: the 32 values sorted, every split into the three levels scored from prefix
sums, for both shifts; the split's points are then moved onto the grid (iq1_find_best_neighbour2).

llama.cpp requires an importance matrix for IQ1_S (ggml_quantize_chunk asserts one): quantize_rows raises
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
from gguftool.quants.bits import FLT_MAX, get_fp16, nearest_int_c, put_fp16
from gguftool.quants.blocks import no_row_state

GGML_TYPE = GGMLType.IQ1_S
USES_IMATRIX = True
REQUIRES_IMATRIX = True  # ggml_quantize_requires_imatrix

QK_K = 256
BLOCK_BYTES = 50
BS = 32                    # IQ1S_BLOCK_SIZE
_OFF_QS = 2
_OFF_QH = 34
_KIND = grids.IQ1
GROUP_MAX_EPS_IQ1_S = np.float32(1e-12)
IQ1S_DELTA = np.float32(0.125)

_ERR_NO_NEIGHBOUR = 1
_ERR_SCALE = 3
ERRORS = {
    _ERR_NO_NEIGHBOUR: "no grid point within reach (llama.cpp's iq1_find_best_neighbour2 asserts or reads "
                       "past the tensor)",
    _ERR_SCALE: "a NaN group scale (llama.cpp asserts scale >= 0)",
}

_DGRID = grids.dequant_grid(_KIND)   # numba freezes module-level arrays into the code as constants
# x_p and x_m of the reference: the three levels shifted by +DELTA and by -DELTA
_X_P = np.array([-1 + 0.125, 0.125, 1 + 0.125], dtype=np.float32)
_X_M = np.array([-1 - 0.125, -0.125, 1 - 0.125], dtype=np.float32)


@njit(cache=True)
def _work():
    """scales[8], weight[32], sumx[33], sumw[33] (float32); L[32], idx[32], index[4], shifts[8] (int32);
    pre[8, 33] (float32, _split_search's per-boundary terms); tab[SEARCH_SCRATCH] (float32, iq1_find_best_neighbour2's);
    row[4, 33] (float32, _split_search's scores of one row)."""
    return (np.zeros(8, np.float32), np.zeros(BS, np.float32), np.zeros(BS + 1, np.float32),
            np.zeros(BS + 1, np.float32), np.zeros(BS, np.int32), np.zeros(BS, np.int32), np.zeros(4, np.int32),
            np.zeros(8, np.int32), np.zeros((8, BS + 1), np.float32), np.zeros(grids.SEARCH_SCRATCH, np.float32),
            np.zeros((4, BS + 1), np.float32))


@njit(cache=True, inline="always", error_model="numpy")
def _split_search(sumx, sumw, pre, row, mx):
    """The exhaustive split search of quantize_row_iq1_s_impl over the sorted group (prefix sums sumx, sumw):
    every (i1, i2), i1 <= i2, in the reference's order, shift +DELTA then -DELTA, first best kept. Returns
    (besti1, besti2, best_shift, scale); best_shift 0 when nothing scored.

    The reference's sumqx = (a*x[0] + b*x[1]) + c*x[2] and sumq2 = (wa*x[0]*x[0] + wb*x[1]*x[1]) + wc*x[2]*x[2]
    (a, wa the sums below i1, b, wb between i1 and i2, c, wc above i2): the a and c terms depend on one
    boundary only, so they are computed once per boundary into pre; the b terms of the two shifts are
    negatives (x_m[1] = -x_p[1]: b*x_m[1] = -(b*x_p[1]) and wb*x_m[1]*x_m[1] = wb*x_p[1]*x_p[1] exactly).
    Every score is the same float32 value as the reference's.

    Speed: a row i1 is first scored for every i2 against the best score at its start, without branches (the
    loop vectorises); only a row where some split would be taken is then walked in order with the updates.
    Skipping a row where nothing beats the score at its start is exact: with no update in the row, every
    comparison in it is against that same score."""
    xp0 = _X_P[0]
    xp1 = _X_P[1]
    xp2 = _X_P[2]
    xm0 = _X_M[0]
    xm2 = _X_M[2]
    zero = np.float32(0.0)
    ap_ = pre[0]
    am_ = pre[1]
    wap_ = pre[2]
    wam_ = pre[3]
    cp_ = pre[4]
    cm_ = pre[5]
    wcp_ = pre[6]
    wcm_ = pre[7]
    tx = sumx[BS]
    tw = sumw[BS]
    for t in range(BS + 1):
        a = sumx[t] - sumx[0]
        wa = sumw[t] - sumw[0]
        c = tx - sumx[t]
        wc = tw - sumw[t]
        ap_[t] = a * xp0
        am_[t] = a * xm0
        wap_[t] = wa * xp0 * xp0
        wam_[t] = wa * xm0 * xm0
        cp_[t] = c * xp2
        cm_[t] = c * xm2
        wcp_[t] = wc * xp2 * xp2
        wcm_[t] = wc * xm2 * xm2
    qxp_ = row[0]
    q2p_ = row[1]
    qxm_ = row[2]
    q2m_ = row[3]
    best_score = -FLT_MAX
    scale = mx
    besti1 = -1
    besti2 = -1
    best_shift = 0
    for i1 in range(BS + 1):
        ap = ap_[i1]
        am = am_[i1]
        wap = wap_[i1]
        wam = wam_[i1]
        s1 = sumx[i1]
        w1 = sumw[i1]
        hit = False
        for i2 in range(i1, BS + 1):
            bp = (sumx[i2] - s1) * xp1
            wb = (sumw[i2] - w1) * xp1 * xp1
            qxp = ap + bp + cp_[i2]
            q2p = wap + wb + wcp_[i2]
            qxm = am - bp + cm_[i2]
            q2m = wam + wb + wcm_[i2]
            qxp_[i2] = qxp
            q2p_[i2] = q2p
            qxm_[i2] = qxm
            q2m_[i2] = q2m
            hit |= ((q2p > zero) & (qxp * qxp > best_score * q2p)) | ((q2m > zero) & (qxm * qxm > best_score * q2m))
        if not hit:
            continue
        for i2 in range(i1, BS + 1):
            sumqx = qxp_[i2]
            sumq2 = q2p_[i2]
            if sumq2 > zero and sumqx * sumqx > best_score * sumq2:
                scale = sumqx / sumq2
                best_score = scale * sumqx
                besti1 = i1
                besti2 = i2
                best_shift = 1
            sumqx = qxm_[i2]
            sumq2 = q2m_[i2]
            if sumq2 > zero and sumqx * sumqx > best_score * sumq2:
                scale = sumqx / sumq2
                best_score = scale * sumqx
                besti1 = i1
                besti2 = i2
                best_shift = -1
    return besti1, besti2, best_shift, scale


@njit(cache=True, error_model="numpy")
def _quantize_superblock(xall, base, qw, y, grid, kmap, neigh, work):
    """quantize_row_iq1_s_impl for the super-block xall[base:base+256] (xall: the whole tensor, flat, for the
    reference's out-of-group reads, see iq1_find_best_neighbour2) with weights qw[256] into y[50]."""
    scales, weight, sumx, sumw, L, idx, index, shifts, pre, tab, row = work
    x_p = _X_P
    x_m = _X_M
    x = xall[base:base + QK_K]
    for i in range(BLOCK_BYTES):
        y[i] = 0
    max_scale = np.float32(0.0)
    sumx2 = np.float32(0.0)
    for i in range(QK_K):
        sumx2 += x[i] * x[i]
    sigma2 = np.float32(2.0) * sumx2 / np.float32(QK_K)
    for ib in range(QK_K // BS):
        xb = x[BS * ib:BS * ib + BS]
        for i in range(BS):
            weight[i] = qw[BS * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i])
        mx = abs(xb[0])
        for i in range(1, BS):
            a = abs(xb[i])
            mx = mx if mx > a else a
        if mx < GROUP_MAX_EPS_IQ1_S:
            scales[ib] = np.float32(0.0)
            shifts[ib] = 1
            continue
        grids.sort_order(xb, BS, idx)
        sumx[0] = np.float32(0.0)
        sumw[0] = np.float32(0.0)
        for j in range(BS):
            i = idx[j]
            sumx[j + 1] = sumx[j] + weight[i] * xb[i]
            sumw[j + 1] = sumw[j] + weight[i]
        besti1, besti2, best_shift, scale = _split_search(sumx, sumw, pre, row, mx)
        if besti1 < 0 or besti2 < 0 or best_shift == 0:
            scales[ib] = np.float32(0.0)
            shifts[ib] = 1
            continue
        for j in range(besti1):
            L[idx[j]] = 0
        for j in range(besti1, besti2):
            L[idx[j]] = 1
        for j in range(besti2, BS):
            L[idx[j]] = 2
        if scale < np.float32(0.0):
            for j in range(BS):
                L[j] = 2 - L[j]
            scale = -scale
            best_shift = -best_shift
        all_on_grid = True
        xx = x_p if best_shift == 1 else x_m
        for k in range(BS // 8):
            u = grids.pack_point(L, 8 * k)
            g = kmap[u]
            if g < 0:
                all_on_grid = False
                g = grids.iq1_find_best_neighbour2(neigh, -g - 1, grid, xall, base + BS * ib + 8 * k, weight, 8 * k,
                                                   scale, xx, L, 8 * k, tab)
                if g < 0:
                    return _ERR_NO_NEIGHBOUR
            index[k] = g
        if not all_on_grid:
            sumqx = np.float32(0.0)
            sumq2 = np.float32(0.0)
            for k in range(BS // 8):
                for j in range(8):
                    w = weight[8 * k + j]
                    q = xx[(int(grid[index[k], j]) - 1) // 2]
                    sumqx += w * q * xb[8 * k + j]
                    sumq2 += w * q * q
            if sumqx > np.float32(0.0) and sumq2 > np.float32(0.0):
                scale = sumqx / sumq2
        h = 0
        for k in range(BS // 8):
            y[_OFF_QS + (BS // 8) * ib + k] = index[k] & 255
            h |= (index[k] >> 8) << (3 * k)
        y[_OFF_QH + 2 * ib] = h & 0xFF
        y[_OFF_QH + 2 * ib + 1] = (h >> 8) & 0xFF
        if not scale >= np.float32(0.0):
            return _ERR_SCALE
        scales[ib] = scale
        shifts[ib] = best_shift
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == np.float32(0.0):
        return 0
    d = max_scale / np.float32(15.0)
    put_fp16(y, 0, d * np.float32(1.125))
    id_ = np.float32(1.0) / d
    for ib in range(QK_K // BS):
        l = nearest_int_c(np.float32(0.5) * (id_ * scales[ib] - np.float32(1.0)))
        l = l if l < 7 else 7
        l = l if l > 0 else 0
        if shifts[ib] == -1:
            l |= 8
        y[_OFF_QH + 2 * ib + 1] |= np.uint8(l << 4)   # (l << 12) in the uint16
    return 0


@njit(cache=True, parallel=True, error_model="numpy")
def _quantize_rows(x, imatrix, out, grid, kmap, neigh, status):
    nrows, n = x.shape
    nb = n // QK_K
    xall = x.reshape(-1)
    for r in prange(nrows):
        work = _work()
        st = 0
        for i in range(nb):
            st = _quantize_superblock(xall, r * n + QK_K * i, imatrix[QK_K * i:QK_K * (i + 1)],
                                      out[r, BLOCK_BYTES * i:BLOCK_BYTES * (i + 1)], grid, kmap, neigh, work)
            if st != 0:
                break
        status[r] = st


@njit(cache=True, error_model="numpy")
def dequantize_block(y, out):
    """dequantize_row_iq1_s for one block."""
    dgrid = _DGRID
    d = get_fp16(y, 0)
    for ib in range(QK_K // BS):
        qh = int(y[_OFF_QH + 2 * ib]) | (int(y[_OFF_QH + 2 * ib + 1]) << 8)
        dl = d * np.float32(2 * ((qh >> 12) & 7) + 1)
        delta = -IQ1S_DELTA if qh & 0x8000 else IQ1S_DELTA
        for l in range(4):
            g = int(y[_OFF_QS + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)
            for j in range(8):
                out[32 * ib + 8 * l + j] = dl * (np.float32(dgrid[g, j]) + delta)


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


@njit(cache=True, error_model="numpy")
def _superblock_alone(x, qw, y, grid, kmap, neigh, work):
    """One block on its own: the reference's out-of-group reads (see iq1_find_best_neighbour2) see only x."""
    return _quantize_superblock(x, 0, qw, y, grid, kmap, neigh, work)


_KERNELS = LatticeKernels(GGML_TYPE, _KIND, ERRORS, REQUIRES_IMATRIX, _work, _superblock_alone, _quantize_rows)
make_scratch = _KERNELS.make_scratch
quantize_block = _KERNELS.quantize_block
quantize_rows = _KERNELS.quantize_rows

"""IQ1_M: 1.75 bits per weight. 256-element super-blocks of 16 groups of 16; each 8 values are a point of the
2048-point ternary grid of IQ1_S, shifted by +-IQ1M_DELTA (0.125) per 8 values, with a 3-bit scale per group
and an fp16 super-scale spread over the scale bytes. Byte-exact port of ggml-quants.c quantize_row_iq1_m_impl
(quantize_iq1_m) and dequantize_row_iq1_m.

Block layout (56 bytes, no separate d field):
    qs      32 bytes: the low 8 bits of each 8-value point's grid index
    qh      16 bytes, one per group: bits 0..2 / 4..6 the high 3 bits of the group's two indices,
            bit 3 / bit 7 set: that point's shift is -DELTA
    scales  4 x uint16 little-endian: bits 3j..3j+2 of word w hold group 4w+j's scale s (group scale =
            d * (2s + 1)); bits 12..15 of the four words are the four nibbles of d's fp16 bits

The search per group is exact: the 16 values sorted, every split into the three levels scored from prefix
sums kept per half (each half of 8 may take either shift), then moved onto the grid.

llama.cpp accepts IQ1_M without an importance matrix (the weights are then x^2): both paths are here.

The type-module interface of registry.py, with make_scratch, quantize_block and quantize_rows in Python (the
lattice tables of iq_grids_2 and the error reporting), as in iq2_xxs.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from gguftool.gguf.constants import GGMLType
from gguftool.quants import iq_grids_2 as grids
from gguftool.quants.lattice_glue import LatticeKernels
from gguftool.quants.bits import FLT_MAX, fp16_bits_to_fp32, fp32_to_fp16_bits, nearest_int_c
from gguftool.quants.blocks import no_row_state

GGML_TYPE = GGMLType.IQ1_M
USES_IMATRIX = True
REQUIRES_IMATRIX = False

QK_K = 256
BLOCK_BYTES = 56
BS = 16                    # IQ1M_BLOCK_SIZE
_OFF_QH = 32
_OFF_SC = 48
_KIND = grids.IQ1
GROUP_MAX_EPS_IQ1_M = np.float32(1e-7)
IQ1M_DELTA = np.float32(0.125)

_ERR_NO_NEIGHBOUR = 1
_ERR_SCALE = 3
ERRORS = {
    _ERR_NO_NEIGHBOUR: "no grid point within reach (llama.cpp's iq1_find_best_neighbour2 asserts or reads "
                       "past the tensor)",
    _ERR_SCALE: "a NaN group scale (llama.cpp asserts scale >= 0)",
}

_DGRID = grids.dequant_grid(_KIND)   # numba freezes module-level arrays into the code as constants
_X_P = np.array([-1 + 0.125, 0.125, 1 + 0.125], dtype=np.float32)
_X_M = np.array([-1 - 0.125, -0.125, 1 - 0.125], dtype=np.float32)
_MASKS = np.array([0x00, 0x80, 0x08, 0x88], dtype=np.uint8)   # qh bits of the shift combination k


@njit(cache=True)
def _work():
    """scales[16], weight[16] (float32); px[2, 17], pw[2, 17] (float32); L[16], idx[16], index[2],
    shifts[16] (int32); sc[4] (uint32, the scale words); tab[SEARCH_SCRATCH] (float32, iq1_find_best_neighbour2's);
    pre[8, 17], row[8, 17] (float32, _split_search's per-boundary terms and one row's scores)."""
    return (np.zeros(16, np.float32), np.zeros(BS, np.float32), np.zeros((2, BS + 1), np.float32),
            np.zeros((2, BS + 1), np.float32), np.zeros(BS, np.int32), np.zeros(BS, np.int32), np.zeros(2, np.int32),
            np.zeros(16, np.int32), np.zeros(4, np.uint32), np.zeros(grids.SEARCH_SCRATCH, np.float32),
            np.zeros((8, BS + 1), np.float32), np.zeros((8, BS + 1), np.float32))


@njit(cache=True, inline="always", error_model="numpy")
def _weights(xb, qw, off, use_qw, sigma2, weight):
    if use_qw:
        for i in range(BS):
            weight[i] = qw[off + i] * np.sqrt(sigma2 + xb[i] * xb[i])
    else:
        for i in range(BS):
            weight[i] = xb[i] * xb[i]


@njit(cache=True, inline="always", error_model="numpy")
def _split_search(px, pw, pre, row, mx):
    """The exhaustive split search of quantize_row_iq1_m_impl over the sorted group, from the prefix sums kept
    per half (px, pw: [2, 17]; each half of 8 takes its own shift): every (i1, i2), i1 <= i2, in the
    reference's order, the four shift combinations k (0: ++, 1: +-, 2: -+, 3: --) of each, first best kept.
    Returns (besti1, besti2, best_k, scale); best_k -1 when nothing scored.

    Per half h the reference's sumqx is T_h*v[2] - (px[h][i1] + px[h][i2]) and its sumq2
    (T_h*v[2]*v[2] + pw[h][i1]*c1) + pw[h][i2]*c2: the parts of one boundary are computed once per
    boundary into pre, every score is the same float32 value as the reference's.

    Speed: a row i1's scores for every i2 are computed without branches (the loop vectorises) and stored,
    with a flag saying whether any beats the best score at the row's start; only such rows are walked in
    order with the updates. Skipping the others is exact: with no update in a row, every comparison in it is
    against that same score."""
    x_p = _X_P
    x_m = _X_M
    zero = np.float32(0.0)
    p2 = x_p[2]
    m2 = x_m[2]
    cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1]
    cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2]
    cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1]
    cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2]
    px0 = px[0]
    px1 = px[1]
    txp0 = px0[BS] * p2
    txm0 = px0[BS] * m2
    txp1 = px1[BS] * p2
    txm1 = px1[BS] * m2
    twp0 = pw[0, BS] * p2 * p2
    twm0 = pw[0, BS] * m2 * m2
    twp1 = pw[1, BS] * p2 * p2
    twm1 = pw[1, BS] * m2 * m2
    ap0 = pre[0]
    am0 = pre[1]
    ap1 = pre[2]
    am1 = pre[3]
    bp0 = pre[4]
    bm0 = pre[5]
    bp1 = pre[6]
    bm1 = pre[7]
    for t in range(BS + 1):
        w0 = pw[0, t]
        w1 = pw[1, t]
        ap0[t] = twp0 + w0 * cp1
        am0[t] = twm0 + w0 * cm1
        ap1[t] = twp1 + w1 * cp1
        am1[t] = twm1 + w1 * cm1
        bp0[t] = w0 * cp2
        bm0[t] = w0 * cm2
        bp1[t] = w1 * cp2
        bm1[t] = w1 * cm2
    qx0 = row[0]
    qx1 = row[1]
    qx2 = row[2]
    qx3 = row[3]
    q20 = row[4]
    q21 = row[5]
    q22 = row[6]
    q23 = row[7]
    best_score = -FLT_MAX
    scale = mx
    besti1 = -1
    besti2 = -1
    best_k = -1
    for i1 in range(BS + 1):
        a0 = px0[i1]
        a1 = px1[i1]
        cap0 = ap0[i1]
        cam0 = am0[i1]
        cap1 = ap1[i1]
        cam1 = am1[i1]
        hit = False
        for i2 in range(i1, BS + 1):
            sx0 = a0 + px0[i2]
            sx1 = a1 + px1[i2]
            qxp0 = txp0 - sx0
            qxm0 = txm0 - sx0
            qxp1 = txp1 - sx1
            qxm1 = txm1 - sx1
            q2p0 = cap0 + bp0[i2]
            q2m0 = cam0 + bm0[i2]
            q2p1 = cap1 + bp1[i2]
            q2m1 = cam1 + bm1[i2]
            s0 = qxp0 + qxp1
            s1 = qxp0 + qxm1
            s2 = qxm0 + qxp1
            s3 = qxm0 + qxm1
            r0 = q2p0 + q2p1
            r1 = q2p0 + q2m1
            r2 = q2m0 + q2p1
            r3 = q2m0 + q2m1
            qx0[i2] = s0
            qx1[i2] = s1
            qx2[i2] = s2
            qx3[i2] = s3
            q20[i2] = r0
            q21[i2] = r1
            q22[i2] = r2
            q23[i2] = r3
            hit |= (((r0 > zero) & (s0 * s0 > best_score * r0)) | ((r1 > zero) & (s1 * s1 > best_score * r1))
                    | ((r2 > zero) & (s2 * s2 > best_score * r2)) | ((r3 > zero) & (s3 * s3 > best_score * r3)))
        if not hit:
            continue
        for i2 in range(i1, BS + 1):
            for k in range(4):
                sqx = row[k, i2]
                sq2 = row[4 + k, i2]
                if sq2 > zero and sqx * sqx > best_score * sq2:
                    scale = sqx / sq2
                    best_score = scale * sqx
                    besti1 = i1
                    besti2 = i2
                    best_k = k
    return besti1, besti2, best_k, scale


@njit(cache=True, error_model="numpy")
def _quantize_superblock(xall, base, qw, y, grid, kmap, neigh, work):
    """quantize_row_iq1_m_impl for the super-block xall[base:base+256] (xall: the whole tensor, flat, for the
    reference's out-of-group reads, see iq1_find_best_neighbour2) with weights qw[256] (empty: none) into
    y[56]."""
    scales, weight, px, pw, L, idx, index, shifts, sc, tab, pre, row = work
    x_p = _X_P
    x_m = _X_M
    use_qw = qw.size > 0
    x = xall[base:base + QK_K]
    for i in range(BLOCK_BYTES):
        y[i] = 0
    for i in range(4):
        sc[i] = 0
    max_scale = np.float32(0.0)
    sumx2 = np.float32(0.0)
    for i in range(QK_K):
        sumx2 += x[i] * x[i]
    sigma2 = np.float32(2.0) * sumx2 / np.float32(QK_K)
    for ib in range(QK_K // BS):
        xb = x[BS * ib:BS * ib + BS]
        _weights(xb, qw, BS * ib, use_qw, sigma2, weight)
        mx = abs(xb[0])
        for i in range(1, BS):
            a = abs(xb[i])
            mx = mx if mx > a else a
        if mx < GROUP_MAX_EPS_IQ1_M:
            scales[ib] = np.float32(0.0)
            shifts[ib] = 0
            continue
        grids.sort_order(xb, BS, idx)
        px[0, 0] = np.float32(0.0)
        px[1, 0] = np.float32(0.0)
        pw[0, 0] = np.float32(0.0)
        pw[1, 0] = np.float32(0.0)
        for j in range(BS):
            i = idx[j]
            h = 0 if i < BS // 2 else 1
            px[h, j + 1] = px[h, j] + weight[i] * xb[i]
            px[1 - h, j + 1] = px[1 - h, j]
            pw[h, j + 1] = pw[h, j] + weight[i]
            pw[1 - h, j + 1] = pw[1 - h, j]
        besti1, besti2, best_k, scale = _split_search(px, pw, pre, row, mx)
        if besti1 < 0 or besti2 < 0 or best_k < 0:
            scales[ib] = np.float32(0.0)
            shifts[ib] = 0
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
            best_k = 3 - best_k
        all_on_grid = True
        for k in range(2):
            if k == 0:
                xx = x_p if best_k < 2 else x_m
            else:
                xx = x_p if best_k % 2 == 0 else x_m
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
            sumqx_f = np.float32(0.0)
            sumq2_f = np.float32(0.0)
            for k in range(2):
                if k == 0:
                    xx = x_p if best_k < 2 else x_m
                else:
                    xx = x_p if best_k % 2 == 0 else x_m
                for j in range(8):
                    w = weight[8 * k + j]
                    q = xx[(int(grid[index[k], j]) - 1) // 2]
                    sumqx_f += w * q * xb[8 * k + j]
                    sumq2_f += w * q * q
            if sumqx_f > np.float32(0.0) and sumq2_f > np.float32(0.0):
                scale = sumqx_f / sumq2_f
        y[2 * ib] = index[0] & 255
        y[2 * ib + 1] = index[1] & 255
        y[_OFF_QH + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
        if not scale >= np.float32(0.0):
            return _ERR_SCALE
        scales[ib] = scale
        shifts[ib] = best_k
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == np.float32(0.0):
        return 0
    d = max_scale / np.float32(15.0)
    id_ = np.float32(1.0) / d
    sumqx_f = np.float32(0.0)
    sumq2_f = np.float32(0.0)
    for ib in range(QK_K // BS):
        l = nearest_int_c(np.float32(0.5) * (id_ * scales[ib] - np.float32(1.0)))
        l = l if l < 7 else 7
        l = l if l > 0 else 0
        sc[ib // 4] |= np.uint32(l << (3 * (ib % 4)))
        y[_OFF_QH + ib] |= _MASKS[shifts[ib]]
        xb = x[BS * ib:BS * ib + BS]
        _weights(xb, qw, BS * ib, use_qw, sigma2, weight)
        qh = int(y[_OFF_QH + ib])
        fl = np.float32(2 * l + 1)
        for k in range(2):
            if k == 0:
                xx = x_p if shifts[ib] < 2 else x_m
            else:
                xx = x_p if shifts[ib] % 2 == 0 else x_m
            g = int(y[2 * ib + k]) + ((qh << (8 - 4 * k)) & 0x700)
            for j in range(8):
                w = weight[8 * k + j]
                q = xx[(int(grid[g, j]) - 1) // 2] * fl
                sumqx_f += w * q * xb[8 * k + j]
                sumq2_f += w * q * q
    if sumq2_f > np.float32(0.0):
        d = sumqx_f / sumq2_f
    s = fp32_to_fp16_bits(d * np.float32(1.1125))
    sc[0] |= (s & np.uint32(0x000F)) << np.uint32(12)
    sc[1] |= (s & np.uint32(0x00F0)) << np.uint32(8)
    sc[2] |= (s & np.uint32(0x0F00)) << np.uint32(4)
    sc[3] |= s & np.uint32(0xF000)
    for i in range(4):
        y[_OFF_SC + 2 * i] = sc[i] & np.uint32(0xFF)
        y[_OFF_SC + 2 * i + 1] = (sc[i] >> np.uint32(8)) & np.uint32(0xFF)
    return 0


@njit(cache=True, parallel=True, error_model="numpy")
def _quantize_rows(x, imatrix, out, grid, kmap, neigh, status):
    nrows, n = x.shape
    nb = n // QK_K
    xall = x.reshape(-1)
    use_qw = imatrix.size > 0
    for r in prange(nrows):
        work = _work()
        st = 0
        for i in range(nb):
            qw = imatrix[QK_K * i:QK_K * (i + 1)] if use_qw else imatrix[0:0]
            st = _quantize_superblock(xall, r * n + QK_K * i, qw,
                                      out[r, BLOCK_BYTES * i:BLOCK_BYTES * (i + 1)], grid, kmap, neigh, work)
            if st != 0:
                break
        status[r] = st


@njit(cache=True, error_model="numpy")
def dequantize_block(y, out):
    """dequantize_row_iq1_m for one block."""
    dgrid = _DGRID
    s0 = int(y[_OFF_SC]) | (int(y[_OFF_SC + 1]) << 8)
    s1 = int(y[_OFF_SC + 2]) | (int(y[_OFF_SC + 3]) << 8)
    s2 = int(y[_OFF_SC + 4]) | (int(y[_OFF_SC + 5]) << 8)
    s3 = int(y[_OFF_SC + 6]) | (int(y[_OFF_SC + 7]) << 8)
    d = fp16_bits_to_fp32((s0 >> 12) | ((s1 >> 8) & 0x00F0) | ((s2 >> 4) & 0x0F00) | (s3 & 0xF000))
    # scales: sc[ib/2] covers two 32-value blocks, 6 bits each: block ib's two 16-value groups at bits
    # 6(ib%2) and 6(ib%2)+3
    for ib in range(QK_K // 32):
        w = int(y[_OFF_SC + 2 * (ib // 2)]) | (int(y[_OFF_SC + 2 * (ib // 2) + 1]) << 8)
        dl1 = d * np.float32(2 * ((w >> (6 * (ib % 2))) & 0x7) + 1)
        dl2 = d * np.float32(2 * ((w >> (6 * (ib % 2) + 3)) & 0x7) + 1)
        qh0 = int(y[_OFF_QH + 2 * ib])
        qh1 = int(y[_OFF_QH + 2 * ib + 1])
        idx0 = int(y[4 * ib]) | ((qh0 << 8) & 0x700)
        idx1 = int(y[4 * ib + 1]) | ((qh0 << 4) & 0x700)
        idx2 = int(y[4 * ib + 2]) | ((qh1 << 8) & 0x700)
        idx3 = int(y[4 * ib + 3]) | ((qh1 << 4) & 0x700)
        for l in range(4):
            if l == 0:
                g = idx0
                dl = dl1
                delta = -IQ1M_DELTA if qh0 & 0x08 else IQ1M_DELTA
            elif l == 1:
                g = idx1
                dl = dl1
                delta = -IQ1M_DELTA if qh0 & 0x80 else IQ1M_DELTA
            elif l == 2:
                g = idx2
                dl = dl2
                delta = -IQ1M_DELTA if qh1 & 0x08 else IQ1M_DELTA
            else:
                g = idx3
                dl = dl2
                delta = -IQ1M_DELTA if qh1 & 0x80 else IQ1M_DELTA
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

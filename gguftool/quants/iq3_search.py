"""The lattice search IQ3_XXS and IQ3_S share: one 32-value sub-block onto groups of four grid points.

Mirrors ggml-quants.c iq3_find_best_neighbour and the per-sub-block part of quantize_row_iq3_xxs_impl /
quantize_row_iq3_s_impl (the two differ only in the flags passed here). All arithmetic is float32 in the
reference's order; FMA contraction is off in the reference build, so every product is rounded on its own.

The inputs are the sub-block's magnitudes xval (signs already split off), the weights and their square roots,
and the tables of iq3_grids.py (kmap int32[4096], neighbours uint16[...], nvalues float32[4, ...] the
neighbours' coordinates, grid int8[n, 4] of values 2l+1).

    search_sub_block(xval, weight, waux, w, grid, kmap, neighbours, nvalues, n_steps, all_second_pass)
        -> (scale, ok); the chosen coordinates are in w.L

w is a SearchScratch (make_search_scratch()): one thread's working arrays.

Where the time goes and what keeps it exact: about 80 % of the groups of four land off the grid at each
trial scale and need a neighbour search over ~8-11 candidates, so the candidates' distances are computed in
vector lanes (one lane per candidate, each lane's four-term sum in the reference's order) before a scalar
first-minimum pass picks the same candidate as the reference's `if (d2 < best_d2)` loop. The weighted sums
of a trial take their products (w*x)*q and (w*q)*q from per-sub-block tables (q has only 8 values), the same
float32 roundings the reference performs, summed sequentially as it sums.

ok is False where llama.cpp aborts the process: a GGML_ASSERT in iq3_find_best_neighbour when no candidate's
weighted distance is below FLT_MAX (overflowed or NaN distances: values of magnitude ~1e13 and beyond), or the
final scale failing `scale >= 0` (NaN). The caller turns that into an error instead of bytes.
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

from .bits import F32, FLT_MAX, U64, nearest_int_c, select_f32

KMAX_Q = 8
MAX_NEIGHBOURS = 64     # longest neighbour list: 36 (256-point grid), 38 (512-point grid)

SearchScratch = namedtuple("SearchScratch", "L Laux on_grid on_grid_aux dist wxq wqq")


@njit(cache=True)
def make_search_scratch():
    """L, Laux int8[32]; on_grid, on_grid_aux bool[8]; dist float32[MAX_NEIGHBOURS]; wxq, wqq float32[256]."""
    return SearchScratch(np.zeros(32, np.int8), np.zeros(32, np.int8), np.zeros(8, np.bool_),
                         np.zeros(8, np.bool_), np.zeros(MAX_NEIGHBOURS, np.float32), np.zeros(256, np.float32),
                         np.zeros(256, np.float32))


@njit(cache=True, inline="always", error_model="numpy")
def _round_all(xval, id_, L):
    """L[i] = nearest_int(0.5f*(id*xval[i] - 1)) clamped to 0..7, for the 32 values (a lane loop)."""
    for i in range(32):
        l = nearest_int_c(F32(F32(0.5) * F32(F32(id_ * xval[i]) - F32(1.0))))
        L[i] = max(0, min(KMAX_Q - 1, l))


@njit(cache=True, inline="always")
def _group_key(L, o):
    return np.int64(L[o]) | (np.int64(L[o + 1]) << 3) | (np.int64(L[o + 2]) << 6) | (np.int64(L[o + 3]) << 9)


@njit(cache=True, inline="always", error_model="numpy")
def find_best_neighbour(neighbours, nvalues, start, xval, waux, o, scale, L, dist):
    """iq3_find_best_neighbour for the group of four at xval[o:o+4]: the first entry of the list at
    neighbours[start] with the smallest sum waux*(scale*q - x)^2 (summed in element order); its coordinates
    go to L[o:o+4]. Returns the grid index, or -1 where llama.cpp's GGML_ASSERT(grid_index >= 0) aborts.
    (neighbours, nvalues: iq3_grids.search_tables' layout; the padding entries' distances are NaN.)"""
    n = np.int64(neighbours[start])
    base = start + 1
    x0 = xval[o]
    x1 = xval[o + 1]
    x2 = xval[o + 2]
    x3 = xval[o + 3]
    w0 = waux[o]
    w1 = waux[o + 1]
    w2 = waux[o + 2]
    w3 = waux[o + 3]
    v0 = nvalues[0]
    v1 = nvalues[1]
    v2 = nvalues[2]
    v3 = nvalues[3]
    for j in range(n):              # lanes: one candidate each (unsigned indices: no wraparound checks)
        p = U64(base + j)
        diff = F32(F32(scale * v0[p]) - x0)
        d2 = F32(F32(0.0) + F32(F32(w0 * diff) * diff))
        diff = F32(F32(scale * v1[p]) - x1)
        d2 = F32(d2 + F32(F32(w1 * diff) * diff))
        diff = F32(F32(scale * v2[p]) - x2)
        d2 = F32(d2 + F32(F32(w2 * diff) * diff))
        diff = F32(F32(scale * v3[p]) - x3)
        dist[U64(j)] = F32(d2 + F32(F32(w3 * diff) * diff))
    best_d2 = FLT_MAX
    jbest = -1
    for j in range(n):              # the reference's `if (d2 < best_d2)`: the first strict minimum
        d = dist[U64(j)]
        better = d < best_d2
        best_d2 = select_f32(better, d, best_d2)
        jbest = j if better else jbest
    if jbest < 0:
        return -1
    p = U64(base + jbest)
    L[o] = np.int8((np.int32(v0[p]) - 1) // 2)
    L[o + 1] = np.int8((np.int32(v1[p]) - 1) // 2)
    L[o + 2] = np.int8((np.int32(v2[p]) - 1) // 2)
    L[o + 3] = np.int8((np.int32(v3[p]) - 1) // 2)
    return np.int64(neighbours[p])


@njit(cache=True, inline="always", error_model="numpy")
def _weighted_sums(wxq, wqq, L):
    """sum (w*x)*q and sum (w*q)*q over the 32 values (q = 2L+1), from the tables, sequentially."""
    sumqx = F32(0.0)
    sumq2 = F32(0.0)
    for i in range(32):
        t = 8 * i + np.int64(L[i])
        sumqx = F32(sumqx + wxq[t])
        sumq2 = F32(sumq2 + wqq[t])
    return sumqx, sumq2


@njit(cache=True, error_model="numpy")
def search_sub_block(xval, weight, waux, w, grid, kmap, neighbours, nvalues, n_steps, all_second_pass):
    """The scale search of one sub-block of 32 (8 groups of 4) whose largest xval is not negligible.

    n_steps: the trial scales are id = (15 + is*0.2f)/max for is in -n_steps..n_steps (15 for IQ3_XXS, 9 for
    IQ3_S). all_second_pass: IQ3_S re-rounds every group against the chosen scale; IQ3_XXS only the groups
    that were off the grid (and starts with them marked on it). w.L (int8[32]) gets the coordinates, which are
    all grid points on return. Returns (scale, ok)."""
    L = w.L
    Laux = w.Laux
    on_grid = w.on_grid
    on_grid_aux = w.on_grid_aux
    dist = w.dist
    wxq = w.wxq
    wqq = w.wqq
    for i in range(32):
        L[i] = 0                # memset(L, 0, ...): kept when no trial scale improves (all weights zero)
    for i in range(32):         # the products of the weighted sums, for each of the 8 values of q
        wx = F32(weight[i] * xval[i])
        wi = weight[i]
        for l in range(8):
            q = F32(2 * l + 1)
            wxq[8 * i + l] = F32(wx * q)
            wqq[8 * i + l] = F32(F32(wi * q) * q)
    mx = xval[0]
    for i in range(1, 32):
        v = xval[i]
        mx = mx if mx > v else v
    best = F32(0.0)
    scale = F32(mx / F32(2 * KMAX_Q - 1))
    for k in range(8):
        on_grid[k] = not all_second_pass
    for is_ in range(-n_steps, n_steps + 1):
        id_ = F32(F32(F32(2 * KMAX_Q - 1) + F32(F32(is_) * F32(0.2))) / mx)
        this_scale = F32(F32(1.0) / id_)
        _round_all(xval, id_, Laux)
        for k in range(8):
            gi = kmap[_group_key(Laux, 4 * k)]
            on_grid_aux[k] = gi >= 0
            if gi < 0:
                if find_best_neighbour(neighbours, nvalues, -gi - 1, xval, waux, 4 * k, this_scale, Laux,
                                       dist) < 0:
                    return scale, False
        sumqx, sumq2 = _weighted_sums(wxq, wqq, Laux)
        if sumq2 > 0 and F32(sumqx * sumqx) > F32(best * sumq2):
            scale = F32(sumqx / sumq2)
            best = F32(scale * sumqx)
            for i in range(32):
                L[i] = Laux[i]
            for k in range(8):
                on_grid[k] = on_grid_aux[k]
    n_off = 0
    for k in range(8):
        if not on_grid[k]:
            n_off += 1
    if n_off > 0 and scale > 0:
        id_ = F32(F32(1.0) / scale)
        _round_all(xval, id_, Laux)
        for k in range(8):
            if on_grid[k] and not all_second_pass:
                continue
            gi = kmap[_group_key(Laux, 4 * k)]
            if gi < 0:
                gi = find_best_neighbour(neighbours, nvalues, -gi - 1, xval, waux, 4 * k, scale, L, dist)
                if gi < 0:
                    return scale, False
            for i in range(4):
                L[4 * k + i] = (grid[gi, i] - 1) // 2
        sumqx, sumq2 = _weighted_sums(wxq, wqq, L)
        if sumq2 > 0:
            scale = F32(sumqx / sumq2)
    return scale, True

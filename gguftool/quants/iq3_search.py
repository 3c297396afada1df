"""The lattice search IQ3_XXS and IQ3_S share: one 32-value sub-block onto groups of four grid points.

Mirrors ggml-quants.c iq3_find_best_neighbour and the per-sub-block part of quantize_row_iq3_xxs_impl /
quantize_row_iq3_s_impl (the two differ only in the flags passed here). All arithmetic is float32 in the
reference's order; FMA contraction is off in the reference build, so every product is rounded on its own.

The inputs are the sub-block's magnitudes xval (signs already split off), the weights and their square roots,
and the tables of iq3_grids.py (grid int8[n, 4] of values 2l+1, kmap int32[4096], neighbours uint16[...]).

    find_best_neighbour(neighbours, start, grid, xval, waux, o, scale, L) -> grid index, or -1
    search_sub_block(xval, weight, waux, L, Laux, on_grid, on_grid_aux, grid, kmap, neighbours,
                     n_steps, all_second_pass) -> (scale, ok)

ok is False where llama.cpp aborts the process: a GGML_ASSERT in iq3_find_best_neighbour when no candidate's
weighted distance is below FLT_MAX (overflowed or NaN distances: values of magnitude ~1e13 and beyond), or the
final scale failing `scale >= 0` (NaN). The caller turns that into an error instead of bytes.
"""
from __future__ import annotations

from numba import njit

from .bits import F32, FLT_MAX, nearest_int_c

KMAX_Q = 8


@njit(cache=True, inline="always", error_model="numpy")
def lattice_index(v, id_):
    """The lattice coordinate nearest_int(0.5f*(id*v - 1)) clamped to 0..7 (llama.cpp's MAX(0, MIN(7, l)))."""
    l = nearest_int_c(F32(F32(0.5) * F32(F32(id_ * v) - F32(1.0))))
    return max(0, min(KMAX_Q - 1, l))


@njit(cache=True, error_model="numpy")
def find_best_neighbour(neighbours, start, grid, xval, waux, o, scale, L):
    """iq3_find_best_neighbour for the group of four at xval[o:o+4]: the first neighbour of the list at
    neighbours[start] with the smallest sum waux*(scale*q - x)^2; its coordinates go to L[o:o+4].
    Returns the grid index, or -1 where llama.cpp's GGML_ASSERT(grid_index >= 0) aborts."""
    n = neighbours[start]
    best_d2 = FLT_MAX
    best = -1
    x0 = xval[o]
    x1 = xval[o + 1]
    x2 = xval[o + 2]
    x3 = xval[o + 3]
    w0 = waux[o]
    w1 = waux[o + 1]
    w2 = waux[o + 2]
    w3 = waux[o + 3]
    for j in range(1, n + 1):
        g = neighbours[start + j]
        diff = F32(F32(scale * F32(grid[g, 0])) - x0)
        d2 = F32(F32(0.0) + F32(F32(w0 * diff) * diff))
        diff = F32(F32(scale * F32(grid[g, 1])) - x1)
        d2 = F32(d2 + F32(F32(w1 * diff) * diff))
        diff = F32(F32(scale * F32(grid[g, 2])) - x2)
        d2 = F32(d2 + F32(F32(w2 * diff) * diff))
        diff = F32(F32(scale * F32(grid[g, 3])) - x3)
        d2 = F32(d2 + F32(F32(w3 * diff) * diff))
        if d2 < best_d2:
            best_d2 = d2
            best = int(g)
    if best >= 0:
        for i in range(4):
            L[o + i] = (grid[best, i] - 1) // 2
    return best


@njit(cache=True, error_model="numpy")
def _weighted_sums(weight, xval, L):
    """sum w*x*q and sum w*q*q over the 32 values, q = 2L+1, sequentially as the reference sums."""
    sumqx = F32(0.0)
    sumq2 = F32(0.0)
    for i in range(32):
        w = weight[i]
        q = F32(2 * L[i] + 1)
        sumqx = F32(sumqx + F32(F32(w * xval[i]) * q))
        sumq2 = F32(sumq2 + F32(F32(w * q) * q))
    return sumqx, sumq2


@njit(cache=True, error_model="numpy")
def search_sub_block(xval, weight, waux, L, Laux, on_grid, on_grid_aux, grid, kmap, neighbours,
                     n_steps, all_second_pass):
    """The scale search of one sub-block of 32 (8 groups of 4) whose largest xval (max_) is not negligible.

    n_steps: the trial scales are id = (15 + is*0.2f)/max for is in -n_steps..n_steps (15 for IQ3_XXS, 9 for
    IQ3_S). all_second_pass: IQ3_S re-rounds every group against the chosen scale; IQ3_XXS only the groups
    that were off the grid (and starts with them marked on it). L (int8[32]) gets the coordinates, which are
    all grid points on return. Returns (scale, ok)."""
    for i in range(32):
        L[i] = 0                # memset(L, 0, ...): kept when no trial scale improves (all weights zero)
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
        for k in range(8):
            u = 0
            for i in range(4):
                l = lattice_index(xval[4 * k + i], id_)
                Laux[4 * k + i] = l
                u |= l << (3 * i)
            gi = kmap[u]
            on_grid_aux[k] = True
            if gi < 0:
                on_grid_aux[k] = False
                if find_best_neighbour(neighbours, -gi - 1, grid, xval, waux, 4 * k, this_scale, Laux) < 0:
                    return scale, False
        sumqx, sumq2 = _weighted_sums(weight, xval, Laux)
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
        for k in range(8):
            if on_grid[k] and not all_second_pass:
                continue
            u = 0
            for i in range(4):
                u |= lattice_index(xval[4 * k + i], id_) << (3 * i)
            gi = kmap[u]
            if gi < 0:
                gi = find_best_neighbour(neighbours, -gi - 1, grid, xval, waux, 4 * k, scale, L)
                if gi < 0:
                    return scale, False
            for i in range(4):
                L[4 * k + i] = (grid[gi, i] - 1) // 2
        sumqx, sumq2 = _weighted_sums(weight, xval, L)
        if sumq2 > 0:
            scale = F32(sumqx / sumq2)
    return scale, True

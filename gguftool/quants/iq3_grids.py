"""The lattice tables of IQ3_XXS (256 points) and IQ3_S (512 points), built at import as llama.cpp builds them.

Mirrors ggml-quants.c iq3xs_init_impl. From the point list (iq3_grid_data.py, four 3-bit coordinates per
point) it derives:

    grid        int8[n, 4]     the point's values 2l+1 (1, 3, ..., 15): what the searches scale and compare
    kmap        int32[4096]    for each of the 8^4 coordinate tuples u = l0 | l1<<3 | l2<<6 | l3<<9: its grid
                               index when u is a grid point, else -(offset + 1) of its neighbour list
    neighbours  uint16[...]    per off-grid tuple, in increasing u: the count n, then n grid indices: every
                               grid point at the nearest `nwant` distinct squared distances from u (nwant = 2
                               for the 256-point grid, 3 for the 512-point one), ordered by (distance, index)
                               as llama.cpp's qsort with iq3_compare_func orders them

The neighbour order decides ties in the searches (the first best candidate wins), so it must be exactly
llama.cpp's; (distance, index) pairs are unique, so the sort is fully determined.

The dequantization tables of ggml-common.h (iq3xxs_grid, iq3s_grid) are the same points with each coordinate
mapped through a per-type value table (DEQUANT_VALUES_*; scripts/make_iq3_grids.py checks this against
ggml-common.h): decoded here as uint8[n, 4]. SEARCH_* lay the neighbour lists out for the
searches (search_tables).
"""
from __future__ import annotations

import numpy as np

from .iq3_grid_data import KGRID_256, KGRID_512

KMAP_SIZE = 4096
DEQUANT_VALUES_XXS = np.array([4, 12, 20, 28, 36, 44, 52, 62], np.uint8)   # iq3xxs_grid
DEQUANT_VALUES_S = np.array([1, 3, 5, 7, 9, 11, 13, 15], np.uint8)         # iq3s_grid


def _coords(points: np.ndarray) -> np.ndarray:
    """(n,) packed 3-bit tuples -> (n, 4) coordinates l0..l3."""
    return ((points[:, None] >> (3 * np.arange(4))) & 7).astype(np.int64)


def build_tables(kgrid, nwant: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, kmap, neighbours) of one point list, as iq3xs_init_impl builds them."""
    points = np.asarray(kgrid, dtype=np.int64)
    n = points.size
    gl = _coords(points)
    grid = np.ascontiguousarray((2 * gl + 1).astype(np.int8))
    kmap = np.full(KMAP_SIZE, -1, np.int32)
    kmap[points] = np.arange(n, dtype=np.int32)

    off = np.flatnonzero(kmap < 0)                           # increasing u, as the C loop visits them
    pos = (2 * _coords(off) + 1).astype(np.int32)             # (m, 4)
    d2 = np.zeros((off.size, n), np.int32)                    # squared distances, (m, n)
    for i in range(4):
        diff = grid[None, :, i].astype(np.int32) - pos[:, i, None]
        d2 += diff * diff
    # sort by (distance, index): one int32 key per pair (distances are at most 4 * 14^2, so no overflow)
    key = np.sort(d2 * n + np.arange(n, dtype=np.int32)[None, :], axis=1)
    ds, order = key // n, key % n
    rank = 1 + np.cumsum(ds[:, 1:] != ds[:, :-1], axis=1)     # 1-based rank of each entry's distance value
    counts = 1 + (rank <= nwant).sum(axis=1)                  # entries within the nwant nearest distances
    starts = np.concatenate([[0], np.cumsum(1 + counts)[:-1]])
    kmap[off] = -(starts + 1)
    neighbours = np.zeros(int((1 + counts).sum()), np.uint16)
    neighbours[starts] = counts
    keep = np.arange(n)[None, :] < counts[:, None]            # the first counts[r] entries of row r
    slots = starts[:, None] + 1 + np.arange(n)[None, :]
    neighbours[slots[keep]] = order[keep]
    return grid, kmap, neighbours


def search_tables(grid: np.ndarray, kmap: np.ndarray, neighbours: np.ndarray, lanes: int = 8):
    """The same lists laid out for the searches (iq3_search.py): (kmap, index, values).

    kmap int32[4096] as llama.cpp's, but an off-grid u points (-(start + 1)) into these arrays; index[start] is
    the list's length padded up to a multiple of `lanes`, index[start + 1 + j] its j-th grid index; values
    float32[4, len]: row i holds coordinate i's value (2l+1) of each entry, so the distance search reads the
    candidates as four contiguous columns, `lanes` at a time with no remainder loop. Padding entries have NaN
    values: their distance is NaN, which never compares below the best, so they are never chosen."""
    off = np.flatnonzero(kmap < 0)
    starts = -kmap[off] - 1
    counts = neighbours[starts].astype(np.int64)
    padded = -(-counts // lanes) * lanes
    new_starts = np.concatenate([[0], np.cumsum(1 + padded)[:-1]])
    skmap = kmap.copy()
    skmap[off] = -(new_starts + 1)
    index = np.zeros(int((1 + padded).sum()), np.int32)
    values = np.full((4, index.size), np.nan, np.float32)
    index[new_starts] = padded
    for s_old, s_new, c in zip(starts, new_starts, counts):
        idx = neighbours[s_old + 1:s_old + 1 + c].astype(np.int64)
        index[s_new + 1:s_new + 1 + c] = idx
        values[:, s_new + 1:s_new + 1 + c] = grid[idx].T
    return skmap, index, np.ascontiguousarray(values)


def dequant_grid(kgrid, values: np.ndarray) -> np.ndarray:
    """uint8[n, 4]: the points' coordinates mapped through `values` (ggml-common.h's tables, decoded)."""
    return np.ascontiguousarray(values[_coords(np.asarray(kgrid, dtype=np.int64))])


GRID_XXS, KMAP_XXS, NEIGHBOURS_XXS = build_tables(KGRID_256, 2)
GRID_S, KMAP_S, NEIGHBOURS_S = build_tables(KGRID_512, 3)
SEARCH_XXS = search_tables(GRID_XXS, KMAP_XXS, NEIGHBOURS_XXS)
SEARCH_S = search_tables(GRID_S, KMAP_S, NEIGHBOURS_S)
DEQUANT_GRID_XXS = dequant_grid(KGRID_256, DEQUANT_VALUES_XXS)
DEQUANT_GRID_S = dequant_grid(KGRID_512, DEQUANT_VALUES_S)

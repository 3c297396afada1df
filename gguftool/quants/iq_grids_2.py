"""The E8-style lattice machinery of IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M: ggml-quants.c iq2xs_init_impl's
grids, point maps and neighbour lists, the searches over them and the sign tables.

What llama.cpp builds at start-up (iq2xs_init_impl), built here the same way from the same kgrid tables
(iq2_kgrids.py, generated from ggml-quants.c by scripts/make_iq2_kgrids.py), on first use, once per process:

    grid        uint8 (grid_size, 8): point k's coordinates 2*l + 1 (l the 2-bit fields of kgrid[k]); the
                reference keeps them as int8 bytes of a uint64 (kgrid_q2xs)
    kmap        int32 (43692,): for every point u (8 fields of 2 bits, u = sum l_i << 2i) the grid index when
                u is a grid point, else -(offset + 1) where neighbours[offset] starts u's list
    neighbours  uint16: per off-grid point, [n, j_1 .. j_n]: every grid point at one of the `nwant` smallest
                distinct squared distances from u (nwant 2 for IQ2_XXS/XS, 1 for IQ2_S, 3 for IQ1_S/M), in
                increasing (distance, index) order: the reference qsorts (d2, j) pairs with a total order and
                keeps the leading entries, so the order is unique. Lists are laid out in increasing u.

The searches must visit candidates in this order (ties resolve to the first), hence the exact layout.

Dequantization grids (ggml-common.h iq2xxs_grid, iq2xs_grid, iq2s_grid, iq1s_grid) are the same kgrid
tables with level l mapped to a byte: 0x08, 0x19, 0x2b for the IQ2 types, -1, 0, +1 for IQ1 (checked
against gguf-py's copies in tests/test_quants_iq2_grids.py).

The searches read the lists in another layout (``search_layout``: each entry's 8 levels packed in one uint16,
padded to whole vectors, so the candidates' distances are computed in vector lanes), through ``skmap``.

Tables are built on first use by ``tables(kind)`` (a NamedTuple, cached per process; about 0.1-0.5 s for
the larger grids) and passed to the numba kernels as arrays.
"""
from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from gguftool.quants import iq2_kgrids
from gguftool.quants.bits import F32, FLT_MAX, U64, bit_select_f32, nearest_int_c, select_f32

# --- kinds (iq2_data_index in ggml-quants.c: IQ1_S and IQ1_M share one entry)
IQ2_XXS = 0
IQ2_XS = 1
IQ1 = 2
IQ2_S = 3

KMAP_SIZE = 43692      # every u whose eight 2-bit fields are at most 2 is below this
NGRID_IQ1S = 2048
_GRID_SIZE = {IQ2_XXS: 256, IQ2_XS: 512, IQ1: NGRID_IQ1S, IQ2_S: 1024}
_NWANT = {IQ2_XXS: 2, IQ2_XS: 2, IQ1: 3, IQ2_S: 1}
_KGRID_HEX = {IQ2_XXS: iq2_kgrids.KGRID_IQ2_XXS, IQ2_XS: iq2_kgrids.KGRID_IQ2_XS,
              IQ1: iq2_kgrids.KGRID_IQ1, IQ2_S: iq2_kgrids.KGRID_IQ2_S}

# --- sign tables (ggml-common.h)
# kmask_iq2xs[j] = 1 << j; ksigns_iq2xs[i]: the 7 stored sign bits i plus bit 7 making the count of ones even
KMASK_IQ2XS = np.array([1 << j for j in range(8)], dtype=np.uint8)
KSIGNS_IQ2XS = np.array([i | ((bin(i).count("1") & 1) << 7) for i in range(128)], dtype=np.uint8)

# bytes of the dequantization grids per 2-bit level
_IQ2_LEVEL_BYTES = np.array([0x08, 0x19, 0x2B, 0x00], dtype=np.uint8)
_IQ1_LEVEL_BYTES = np.array([-1, 0, 1, 0], dtype=np.int8)


class IQ2Tables(NamedTuple):
    grid: np.ndarray        # uint8 (grid_size, 8), coordinates 2l+1
    kmap: np.ndarray        # int32 (KMAP_SIZE,), llama.cpp's
    neighbours: np.ndarray  # uint16 (flat lists [n, j_1..j_n]), llama.cpp's
    skmap: np.ndarray       # int32 (KMAP_SIZE,): kmap, its off-grid entries pointing into slists
    slists: np.ndarray      # uint16: the same lists laid out for the searches (search_layout)


def kgrid(kind: int) -> np.ndarray:
    """The uint16 kgrid table of a kind (iq2xs_init_impl's kgrid_2bit_256 / _512 / kgrid_1bit_2048 / _1024)."""
    return np.frombuffer(bytes.fromhex(_KGRID_HEX[kind]), dtype="<u2").astype(np.uint16)


def _levels(kind: int) -> np.ndarray:
    """(grid_size, 8) 2-bit levels of the kgrid points."""
    k = kgrid(kind).astype(np.int64)
    return ((k[:, None] >> (2 * np.arange(8))) & 3).astype(np.uint8)


def dequant_grid(kind: int) -> np.ndarray:
    """The dequantization grid, (grid_size, 8): uint8 bytes for the IQ2 kinds (ggml-common.h iq2xxs_grid,
    iq2xs_grid, iq2s_grid), int8 values for IQ1 (iq1s_grid)."""
    lv = _levels(kind)
    if kind == IQ1:
        return _IQ1_LEVEL_BYTES[lv]
    return _IQ2_LEVEL_BYTES[lv]


# --- neighbour lists (iq2xs_init_impl's two parallel passes)
@njit(cache=True)
def _half_distances(grid, half):
    """T[v, j] = sum over coordinates 4*half .. 4*half+3 of (grid[j, k] - p_k)^2 for the point whose
    4 levels there are the 8 bits of v (p_k = 2l+1): the squared distance splits into two such halves."""
    G = grid.shape[0]
    T = np.empty((256, G), np.int16)
    for v in range(256):
        for j in range(G):
            s = 0
            for k in range(4):
                p = 2 * ((v >> (2 * k)) & 3) + 1
                d = int(grid[j, 4 * half + k]) - p
                s += d * d
            T[v, j] = s
    return T


@njit(cache=True, inline="always")
def _point_lists(lo, hi, i, nwant, d2, hist):
    """Squared distances d2[j] from u = i to every grid point; returns (largest distance kept, count kept):
    all points at the nwant smallest distinct distances."""
    a = lo[i & 255]
    b = hi[i >> 8]
    for j in range(d2.size):
        d2[j] = a[j] + b[j]
    hist[:] = 0
    for j in range(d2.size):
        hist[d2[j]] += 1
    have = 0
    n = 0
    last = -1
    for d in range(hist.size):
        if hist[d] > 0:
            n += hist[d]
            have += 1
            last = d
            if have == nwant:
                break
    return last, n


@njit(cache=True, parallel=True)
def _count_neighbours(lo, hi, kmap, nwant, n_per_i):
    G = lo.shape[1]
    for i in prange(kmap.size):
        if kmap[i] >= 0:
            n_per_i[i] = 0
            continue
        d2 = np.empty(G, np.int16)
        hist = np.empty(8 * 49 + 1, np.int32)
        _, n = _point_lists(lo, hi, i, nwant, d2, hist)
        n_per_i[i] = n


@njit(cache=True, parallel=True)
def _fill_neighbours(lo, hi, kmap, nwant, offsets, out):
    G = lo.shape[1]
    for i in prange(kmap.size):
        if offsets[i] < 0:
            continue
        d2 = np.empty(G, np.int16)
        hist = np.empty(8 * 49 + 1, np.int32)
        last, n = _point_lists(lo, hi, i, nwant, d2, hist)
        o = offsets[i]
        out[o] = n
        # increasing (distance, index), the order of the reference's qsort with a total order: a counting
        # sort, each kept distance's points in increasing index after those of the smaller distances
        pos = o + 1
        for d in range(last + 1):
            c = hist[d]
            hist[d] = pos
            pos += c
        for j in range(G):
            d = d2[j]
            if d <= last:
                out[hist[d]] = j
                hist[d] += 1


# --- the lists as the searches read them
LANES = 8               # candidates per vector in the searches
MAX_LIST = 512          # a list's padded length is at most this (longest lists: 150, 292, 205, 70)
SEARCH_SCRATCH = 32 + MAX_LIST   # float32 scratch of the searches: 24 terms, then one distance per entry


@njit(cache=True)
def _search_layout(kmap, neighbours, kg, skmap, out):
    """Fill skmap and (when out is not empty) out; returns the size out needs. See search_layout."""
    o = 0
    for u in range(kmap.size):
        m = kmap[u]
        if m >= 0:
            skmap[u] = m
            continue
        start = -m - 1
        n = int(neighbours[start])
        p = (n + LANES - 1) // LANES * LANES
        skmap[u] = -(o + 1)
        if out.size > 0:
            out[o] = n
            for j in range(p):
                out[o + 1 + j] = kg[neighbours[start + 1 + min(j, n - 1)]]
            for j in range(n):
                out[o + 1 + p + j] = neighbours[start + 1 + j]
        o += 1 + p + n
    return o


def search_layout(kmap: np.ndarray, neighbours: np.ndarray, kg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(skmap, slists): the neighbour lists as the searches read them.

    skmap[u] is kmap[u] for a grid point; for an off-grid u it is -(s + 1), and slists[s] = n (the list's
    length), slists[s+1 : s+1+P] the entries' levels packed as the map's key (kgrid[j], 2 bits per
    coordinate), P = n rounded up to a multiple of LANES (the padding repeats the last entry; the searches
    never pick it), then slists[s+1+P : s+1+P+n] the entries' grid indices. Same lists, same order."""
    skmap = np.empty_like(kmap)
    size = _search_layout(kmap, neighbours, kg, skmap, np.zeros(0, np.uint16))
    out = np.zeros(size, np.uint16)
    _search_layout(kmap, neighbours, kg, skmap, out)
    longest = int(neighbours[-kmap[kmap < 0] - 1].max())
    if -(-longest // LANES) * LANES > MAX_LIST:
        raise RuntimeError("a neighbour list longer than the searches' scratch")
    return skmap, out


def _build(kind: int) -> IQ2Tables:
    lv = _levels(kind)
    grid = np.ascontiguousarray((2 * lv + 1).astype(np.uint8))
    kmap = np.full(KMAP_SIZE, -1, dtype=np.int32)
    index = (lv.astype(np.int64) << (2 * np.arange(8))).sum(axis=1)
    if index.max() >= KMAP_SIZE:  # the reference would write past its map; the tables never do
        raise RuntimeError("kgrid table holds a point outside the map")
    kmap[index] = np.arange(index.size, dtype=np.int32)
    n_per_i = np.zeros(KMAP_SIZE, dtype=np.int64)
    lo = _half_distances(grid, 0)
    hi = _half_distances(grid, 1)
    _count_neighbours(lo, hi, kmap, _NWANT[kind], n_per_i)
    off_grid = kmap < 0
    sizes = np.where(off_grid, 1 + n_per_i, 0)
    starts = np.cumsum(sizes) - sizes
    offsets = np.where(off_grid, starts, -1).astype(np.int64)
    neighbours = np.zeros(int(sizes.sum()), dtype=np.uint16)
    _fill_neighbours(lo, hi, kmap, _NWANT[kind], offsets, neighbours)
    kmap[off_grid] = (-(offsets[off_grid] + 1)).astype(np.int32)
    skmap, slists = search_layout(kmap, neighbours, kgrid(kind))
    return IQ2Tables(grid, kmap, neighbours, skmap, slists)


_TABLES: dict[int, IQ2Tables] = {}
_lock = threading.Lock()


def tables(kind: int) -> IQ2Tables:
    """The grid, map and neighbour lists of a kind (IQ2_XXS, IQ2_XS, IQ1, IQ2_S), built on first use."""
    t = _TABLES.get(kind)
    if t is None:
        with _lock:
            t = _TABLES.get(kind)
            if t is None:
                t = _build(kind)
                _TABLES[kind] = t
    return t


# --- searches shared by the types
@njit(cache=True, inline="always", error_model="numpy")
def pack_point(L, off):
    """u = sum L[off + i] << 2i of eight levels (the map's key)."""
    u = 0
    for i in range(8):
        u |= int(L[off + i]) << (2 * i)
    return u


@njit(cache=True, inline="always", error_model="numpy")
def _pick(u, i, t0, t1, t2):
    """t0, t1 or t2 as the level of coordinate i in the packed point u (uint32) is 0, 1 or 2: bit 2i selects
    t1 over t0, bit 2i+1 then t2 (no branches, 32-bit lanes: the lane loop vectorises)."""
    return bit_select_f32(u, 2 * i + 1, bit_select_f32(u, 2 * i, t0, t1), t2)


@njit(cache=True, inline="always", error_model="numpy")
def _first_nearest(slists, start, tab):
    """The position j in the list at slists[start] (search_layout) of the first entry with the least distance
    sum_i tab[8*l_i + i] (l_i its levels), summed over i = 0..7 in order from 0.0f, as the reference's
    `d2 += ...; if (d2 < best) ...` loop; -1 when no distance is below FLT_MAX. tab: float32[SEARCH_SCRATCH],
    the 24 terms in tab[0:24]; the distances go to tab[32:]."""
    n = np.int64(slists[start])
    p = (n + LANES - 1) // LANES * LANES
    base = start + 1
    a0 = tab[0]
    a1 = tab[1]
    a2 = tab[2]
    a3 = tab[3]
    a4 = tab[4]
    a5 = tab[5]
    a6 = tab[6]
    a7 = tab[7]
    b0 = tab[8]
    b1 = tab[9]
    b2 = tab[10]
    b3 = tab[11]
    b4 = tab[12]
    b5 = tab[13]
    b6 = tab[14]
    b7 = tab[15]
    c0 = tab[16]
    c1 = tab[17]
    c2 = tab[18]
    c3 = tab[19]
    c4 = tab[20]
    c5 = tab[21]
    c6 = tab[22]
    c7 = tab[23]
    for j in range(p):     # lanes: one candidate each (unsigned indices: no wraparound checks)
        u = np.uint32(slists[U64(base + j)])
        d2 = F32(0.0) + _pick(u, 0, a0, b0, c0)
        d2 = F32(d2 + _pick(u, 1, a1, b1, c1))
        d2 = F32(d2 + _pick(u, 2, a2, b2, c2))
        d2 = F32(d2 + _pick(u, 3, a3, b3, c3))
        d2 = F32(d2 + _pick(u, 4, a4, b4, c4))
        d2 = F32(d2 + _pick(u, 5, a5, b5, c5))
        d2 = F32(d2 + _pick(u, 6, a6, b6, c6))
        tab[U64(32 + j)] = F32(d2 + _pick(u, 7, a7, b7, c7))
    best_d2 = FLT_MAX
    jbest = -1
    for j in range(n):     # the reference's `if (d2 < best_d2)`: the first strict minimum
        d = tab[U64(32 + j)]
        better = d < best_d2
        best_d2 = select_f32(better, d, best_d2)
        jbest = j if better else jbest
    return jbest


@njit(cache=True, inline="always", error_model="numpy")
def _take(slists, start, j, L, off):
    """Entry j of the list at start: its levels to L[off:off+8], its grid index returned."""
    n = np.int64(slists[start])
    p = (n + LANES - 1) // LANES * LANES
    u = int(slists[start + 1 + j])
    for i in range(8):
        L[off + i] = (u >> (2 * i)) & 3
    return int(slists[start + 1 + p + j])


@njit(cache=True, inline="always", error_model="numpy")
def iq2_find_best_neighbour(slists, start, grid, xval, weight, off, scale, L, tab):
    """ggml-quants.c iq2_find_best_neighbour: the neighbour of the list at `start` (search_layout) nearest to
    xval[off:off+8] / scale in the weighted squared distance (first of equals); writes its levels to
    L[off:off+8] and returns its grid index, or -1 when no distance is below FLT_MAX (the reference asserts).

    Speed: a coordinate's term weight*diff*diff (diff = scale*q - x) takes one of three values (the grid's
    levels q are 1, 3, 5), so they are computed once into tab[8*l + i] (tab: float32[SEARCH_SCRATCH]
    scratch); the candidates' distances, the same sequential sums of the same float32 terms as the
    reference's, are then computed in vector lanes (_first_nearest)."""
    for lv in range(3):
        q = np.float32(2 * lv + 1)
        for i in range(8):
            diff = scale * q - xval[off + i]
            tab[8 * lv + i] = weight[off + i] * diff * diff
    j = _first_nearest(slists, start, tab)
    if j < 0:
        return -1
    return _take(slists, start, j, L, off)


@njit(cache=True, inline="always", error_model="numpy")
def iq1_find_best_neighbour2(slists, start, grid, xall, xbase, weight, woff, scale, xg, L, loff, tab):
    """ggml-quants.c iq1_find_best_neighbour2 for the 8 values xall[xbase:xbase+8] with weights
    weight[woff:woff+8]: the list's point (search_layout) minimising sum w (scale*xg[level] - x)^2 (first of
    equals), else the whole grid searched the way the reference does. Writes the levels to L[loff:loff+8];
    returns the grid index, or -1 when the reference would assert (or read outside the tensor).

    The reference's whole-grid fallback compares point i with xval[i] (its loop index, not the coordinate:
    it reads up to 2047 floats past the 8 values, i.e. further along the tensor). xall is the flat tensor, so
    those reads are mirrored while they stay inside it. Past its end the reference reads whatever memory
    follows: the result is still determined when a point inside already scored 0 (nothing scores less), and
    is -1 (undetermined) otherwise.

    Speed (as iq2_find_best_neighbour): coordinate i's term w*diff*diff (diff = scale*xg[l] - x) takes one of
    three values, computed once into tab[8*l + i]; the listed candidates' distances (IQ1's lists are long:
    32 points on average, up to 205) are the reference's sequential float32 sums of those values, computed
    in vector lanes."""
    for lv in range(3):
        q = xg[lv]
        for i in range(8):
            diff = scale * q - xall[xbase + i]
            tab[8 * lv + i] = weight[woff + i] * diff * diff
    j = _first_nearest(slists, start, tab)
    if j >= 0:
        return _take(slists, start, j, L, loff)
    best_score = FLT_MAX
    best = -1
    G = grid.shape[0]
    for i in range(G):
        if xbase + i >= xall.size:
            if best >= 0 and best_score == np.float32(0.0):
                break
            return -1
        d2 = np.float32(0.0)
        xi = xall[xbase + i]
        for j in range(8):
            w = weight[woff + j]
            q = xg[(int(grid[i, j]) - 1) // 2]
            diff = scale * q - xi
            d2 += w * diff * diff
        if d2 < best_score:
            best_score = d2
            best = i
    if best >= 0:
        for i in range(8):
            L[loff + i] = (int(grid[best, i]) - 1) // 2
    return best


@njit(cache=True, inline="always", error_model="numpy")
def iq2_search_16(xval, weight, waux, L, Laux, on_grid, grid, kmap, neigh, max_eps, tab):
    """The scale and lattice search of one 16-value group of quantize_row_iq2_xs_impl and
    quantize_row_iq2_s_impl (identical in both): xval[16] the magnitudes (signs already taken out), weight and
    waux = sqrt(weight) their weights. Leaves the two 8-value points' levels in L[16]; returns (scale, status):
    status -1 for a group whose largest magnitude is below max_eps (the reference skips it), 1 when no
    neighbour is found (the reference asserts), else 0. tab: float32[48] scratch (iq2_find_best_neighbour)."""
    kMaxQ = 3
    mx = xval[0]
    for i in range(1, 16):
        mx = mx if mx > xval[i] else xval[i]
    for i in range(16):
        L[i] = 0
    if mx < max_eps:
        return np.float32(0.0), -1
    best = np.float32(0.0)
    scale = mx / np.float32(2 * kMaxQ - 1)
    on_grid[0] = True
    on_grid[1] = True
    on0 = True
    on1 = True
    for is_ in range(-9, 10):
        id_ = (np.float32(2 * kMaxQ - 1) + np.float32(is_) * np.float32(0.1)) / mx
        this_scale = np.float32(1.0) / id_
        for k in range(2):
            for i in range(8):
                l = nearest_int_c(np.float32(0.5) * (id_ * xval[8 * k + i] - np.float32(1.0)))
                l = l if l < kMaxQ - 1 else kMaxQ - 1
                Laux[8 * k + i] = l if l > 0 else 0
            u = pack_point(Laux, 8 * k)
            on = kmap[u] >= 0
            if k == 0:
                on0 = on
            else:
                on1 = on
            if not on:
                g = iq2_find_best_neighbour(neigh, -kmap[u] - 1, grid, xval, waux, 8 * k, this_scale, Laux, tab)
                if g < 0:
                    return scale, 1
        sumqx = np.float32(0.0)
        sumq2 = np.float32(0.0)
        for i in range(16):
            w = weight[i]
            q = np.float32(2 * Laux[i] + 1)
            sumqx += w * xval[i] * q
            sumq2 += w * q * q
        if sumq2 > np.float32(0.0) and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(16):
                L[i] = Laux[i]
            on_grid[0] = on0
            on_grid[1] = on1
    if (not on_grid[0] or not on_grid[1]) and scale > np.float32(0.0):
        id_ = np.float32(1.0) / scale
        for k in range(2):
            if on_grid[k]:
                continue
            u = 0
            for i in range(8):
                l = nearest_int_c(np.float32(0.5) * (id_ * xval[8 * k + i] - np.float32(1.0)))
                l = l if l < kMaxQ - 1 else kMaxQ - 1
                l = l if l > 0 else 0
                u |= l << (2 * i)
                L[8 * k + i] = l
            if kmap[u] < 0:
                g = iq2_find_best_neighbour(neigh, -kmap[u] - 1, grid, xval, waux, 8 * k, scale, L, tab)
                if g < 0:
                    return scale, 1
        sumqx = np.float32(0.0)
        sumq2 = np.float32(0.0)
        for i in range(16):
            w = weight[i]
            q = np.float32(2 * L[i] + 1)
            sumqx += w * xval[i] * q
            sumq2 += w * q * q
        if sumq2 > np.float32(0.0):
            scale = sumqx / sumq2
    return scale, 0


@njit(cache=True, inline="always", error_model="numpy")
def sort_order(xb, n, idx):
    """idx[0:n] = the indices of xb[0:n] in increasing value, equal values in increasing index.

    quantize_row_iq1_s/m_impl sort (value, index) pairs with qsort comparing the values only; glibc's qsort
    is a merge sort for arrays this small (stable), so equal values keep their index order. An insertion
    sort (stable, and quick for 16 or 32 values) gives the same order."""
    for j in range(n):
        v = xb[j]
        k = j
        while k > 0 and xb[idx[k - 1]] > v:
            idx[k] = idx[k - 1]
            k -= 1
        idx[k] = j

"""Per-sub-block searches of ggml-quants.c run side by side as SIMD lanes (numba), bit-identical with the
scalar ports.

The K-quants (and the legacy types with an importance matrix) search every sub-block independently: the same
float32 operations on different data. Here lane j carries sub-block j through exactly the reference's float32
operations, every sum accumulated element after element in the reference's order; branches become per-lane
selects. The data is transposed element-major (``[lanes * i + j]``: element i of lane j) so that the inner loop
over lanes runs over contiguous memory and LLVM vectorises it.

``qkx_lanes(x, ws, L, scales, mins, n, lanes, nmax, rmin, rdelta, nstep, use_mad, le_check)``
    ``make_qkx2_quants`` (le_check False: a sub-block is flat when max == min) and ``make_qkx3_quants``
    (le_check True: max <= min) for ``nl = scales.size <= lanes`` sub-blocks of n elements, x[n*j:n*j+n]
    being sub-block j; use_mad: the absolute error instead of the squared one (Q2_K's reference path).
    Bit-identical with ``search_affine.qkx_search`` on each sub-block. ws: float32[qkx_workspace(n, lanes)];
    on entry plane 1 (``ws[n*lanes:2*n*lanes]``, ``[lanes*i + j]``) holds the weight of element i of
    sub-block j. Writes L[0:n*nl] (uint8, sub-block-major as x), scales[j] (the returned scale) and mins[j]
    (the returned ``the_min``). nstep >= 1.
    Callers: Q2_K (16 lanes x 16, nmax 3), Q4_K / Q5_K (16 x 32: two super-blocks, nmax 15 / 31),
    Q4_1 / Q5_1 with an imatrix (the 32-blocks of a row, 8 at a time, nmax 15 / 31).

``q3_lanes(x, ws, L, scales, lanes)``
    ``make_q3_quants(16, 4, x, L, true)`` (Q3_K's reference path: 32 lanes, two blocks) for
    ``nl = scales.size <= lanes`` sub-blocks of 16, x finite. Bit-identical with ``search_symmetric.make_q3_quants_rmse``.
    ws: float32[q3_workspace(lanes)]. Writes L[0:16*nl] (int8, levels + 4 as the reference leaves them,
    0 for an all-zero sub-block) and scales[j].

Lane loops run to ``nl``, a run-time value, so that LLVM keeps them as loops and vectorises them; ``n``,
``lanes`` and ``nmax`` are constants at the (inlined) call sites. LLVM vectorises such a loop as 8 lanes x 2
interleaved: with fewer than 16 lanes only its 4-wide remainder loop runs, hence the callers' 16 and 32
lanes. A constant trip count is worse: LLVM unrolls the lane loop fully into scalar code.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import GROUP_MAX_EPS, nearest_int_c, select_f32

U = np.uint64


def qkx_workspace(n: int, lanes: int) -> int:
    """float32 elements of qkx_lanes' workspace: 3 planes of n x lanes + 16 rows of lanes."""
    return 3 * n * lanes + 16 * lanes


def q3_workspace(lanes: int) -> int:
    """float32 elements of q3_lanes' workspace: 4 planes of 16 x lanes + 8 rows of lanes."""
    return 4 * 16 * lanes + 8 * lanes


# --- make_qkx2_quants / make_qkx3_quants
@njit(cache=True, inline="always", error_model="numpy")
def _levels(X, isc, mn, LA, nl, n, lanes, nmax):
    """LA[lanes*i + j] = clamp(nearest_int(isc[j] * (X[lanes*i + j] - mn[j])), 0, nmax) for every lane j."""
    for i in range(n):
        for j in range(nl):
            k = U(lanes * i + j)
            l = nearest_int_c(isc[U(j)] * (X[k] - mn[U(j)]))
            l = nmax if nmax < l else l
            l = 0 if 0 > l else l
            LA[k] = np.float32(l)


@njit(cache=True, inline="always", error_model="numpy")
def qkx_lanes(x, ws, L, scales, mins, n, lanes, nmax, rmin, rdelta, nstep, use_mad, le_check):
    """See the module docstring. Steps whose levels repeat are evaluated too (an equal error never wins under
    the strict <, as in the reference); the winning levels are not copied at each improvement: a lane keeps
    the winning step's iscale and the min it rounded with, and the levels are rounded again from them at the
    end (the same float32 operations, so the same levels). A flat sub-block gets the reference's early
    result (levels 0, scale 0, the_min = -min)."""
    nl = scales.size
    P = n * lanes
    X = ws[0:P]
    W = ws[P:2 * P]
    LA = ws[2 * P:3 * P]
    V = ws[3 * P:3 * P + 16 * lanes]
    mn = V[0:lanes]
    mx = V[lanes:2 * lanes]
    sw = V[2 * lanes:3 * lanes]
    sx = V[3 * lanes:4 * lanes]
    scale = V[4 * lanes:5 * lanes]
    best = V[5 * lanes:6 * lanes]
    isc = V[6 * lanes:7 * lanes]
    sl = V[7 * lanes:8 * lanes]
    sl2 = V[8 * lanes:9 * lanes]
    sxl = V[9 * lanes:10 * lanes]
    ce = V[10 * lanes:11 * lanes]
    tsc = V[11 * lanes:12 * lanes]
    tmn = V[12 * lanes:13 * lanes]
    wisc = V[13 * lanes:14 * lanes]
    wmn = V[14 * lanes:15 * lanes]
    mn0 = V[15 * lanes:16 * lanes]
    rmin = np.float32(rmin)
    rdelta = np.float32(rdelta)
    fnmax = np.float32(nmax)
    zero = np.float32(0.0)
    for i in range(n):
        for j in range(nl):
            X[U(lanes * i + j)] = x[U(n * j + i)]
    for j in range(nl):
        v = X[U(j)]
        mn[U(j)] = v
        mx[U(j)] = v
        w = W[U(j)]
        sw[U(j)] = w
        sx[U(j)] = w * v
    for i in range(1, n):
        for j in range(nl):
            k = U(lanes * i + j)
            xi = X[k]
            a = mn[U(j)]
            mn[U(j)] = select_f32(xi < a, xi, a)
            b = mx[U(j)]
            mx[U(j)] = select_f32(xi > b, xi, b)
            w = W[k]
            sw[U(j)] = sw[U(j)] + w
            sx[U(j)] = sx[U(j)] + w * xi
    for j in range(nl):
        a = mn[U(j)]
        a = select_f32(a > zero, zero, a)
        mn[U(j)] = a
        mn0[U(j)] = a
        c = fnmax / (mx[U(j)] - a)
        isc[U(j)] = c
        wisc[U(j)] = c
        wmn[U(j)] = a
        scale[U(j)] = np.float32(1.0) / c
        best[U(j)] = zero
    _levels(X, isc, mn, LA, nl, n, lanes, nmax)
    for i in range(n):
        for j in range(nl):
            k = U(lanes * i + j)
            diff = scale[U(j)] * LA[k] + mn[U(j)] - X[k]
            diff = abs(diff) if use_mad else diff * diff
            best[U(j)] = best[U(j)] + W[k] * diff
    for istep in range(nstep + 1):
        num = rmin + rdelta * np.float32(istep) + fnmax
        for j in range(nl):
            isc[U(j)] = num / (mx[U(j)] - mn[U(j)])
            sl[U(j)] = zero
            sl2[U(j)] = zero
            sxl[U(j)] = zero
            ce[U(j)] = zero
        # (separate loops with few arrays each: LLVM vectorises them across the lanes)
        _levels(X, isc, mn, LA, nl, n, lanes, nmax)
        for i in range(n):
            for j in range(nl):
                k = U(lanes * i + j)
                fl = LA[k]
                wl = W[k] * fl
                sl[U(j)] = sl[U(j)] + wl
                sl2[U(j)] = sl2[U(j)] + wl * fl
        for i in range(n):
            for j in range(nl):
                k = U(lanes * i + j)
                sxl[U(j)] = sxl[U(j)] + (W[k] * LA[k]) * X[k]
        for j in range(nl):
            a = sl[U(j)]
            b = sl2[U(j)]
            c = sxl[U(j)]
            sw_ = sw[U(j)]
            sx_ = sx[U(j)]
            D = sw_ * b - a * a
            ts = (sw_ * c - sx_ * a) / D
            tm = (b * sx_ - a * c) / D
            alt = c / b
            pos = tm > zero
            tsc[U(j)] = select_f32(pos, alt, ts)
            tmn[U(j)] = select_f32(pos, zero, tm)
        for i in range(n):
            for j in range(nl):
                k = U(lanes * i + j)
                diff = tsc[U(j)] * LA[k] + tmn[U(j)] - X[k]
                diff = abs(diff) if use_mad else diff * diff
                ce[U(j)] = ce[U(j)] + W[k] * diff
        for j in range(nl):
            a = sl[U(j)]
            D = sw[U(j)] * sl2[U(j)] - a * a
            c = ce[U(j)]
            upd = (D > zero) & (c < best[U(j)])
            m = mn[U(j)]
            best[U(j)] = select_f32(upd, c, best[U(j)])
            scale[U(j)] = select_f32(upd, tsc[U(j)], scale[U(j)])
            wisc[U(j)] = select_f32(upd, isc[U(j)], wisc[U(j)])
            wmn[U(j)] = select_f32(upd, m, wmn[U(j)])
            mn[U(j)] = select_f32(upd, tmn[U(j)], m)
    for j in range(nl):
        a = mn0[j]
        b = mx[j]
        flat = (b <= a) if le_check else (b == a)
        if flat:
            scales[j] = zero
            mins[j] = -a
            for i in range(n):
                L[n * j + i] = 0
        else:
            scales[j] = scale[j]
            mins[j] = -mn[j]
            c = wisc[j]
            m = wmn[j]
            for i in range(n):
                l = nearest_int_c(c * (x[n * j + i] - m))
                l = nmax if nmax < l else l
                l = 0 if 0 > l else l
                L[n * j + i] = l


# --- make_q3_quants(16, 4, x, L, true)
@njit(cache=True, inline="always", error_model="numpy")
def legacy_qkx3_lanes(x, off, nl, qw, sigma2, ws, L, scales, mins, n, lanes, nmax):
    """Q4_1 / Q5_1 with an imatrix: blocks off/n .. off/n + nl - 1 (nl <= lanes) of a row, each weighted
    qw * sqrt(sigma2 + x^2) as quantize_row_q4_1/q5_1_impl do, searched by make_qkx3_quants(n, nmax, -0.9, 0.05,
    36 steps, squared error) as lanes; the weights go where qkx_lanes reads them (ws[n*lanes:2*n*lanes])."""
    W = ws[n * lanes:2 * n * lanes]
    for j in range(nl):
        for i in range(n):
            v = x[np.uint64(off + n * j + i)]
            W[np.uint64(lanes * i + j)] = qw[np.uint64(off + n * j + i)] * np.sqrt(sigma2 + v * v)
    qkx_lanes(x[off:off + n * nl], ws, L, scales[:nl], mins[:nl], n, lanes, nmax, np.float32(-0.9),
              np.float32(0.05), 36, False, True)


@njit(cache=True, inline="always", error_model="numpy")
def q3_lanes(x, ws, L, scales, lanes):
    """See the module docstring. The reference's coordinate descent visits the elements of a sub-block in
    order, each visit depending on the sums the previous one left; across sub-blocks the visits are
    independent, so the lanes run them in step. A lane whose pass changed nothing leaves the loop in the
    reference; here it runs the further passes with the others, which change nothing either (a pass is a
    function of the levels and sums, which it did not change), so its result is the reference's."""
    nl = scales.size
    n = 16
    P = n * lanes
    X = ws[0:P]
    W = ws[P:2 * P]
    WX = ws[2 * P:3 * P]
    LA = ws[3 * P:4 * P]
    V = ws[4 * P:4 * P + 8 * lanes]
    amax = V[0:lanes]
    fmax = V[lanes:2 * lanes]
    slx_ = V[2 * lanes:3 * lanes]
    sl2_ = V[3 * lanes:4 * lanes]
    chg = V[4 * lanes:5 * lanes]
    isc = V[5 * lanes:6 * lanes]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for i in range(n):
        for j in range(nl):
            X[U(lanes * i + j)] = x[U(n * j + i)]
    for j in range(nl):
        amax[U(j)] = zero
        fmax[U(j)] = zero
        slx_[U(j)] = zero
        sl2_[U(j)] = zero
    for i in range(n):
        for j in range(nl):
            xi = X[U(lanes * i + j)]
            ax = abs(xi)
            up = ax > amax[U(j)]
            amax[U(j)] = select_f32(up, ax, amax[U(j)])
            fmax[U(j)] = select_f32(up, xi, fmax[U(j)])
    for j in range(nl):
        isc[U(j)] = -np.float32(4.0) / fmax[U(j)]
    for i in range(n):
        for j in range(nl):
            k = U(lanes * i + j)
            xi = X[k]
            wi = xi * xi
            W[k] = wi
            WX[k] = wi * xi
            l = nearest_int_c(isc[U(j)] * xi)
            l = 3 if 3 < l else l
            l = -4 if -4 > l else l
            LA[k] = np.float32(l)
    for i in range(n):
        for j in range(nl):
            k = U(lanes * i + j)
            fl = LA[k]
            slx_[U(j)] = slx_[U(j)] + WX[k] * fl
            sl2_[U(j)] = sl2_[U(j)] + (W[k] * fl) * fl
    for itry in range(5):
        for j in range(nl):
            chg[U(j)] = zero
        for i in range(n):
            for j in range(nl):
                k = U(lanes * i + j)
                fLi = LA[k]
                sumlx = slx_[U(j)]
                suml2 = sl2_[U(j)]
                slx = sumlx - WX[k] * fLi
                sl2 = suml2 - (W[k] * fLi) * fLi
                new_l = nearest_int_c((X[k] * sl2) / slx)
                new_l = 3 if 3 < new_l else new_l
                new_l = -4 if -4 > new_l else new_l
                fnl = np.float32(new_l)
                slx2 = slx + WX[k] * fnl
                sl22 = sl2 + (W[k] * fnl) * fnl
                acc = (slx > zero) & (fnl != fLi) & (sl22 > zero) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
                LA[k] = select_f32(acc, fnl, fLi)
                slx_[U(j)] = select_f32(acc, slx2, sumlx)
                sl2_[U(j)] = select_f32(acc, sl22, suml2)
                chg[U(j)] = chg[U(j)] + select_f32(acc, one, zero)
        total = zero
        for j in range(nl):
            total = total + chg[U(j)]
        if total == zero:
            break
    for j in range(nl):
        if amax[j] < GROUP_MAX_EPS:
            scales[j] = zero
            for i in range(n):
                L[n * j + i] = 0
        else:
            s2 = sl2_[j]
            scales[j] = slx_[j] / s2 if s2 > zero else zero
            for i in range(n):
                L[n * j + i] = np.int32(LA[U(lanes * i + j)]) + 4

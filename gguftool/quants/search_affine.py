"""Scale+min and unsigned-scale searches of ggml-quants.c, float32-exact (numba).

These mirror llama.cpp's ``make_qkx2_quants``, ``make_qkx3_quants`` and ``make_qp_quants`` operation for
operation: the same float32 expressions evaluated in the same order, sequential float32 sums, the same
branches (including the C ``MIN``/``MAX`` ternaries, which matter when NaN/Inf appear) and the same uint8
truncation where the reference stores an ``int`` into a ``uint8_t``. Two exact shortcuts make them faster than
the C loops (see ``qkx_search``): search steps whose levels repeat the previous step's are skipped, and for
32-element groups the per-step products go through scratch so the sequential sums do not wait on them.

API (all ``@njit(cache=True, error_model="numpy")``: float division by zero gives inf/NaN as in C instead of
raising; call them from other numba code, or from Python with float32 arrays):

``make_qkx3_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad, fs=None) -> (scale, the_min)``
    x, weights: float32[n] (``weights.size == 0`` stands for the C ``weights == NULL``: weights x[i]*x[i]);
    L: uint8[>=n] output levels in [0, nmax]; Laux: uint8[>=n] scratch. rmin, rdelta: the float32 search
    parameters (cast to float32 inside, so -0.9 means -0.9f); nstep: int; use_mad: bool. fs: optional float32
    scratch of at least ``SCRATCH_PER_ELEM * n`` elements (allocated when omitted; pass one from a hot loop).
    Returns float32 ``scale`` (the C return value) and float32 ``the_min`` (what C writes to ``*the_min``:
    minus the fitted offset, >= 0). Reconstruction: x ~= scale * L - the_min.

``qkx_search(...)``: the shared body, on offsets into larger arrays; with ``le_check`` False it is
    ``make_qkx2_quants`` (which the K-types' reference paths call through it directly).

``make_qp_quants(n, nmax, x, L, quant_weights) -> scale``
    x, quant_weights: float32[n]; L: uint8[>=n] output. Returns the float32 scale (``sumlx / suml2`` or 0).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import GROUP_MAX_EPS, nearest_int_c

SCRATCH_PER_ELEM = 5


@njit(cache=True, inline="always", error_model="numpy")
def qkx_search(n, nmax, x, xo, weights, wo, L, lo, Laux, rmin, rdelta, nstep, use_mad, le_check, fs):
    """Shared body of make_qkx2_quants (le_check False: ``max == min``) and make_qkx3_quants (``max <= min``).

    Works on x[xo:xo+n], weights[wo:wo+n], L[lo:lo+n] through offsets (no array views, so no reference
    counting in the hot loop); Laux: uint8[n]; fs: float32 scratch of 4*n. Inline, so that n, nmax, nstep
    are constants in the kernels. Two exact shortcuts: a step whose levels equal the previous step's is
    skipped (its sums, fit and error only depend on the levels, and an equal error never beats best_error
    under the strict <); for n > 16 the per-element products go through scratch so the sums do not wait
    on them (same values, same summation order)."""
    rmin = np.float32(rmin)
    rdelta = np.float32(rdelta)
    fnmax = np.float32(nmax)
    oa = 0
    ob = n
    oc = 2 * n
    om = 3 * n
    mn = x[xo]
    mx = x[xo]
    sum_w = weights[wo]
    sum_x = sum_w * x[xo]
    for i in range(1, n):
        xi = x[xo + i]
        if xi < mn:
            mn = xi
        if xi > mx:
            mx = xi
        w = weights[wo + i]
        sum_w += w
        sum_x += w * xi
    if mn > np.float32(0.0):
        mn = np.float32(0.0)
    if (mx <= mn) if le_check else (mx == mn):
        for i in range(n):
            L[lo + i] = 0
        return np.float32(0.0), -mn
    for i in range(n):
        fs[om + i] = x[xo + i] - mn
    iscale = fnmax / (mx - mn)
    scale = np.float32(1.0) / iscale
    best_error = np.float32(0.0)
    for i in range(n):
        l = nearest_int_c(iscale * fs[om + i])
        l = nmax if nmax < l else l
        l = 0 if 0 > l else l
        L[lo + i] = l
        diff = scale * np.float32(l) + mn - x[xo + i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[wo + i] * diff
    if nstep < 1:
        return scale, -mn
    for istep in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(istep) + fnmax) / (mx - mn)
        nchanged = 0
        for i in range(n):
            l = nearest_int_c(iscale * fs[om + i])
            l = nmax if nmax < l else l
            l = 0 if 0 > l else l
            nchanged += int(Laux[i]) != l
            Laux[i] = l
        # The evaluation of a step depends only on its levels (not on min): the same levels as the step
        # before give the same error, which cannot beat best_error (strict <) -- skip it.
        if istep > 0 and nchanged == 0:
            continue
        if n > 16:                      # products in a vectorisable loop, then the sequential sums
            for i in range(n):
                fl = np.float32(Laux[i])
                wl = weights[wo + i] * fl
                fs[oa + i] = wl
                fs[ob + i] = wl * fl
                fs[oc + i] = wl * x[xo + i]
            sum_l = np.float32(0.0)
            sum_l2 = np.float32(0.0)
            sum_xl = np.float32(0.0)
            for i in range(n):
                sum_l += fs[oa + i]
                sum_l2 += fs[ob + i]
                sum_xl += fs[oc + i]
        else:
            sum_l = np.float32(0.0)
            sum_l2 = np.float32(0.0)
            sum_xl = np.float32(0.0)
            for i in range(n):
                fl = np.float32(Laux[i])
                wl = weights[wo + i] * fl
                sum_l += wl
                sum_l2 += wl * fl
                sum_xl += wl * x[xo + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > np.float32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > np.float32(0.0):
                this_min = np.float32(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = np.float32(0.0)
            if n > 16:
                for i in range(n):
                    diff = this_scale * np.float32(Laux[i]) + this_min - x[xo + i]
                    diff = abs(diff) if use_mad else diff * diff
                    fs[oa + i] = weights[wo + i] * diff
                for i in range(n):
                    cur_error += fs[oa + i]
            else:
                for i in range(n):
                    diff = this_scale * np.float32(Laux[i]) + this_min - x[xo + i]
                    diff = abs(diff) if use_mad else diff * diff
                    cur_error += weights[wo + i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[lo + i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
                for i in range(n):      # the reference recomputes x[i] - min with the new min
                    fs[om + i] = x[xo + i] - mn
    return scale, -mn


@njit(cache=True, error_model="numpy")
def make_qkx3_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad, fs=None):
    if fs is None:
        scratch = np.empty(SCRATCH_PER_ELEM * n, np.float32)
    else:
        scratch = fs
    if weights.size > 0:
        return qkx_search(n, nmax, x, 0, weights, 0, L, 0, Laux, rmin, rdelta, nstep, use_mad, True, scratch)
    for i in range(n):                     # C: weights == NULL -> x[i]*x[i], kept in scratch[4n:5n]
        scratch[4 * n + i] = x[i] * x[i]
    return qkx_search(n, nmax, x, 0, scratch, 4 * n, L, 0, Laux, rmin, rdelta, nstep, use_mad, True, scratch)


@njit(cache=True, error_model="numpy")
def make_qp_quants(n, nmax, x, L, quant_weights):
    fnmax = np.float32(nmax)
    mx = np.float32(0.0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]          # C MAX(max, x[i])
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    iscale = fnmax / mx
    for i in range(n):
        L[i] = nearest_int_c(iscale * x[i]) & 0xFF
    scale = np.float32(1.0) / iscale
    best_mse = np.float32(0.0)
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        w = quant_weights[i]
        best_mse += w * diff * diff
    for istep in range(-4, 5):
        if istep == 0:
            continue
        iscale_is = (np.float32(0.1) * np.float32(istep) + fnmax) / mx
        scale_is = np.float32(1.0) / iscale_is
        mse = np.float32(0.0)
        for i in range(n):
            l = nearest_int_c(iscale_is * x[i])
            l = nmax if nmax < l else l             # C MIN(nmax, l)
            diff = x[i] - scale_is * np.float32(l)
            w = quant_weights[i]
            mse += w * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        l = nearest_int_c(iscale * x[i])
        l = nmax if nmax < l else l
        L[i] = l & 0xFF
        w = quant_weights[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for itry in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            fL = np.float32(L[i])
            slx = sumlx - w * x[i] * fL
            sl2 = suml2 - w * fL * fL
            if slx > np.float32(0.0) and sl2 > np.float32(0.0):
                new_l = nearest_int_c(x[i] * sl2 / slx)
                new_l = nmax if nmax < new_l else new_l
                if new_l != int(L[i]):
                    fn = np.float32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > np.float32(0.0) else np.float32(0.0)

"""Scale+min and unsigned-scale searches of ggml-quants.c, float32-exact (numba).

These mirror llama.cpp's ``make_qkx2_quants``, ``make_qkx3_quants`` and ``make_qp_quants`` operation for
operation: the same float32 expressions evaluated in the same order, sequential float32 sums, the same
branches (including the C ``MIN``/``MAX`` ternaries, which matter when NaN/Inf appear) and the same uint8
truncation where the reference stores an ``int`` into a ``uint8_t``.

API (all ``@njit(cache=True, error_model="numpy")``: float division by zero gives inf/NaN as in C instead of
raising; call them from other numba code, or from Python with float32 arrays):

``nearest_int_c(f) -> int``
    ggml's ``nearest_int`` including its behaviour outside |f| <= 4194303 (the assert is compiled out in
    llama.cpp release builds): the low 23 mantissa bits of ``f + 12582912.f`` minus 0x400000. NaN gives 0,
    +-Inf gives -4194304. Inside the range it is round-half-even, i.e. ``rint``.

``make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad) -> (scale, the_min)``
    x, weights: float32[n] (weights required); L: uint8[>=n] output levels in [0, nmax]; Laux: uint8[>=n]
    scratch. rmin, rdelta: the float32 search parameters (cast to float32 inside); nstep: int; use_mad: bool.
    Returns float32 ``scale`` (the C return value) and float32 ``the_min`` (what C writes to ``*the_min``,
    i.e. minus the fitted offset, >= 0). Reconstruction: x ~= scale * L - the_min.

``make_qkx3_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad) -> (scale, the_min)``
    Same contract. ``weights.size == 0`` stands for the C ``weights == NULL`` (weights x[i]*x[i]).

``make_qp_quants(n, nmax, x, L, quant_weights) -> scale``
    x, quant_weights: float32[n]; L: uint8[>=n] output. Returns the float32 scale (``sumlx / suml2`` or 0).

Callers pass 1-D views (slices) of their own scratch; nothing here allocates.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

F32 = np.float32
GROUP_MAX_EPS = np.float32(1e-15)


@njit(cache=True, inline="always", error_model="numpy")
def nearest_int_c(f):
    """ggml nearest_int, bit-exact also outside its asserted range (see module docstring)."""
    f = np.float32(f)
    if abs(f) <= np.float32(4194303.0):
        return int(np.rint(f))
    return _nearest_int_slow(f)


@njit(cache=True, error_model="numpy")
def _nearest_int_slow(f):
    val = np.float32(f + np.float32(12582912.0))
    if val != val:              # NaN: quiet-NaN mantissa 0x400000
        return 0
    a = abs(float(val))
    if a == math.inf:           # mantissa field 0
        return -0x400000
    if a == 0.0:
        return -0x400000
    m, e = math.frexp(a)        # a = m * 2^e, m in [0.5, 1); val is a normal float32 here
    mant = int((m * 2.0 - 1.0) * 8388608.0)
    return (mant & 0x7FFFFF) - 0x400000


@njit(cache=True, error_model="numpy")
def make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    rmin = np.float32(rmin)
    rdelta = np.float32(rdelta)
    fnmax = np.float32(nmax)
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        xi = x[i]
        if xi < mn:
            mn = xi
        if xi > mx:
            mx = xi
        w = weights[i]
        sum_w += w
        sum_x += w * xi
    if mn > np.float32(0.0):
        mn = np.float32(0.0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return np.float32(0.0), -mn
    iscale = fnmax / (mx - mn)
    scale = np.float32(1.0) / iscale
    best_error = np.float32(0.0)
    for i in range(n):
        l = nearest_int_c(iscale * (x[i] - mn))
        l = nmax if nmax < l else l
        l = 0 if 0 > l else l
        L[i] = l
        diff = scale * np.float32(l) + mn - x[i]
        if use_mad:
            diff = abs(diff)
        else:
            diff = diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -mn
    for istep in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(istep) + fnmax) / (mx - mn)
        sum_l = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        sum_xl = np.float32(0.0)
        for i in range(n):
            l = nearest_int_c(iscale * (x[i] - mn))
            l = nmax if nmax < l else l
            l = 0 if 0 > l else l
            Laux[i] = l
            w = weights[i]
            fl = np.float32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > np.float32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > np.float32(0.0):
                this_min = np.float32(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = np.float32(0.0)
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                if use_mad:
                    diff = abs(diff)
                else:
                    diff = diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True, error_model="numpy")
def make_qkx3_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    rmin = np.float32(rmin)
    rdelta = np.float32(rdelta)
    fnmax = np.float32(nmax)
    has_w = weights.size > 0
    mn = x[0]
    mx = x[0]
    sum_w = weights[0] if has_w else x[0] * x[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        xi = x[i]
        if xi < mn:
            mn = xi
        if xi > mx:
            mx = xi
        w = weights[i] if has_w else xi * xi
        sum_w += w
        sum_x += w * xi
    if mn > np.float32(0.0):
        mn = np.float32(0.0)
    if mx <= mn:
        for i in range(n):
            L[i] = 0
        return np.float32(0.0), -mn
    iscale = fnmax / (mx - mn)
    scale = np.float32(1.0) / iscale
    best_mad = np.float32(0.0)
    for i in range(n):
        xi = x[i]
        l = nearest_int_c(iscale * (xi - mn))
        l = nmax if nmax < l else l
        l = 0 if 0 > l else l
        L[i] = l
        diff = scale * np.float32(l) + mn - xi
        if use_mad:
            diff = abs(diff)
        else:
            diff = diff * diff
        w = weights[i] if has_w else xi * xi
        best_mad += w * diff
    if nstep < 1:
        return scale, -mn
    for istep in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(istep) + fnmax) / (mx - mn)
        sum_l = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        sum_xl = np.float32(0.0)
        for i in range(n):
            xi = x[i]
            l = nearest_int_c(iscale * (xi - mn))
            l = nmax if nmax < l else l
            l = 0 if 0 > l else l
            Laux[i] = l
            w = weights[i] if has_w else xi * xi
            fl = np.float32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * xi
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > np.float32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > np.float32(0.0):
                this_min = np.float32(0.0)
                this_scale = sum_xl / sum_l2
            mad = np.float32(0.0)
            for i in range(n):
                xi = x[i]
                diff = this_scale * np.float32(Laux[i]) + this_min - xi
                if use_mad:
                    diff = abs(diff)
                else:
                    diff = diff * diff
                w = weights[i] if has_w else xi * xi
                mad += w * diff
            if mad < best_mad:
                for i in range(n):
                    L[i] = Laux[i]
                best_mad = mad
                scale = this_scale
                mn = this_min
    return scale, -mn


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
            l = l if l < nmax else nmax             # C MIN(nmax, l)
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
        l = l if l < nmax else nmax
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
                new_l = new_l if new_l < nmax else nmax
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

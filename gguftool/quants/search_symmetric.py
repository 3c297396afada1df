"""Signed symmetric scale searches of ggml-quants.c: make_qx_quants and make_q3_quants.

Both pick one scale d for a group of n values so that x[i] ~= d * (L[i] - nmax) with L[i] in [0, 2*nmax).
They are numba functions meant to be called from other kernels; the arithmetic mirrors the C reference
operation by operation in float32 (same order of sequential sums, same comparisons), so results are
bit-identical with llama.cpp's x86-64 build (compiled without FMA contraction).

API (all arrays 1-D, at least n long; slices of bigger arrays are fine, they are views):

    make_qx_quants(n: int, nmax: int, x: float32[:], L: int8[:], rmse_type: int, qw: float32[:]) -> float32
        ggml's make_qx_quants. Writes L[0:n] (values in [0, 2*nmax)) and returns the scale.
        qw: per-element weights; an EMPTY array (qw.size == 0) means NULL (no weights), in which case the
        weight is chosen by rmse_type: 1 -> x*x, 2 -> 1, 3 -> |x|, otherwise sqrt(|x|).
        rmse_type 0: plain rounding with iscale = -nmax/max, returns 1/iscale (weights unused).
        rmse_type < 0: one least-squares refinement of the first rounding, returns the mean of the fitted
        and the initial scale (the "return_early" mode), weights chosen by -rmse_type.
        rmse_type > 0: full search over 18 extra trial scales -(nmax + 0.1*is)/max, is in [-9, 9] \\ {0}.
        Callers in llama.cpp: Q6_K (n=16, nmax=32, rmse 1, qw NULL or imatrix), Q3_K impl (16, 4, 1, w) and
        its scale-of-scales (16, 32, 1, sw), Q4_0 impl (32, 8, 1, w), Q5_0 impl (32, 16, 1, w).

    make_q3_quants(n: int, nmax: int, x: float32[:], L: int8[:], do_rmse: bool) -> float32
        ggml's make_q3_quants (Q3_K reference path, n=16, nmax=4, do_rmse=True): rounding followed by up
        to 5 passes of coordinate descent on the weighted (w = x*x) error. Writes L[0:n], returns the scale.

    (rounding: quants.bits.nearest_int_c, ggml's nearest_int including its behaviour outside |fval| <= 2^22,
    which the searches reach when sums are tiny, overflowed or NaN.)

Fast variants used by the Q6_K / Q3_K kernels (bit-identical to the above for FINITE x; offsets instead of
views so the compiled loops vectorize; inline="always"):

    make_qx_quants_w(n, nmax, x, xo, L, lo, w, work) -> float32
        = make_qx_quants(n, nmax, x[xo:], L[lo:], 1, w) with w float32[n] the weights (pass x*x for the
        reference's NULL-weights rmse_type=1 call); work: float32[3*NT] scratch. The 19 trial scales are
        evaluated side by side as SIMD lanes, each lane summing in the reference's element order.
    make_q3_quants_rmse(n, nmax, x, xo, L, lo, work) -> float32
        = make_q3_quants(n, nmax, x[xo:], L[lo:], True); work: float32[>= 2*n] scratch.

All functions use error_model="numpy" (IEEE division: x/0 -> inf/NaN like C, not ZeroDivisionError).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .bits import GROUP_MAX_EPS, nearest_int_c


# --- helpers
@njit(cache=True, inline="always", error_model="numpy")
def _clamp(l, lo, hi):
    if l > hi:
        return hi
    if l < lo:
        return lo
    return l


@njit(cache=True, inline="always", error_model="numpy")
def _weight(has_w, qw, i, xi, rmse_type):
    if has_w:
        return qw[i]
    if rmse_type == 1:
        return np.float32(xi * xi)
    if rmse_type == 2:
        return np.float32(1.0)
    if rmse_type == 3:
        return np.float32(abs(xi))
    return np.float32(math.sqrt(np.float32(abs(xi))))


# --- make_qx_quants
@njit(cache=True, error_model="numpy")
def make_qx_quants(n, nmax, x, L, rmse_type, qw):
    has_w = qw.size > 0
    fmax = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            fmax = x[i]
    if amax < GROUP_MAX_EPS:            # all zero
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    fnmax = np.float32(nmax)
    iscale = np.float32(-fnmax / fmax)
    if rmse_type == 0:
        for i in range(n):
            l = nearest_int_c(iscale * x[i])
            L[i] = nmax + _clamp(l, -nmax, nmax - 1)
        return np.float32(np.float32(1.0) / iscale)
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        xi = x[i]
        l = _clamp(nearest_int_c(iscale * xi), -nmax, nmax - 1)
        L[i] = l + nmax
        w = _weight(has_w, qw, i, xi, rmse_type)
        fl = np.float32(l)
        sumlx = np.float32(sumlx + np.float32(np.float32(w * xi) * fl))
        suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
    scale = np.float32(sumlx / suml2) if suml2 != 0 else np.float32(0.0)
    if return_early:
        if suml2 > 0:
            return np.float32(np.float32(0.5) * np.float32(scale + np.float32(np.float32(1.0) / iscale)))
        return np.float32(np.float32(1.0) / iscale)
    best = np.float32(scale * sumlx)
    for itry in range(-9, 10):
        if itry == 0:
            continue
        iscale = np.float32(-np.float32(fnmax + np.float32(np.float32(0.1) * np.float32(itry))) / fmax)
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            xi = x[i]
            l = _clamp(nearest_int_c(iscale * xi), -nmax, nmax - 1)
            w = _weight(has_w, qw, i, xi, rmse_type)
            fl = np.float32(l)
            sumlx = np.float32(sumlx + np.float32(np.float32(w * xi) * fl))
            suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
        if suml2 > 0 and np.float32(sumlx * sumlx) > np.float32(best * suml2):
            for i in range(n):
                l = nearest_int_c(iscale * x[i])
                L[i] = nmax + _clamp(l, -nmax, nmax - 1)
            scale = np.float32(sumlx / suml2)
            best = np.float32(scale * sumlx)
    return scale


# --- make_q3_quants
@njit(cache=True, error_model="numpy")
def make_q3_quants(n, nmax, x, L, do_rmse):
    fmax = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            fmax = x[i]
    if amax < GROUP_MAX_EPS:            # all zero
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    iscale = np.float32(-np.float32(nmax) / fmax)
    if do_rmse:
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            xi = x[i]
            l = _clamp(nearest_int_c(iscale * xi), -nmax, nmax - 1)
            L[i] = l
            w = np.float32(xi * xi)
            fl = np.float32(l)
            sumlx = np.float32(sumlx + np.float32(np.float32(w * xi) * fl))
            suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
        for itry in range(5):
            n_changed = 0
            for i in range(n):
                xi = x[i]
                w = np.float32(xi * xi)
                fLi = np.float32(L[i])
                slx = np.float32(sumlx - np.float32(np.float32(w * xi) * fLi))
                if slx > 0:
                    sl2 = np.float32(suml2 - np.float32(np.float32(w * fLi) * fLi))
                    new_l = nearest_int_c(np.float32(np.float32(xi * sl2) / slx))
                    new_l = _clamp(new_l, -nmax, nmax - 1)
                    if new_l != L[i]:
                        fnl = np.float32(new_l)
                        slx = np.float32(slx + np.float32(np.float32(w * xi) * fnl))
                        sl2 = np.float32(sl2 + np.float32(np.float32(w * fnl) * fnl))
                        if sl2 > 0 and np.float32(np.float32(slx * slx) * suml2) > \
                                np.float32(np.float32(sumlx * sumlx) * sl2):
                            L[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[i] += nmax
        return np.float32(sumlx / suml2) if suml2 > 0 else np.float32(0.0)
    for i in range(n):
        l = _clamp(nearest_int_c(iscale * x[i]), -nmax, nmax - 1)
        L[i] = l + nmax
    return np.float32(np.float32(1.0) / iscale)


# --- fast make_qx_quants(rmse_type=1, weights given) for finite x
NT = 24     # trial lanes: lane 0 is the first rounding (iscale = -nmax/max), lanes 1..18 are is = -9..-1, 1..9


@njit(cache=True, inline="always", error_model="numpy")
def make_qx_quants_w(n, nmax, x, xo, L, lo, w, work):
    """make_qx_quants(n, nmax, x + xo, L + lo, 1, w) for FINITE x (the API layer rejects NaN/Inf), bit-identical
    with the generic version and several times faster.

    w: float32[n] weights (qw, or x*x for the reference's NULL-weights call); work: float32[3*NT] scratch.

    Every trial's sums sumlx = sum (w*x[i])*l[i] and suml2 = sum (w*l[i])*l[i] are the same sequential float32
    sums as in the reference, but the 19 trials (the first rounding and is = -9..9, is != 0) are independent of
    each other until the accept/reject step, so they run side by side as SIMD lanes: lane t accumulates element
    after element in the reference's order. The accept/reject pass over the finished sums is then done in the
    reference's trial order, and L is rebuilt from the winning trial's iscale as the reference does.
    """
    fmax = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = abs(x[np.uint64(xo + i)])
        if ax > amax:
            amax = ax
            fmax = x[np.uint64(xo + i)]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[np.uint64(lo + i)] = 0
        return np.float32(0.0)
    fnmax = np.float32(nmax)
    isc = work[0:NT]
    slx = work[NT:2 * NT]
    sl2 = work[2 * NT:3 * NT]
    isc[0] = np.float32(-fnmax / fmax)
    for t in range(1, NT):
        k = t - 10 if t <= 9 else t - 9
        if t > 18:
            k = 0
        isc[t] = np.float32(-np.float32(fnmax + np.float32(np.float32(0.1) * np.float32(k))) / fmax)
    for t in range(NT):
        slx[t] = np.float32(0.0)
        sl2[t] = np.float32(0.0)
    lmax = np.int32(nmax - 1)
    lmin = np.int32(-nmax)
    for i in range(n):
        xi = x[np.uint64(xo + i)]
        wi = w[i]
        wxi = np.float32(wi * xi)
        for t in range(NT):
            l = np.int32(np.rint(np.float32(isc[t] * xi)))
            l = max(min(l, lmax), lmin)
            fl = np.float32(l)
            slx[t] = np.float32(slx[t] + np.float32(wxi * fl))
            sl2[t] = np.float32(sl2[t] + np.float32(np.float32(wi * fl) * fl))
    sumlx = slx[0]
    suml2 = sl2[0]
    scale = np.float32(sumlx / suml2) if suml2 != 0 else np.float32(0.0)
    best = np.float32(scale * sumlx)
    win = 0
    for t in range(1, 19):
        sumlx = slx[t]
        suml2 = sl2[t]
        if suml2 > 0 and np.float32(sumlx * sumlx) > np.float32(best * suml2):
            scale = np.float32(sumlx / suml2)
            best = np.float32(scale * sumlx)
            win = t
    iscale = isc[win]
    for i in range(n):
        l = np.int32(np.rint(np.float32(iscale * x[np.uint64(xo + i)])))
        L[np.uint64(lo + i)] = max(min(l, lmax), lmin) + nmax
    return scale


# --- fast make_q3_quants(do_rmse=True) for finite x
@njit(cache=True, inline="always", error_model="numpy")
def make_q3_quants_rmse(n, nmax, x, xo, L, lo, work):
    """make_q3_quants(n, nmax, x + xo, L + lo, True) for FINITE x, bit-identical with the generic version.

    work: float32[2*n] scratch (w = x*x and w*x, which the reference recomputes in every pass as the same
    float32 products). The first rounding cannot leave nearest_int's exact range (|iscale*x| <= nmax), so it
    is a plain vectorizable rint; the descent keeps the reference's full nearest_int, since x*sl2/slx can be
    arbitrarily large when slx is tiny.
    """
    fmax = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = abs(x[np.uint64(xo + i)])
        if ax > amax:
            amax = ax
            fmax = x[np.uint64(xo + i)]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[np.uint64(lo + i)] = 0
        return np.float32(0.0)
    w = work[0:n]
    wx = work[n:2 * n]
    iscale = np.float32(-np.float32(nmax) / fmax)
    lmax = np.int32(nmax - 1)
    lmin = np.int32(-nmax)
    for i in range(n):
        xi = x[np.uint64(xo + i)]
        wi = np.float32(xi * xi)
        w[i] = wi
        wx[i] = np.float32(wi * xi)
        l = np.int32(np.rint(np.float32(iscale * xi)))
        L[np.uint64(lo + i)] = max(min(l, lmax), lmin)
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        fl = np.float32(L[np.uint64(lo + i)])
        sumlx = np.float32(sumlx + np.float32(wx[i] * fl))
        suml2 = np.float32(suml2 + np.float32(np.float32(w[i] * fl) * fl))
    for itry in range(5):
        n_changed = 0
        for i in range(n):
            li = np.int32(L[np.uint64(lo + i)])
            fLi = np.float32(li)
            slx = np.float32(sumlx - np.float32(wx[i] * fLi))
            if slx > 0:
                wi = w[i]
                sl2 = np.float32(suml2 - np.float32(np.float32(wi * fLi) * fLi))
                new_l = nearest_int_c(np.float32(np.float32(x[np.uint64(xo + i)] * sl2) / slx))
                new_l = max(min(new_l, nmax - 1), -nmax)
                if new_l != li:
                    fnl = np.float32(new_l)
                    slx = np.float32(slx + np.float32(wx[i] * fnl))
                    sl2 = np.float32(sl2 + np.float32(np.float32(wi * fnl) * fnl))
                    if sl2 > 0 and np.float32(np.float32(slx * slx) * suml2) > \
                            np.float32(np.float32(sumlx * sumlx) * sl2):
                        L[np.uint64(lo + i)] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[np.uint64(lo + i)] += nmax
    return np.float32(sumlx / suml2) if suml2 > 0 else np.float32(0.0)

"""The lane searches (search_lanes: sub-blocks side by side as SIMD lanes) against the per-sub-block scalar
searches they replace, bit for bit, on edge cases the golden vectors do not reach: flat, one-signed,
single-spike, tiny (subnormal), huge and non-finite sub-blocks, zero weights; with every caller's parameters
(Q2_K, Q4_K, Q5_K reference and importance paths, Q4_1/Q5_1 with an imatrix, fewer sub-blocks than lanes as at
the end of a legacy row) and Q3_K's make_q3_quants."""
import numpy as np
import pytest
from numba import njit

from gguftool.quants.search_affine import SCRATCH_PER_ELEM, qkx_search
from gguftool.quants.search_lanes import q3_lanes, q3_workspace, qkx_lanes, qkx_workspace
from gguftool.quants.search_symmetric import make_q3_quants, make_q3_quants_rmse

# (n, lanes, nl, nmax, rmin, rdelta, nstep, use_mad, le_check)
QKX = {
    "q2_k ref": (16, 16, 16, 3, -0.5, 0.1, 15, True, False),
    "q2_k imatrix": (16, 16, 16, 3, -0.9, 0.05, 36, False, True),
    "q4_k ref": (32, 8, 8, 15, -1.0, 0.1, 20, False, False),
    "q5_k ref": (32, 8, 8, 31, -0.5, 0.1, 15, False, False),
    "q4_k/q4_1 imatrix": (32, 8, 8, 15, -0.9, 0.05, 36, False, True),
    "q5_k/q5_1 imatrix": (32, 8, 8, 31, -0.9, 0.05, 36, False, True),
    "q4_1 imatrix, 3 blocks left": (32, 8, 3, 15, -0.9, 0.05, 36, False, True),
}


@njit(cache=False, error_model="numpy")
def _scalar(x, W, L, scales, mins, n, nl, nmax, rmin, rdelta, nstep, use_mad, le_check):
    Laux = np.zeros(n, np.uint8)
    fs = np.zeros(SCRATCH_PER_ELEM * n, np.float32)
    for j in range(nl):
        w = W[j].copy()
        sc, mn = qkx_search(n, nmax, x, n * j, w, 0, L, n * j, Laux, rmin, rdelta, nstep, use_mad, le_check, fs)
        scales[j] = sc
        mins[j] = mn


@njit(cache=False, error_model="numpy")
def _lanes(x, W, L, scales, mins, n, lanes, nmax, rmin, rdelta, nstep, use_mad, le_check, nw):
    ws = np.full(nw, np.float32(np.nan))          # garbage in the unused lanes must not matter
    for j in range(scales.size):
        for i in range(n):
            ws[n * lanes + lanes * i + j] = W[j, i]
    qkx_lanes(x, ws, L, scales, mins, n, lanes, nmax, rmin, rdelta, nstep, use_mad, le_check)


def _cases(n_sub, rng):
    g = rng.standard_normal((12, 256)).astype(np.float32)
    out = [g, g * np.float32(1e-30), g * np.float32(1e-40), g * np.float32(1e30), np.abs(g), -np.abs(g),
           np.zeros((1, 256), np.float32), np.full((1, 256), 0.5, np.float32), np.full((1, 256), -0.5, np.float32),
           (np.round(g * 4) / 4).astype(np.float32), rng.integers(-7, 8, (4, 256)).astype(np.float32)]
    z = np.zeros((4, 256), np.float32)
    z[:, 3::37] = 1.0
    z[:, 20::41] = -2.0
    out.append(z)
    b = g[:4].copy()
    b[:, :n_sub] = 0
    b[:, n_sub:2 * n_sub] = 7
    b[0, 5] = np.nan
    b[1, 40] = np.inf
    b[2, 70] = -np.inf
    b[3, :] = np.nan
    out.append(b)
    return np.concatenate(out).astype(np.float32)


def _weight_sets(x, n, le_check, rng):
    """The callers' weights: |x| (Q2_K ref), rms + |x| (Q4_K/Q5_K ref), qw * sqrt(sigma2 + x^2) (imatrix)."""
    X = x.reshape(-1, n)
    if not le_check:
        if n == 16:
            return [np.abs(X)]
        av = np.sqrt((X * X).sum(axis=1, dtype=np.float32) / np.float32(n)).astype(np.float32)
        return [(av[:, None] + np.abs(X)).astype(np.float32)]
    sigma2 = np.float32((x * x).sum(dtype=np.float32) / np.float32(x.size))
    base = np.sqrt(sigma2 + X * X).astype(np.float32)
    qws = [(rng.random(X.shape) + 0.01).astype(np.float32), np.zeros(X.shape, np.float32),
           np.where(rng.random(X.shape) < 0.5, 0, rng.random(X.shape) * 100).astype(np.float32)]
    return [(q * base).astype(np.float32) for q in qws]


@pytest.mark.slow
@pytest.mark.parametrize("caller", list(QKX))
def test_qkx_lanes_match_scalar_search_bit_for_bit(caller):
    n, lanes, nl, nmax, rmin, rdelta, nstep, use_mad, le = QKX[caller]
    rng = np.random.default_rng(5)
    X = _cases(n, rng)
    nw = qkx_workspace(n, lanes)
    checked = 0
    with np.errstate(all="ignore"):
        for x in X:
            x = x[:n * nl].copy()
            for W in _weight_sets(x, n, le, rng):
                La, Lb = np.zeros(n * nl, np.uint8), np.full(n * nl, 99, np.uint8)
                sa, ma = np.zeros(nl, np.float32), np.zeros(nl, np.float32)
                sb, mb = np.zeros(nl, np.float32), np.zeros(nl, np.float32)
                args = (nmax, np.float32(rmin), np.float32(rdelta), nstep, use_mad, le)
                _scalar(x, W, La, sa, ma, n, nl, *args)
                _lanes(x, W, Lb, sb, mb, n, lanes, *args, nw)
                assert sa.view(np.uint32).tolist() == sb.view(np.uint32).tolist(), x[:4]
                assert ma.view(np.uint32).tolist() == mb.view(np.uint32).tolist(), x[:4]
                assert La.tolist() == Lb.tolist()
                checked += 1
    assert checked == X.shape[0] * (1 if not le else 3)


@njit(cache=False, error_model="numpy")
def _q3_scalar(x, L, scales, nl):
    work = np.zeros(32, np.float32)
    for j in range(nl):
        scales[j] = make_q3_quants_rmse(16, 4, x, 16 * j, L, 16 * j, work)


@njit(cache=False, error_model="numpy")
def _q3_generic(x, L, scales, nl):
    for j in range(nl):
        scales[j] = make_q3_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], True)


@njit(cache=False, error_model="numpy")
def _q3_lanes(x, L, scales, nw):
    ws = np.full(nw, np.float32(np.nan))
    q3_lanes(x, ws, L, scales, 16)


@pytest.mark.slow
@pytest.mark.parametrize("nl", [16, 5])
def test_q3_lanes_match_make_q3_quants_bit_for_bit(nl):
    rng = np.random.default_rng(9)
    X = _cases(16, rng)
    X = X[np.isfinite(X).all(axis=1)]             # Q3_K's searches take finite input (the API screens)
    X = np.concatenate([X, rng.standard_normal((40, 256)).astype(np.float32) * np.float32(0.02)])
    nw = q3_workspace(16)
    with np.errstate(all="ignore"):
        for x in X:
            x = x[:16 * nl].copy()
            La, Lb, Lc = np.zeros(16 * nl, np.int8), np.full(16 * nl, 99, np.int8), np.zeros(16 * nl, np.int8)
            sa, sb, sc = (np.zeros(nl, np.float32) for _ in range(3))
            _q3_scalar(x, La, sa, nl)
            _q3_generic(x, Lc, sc, nl)
            _q3_lanes(x, Lb, sb, nw)
            assert sa.view(np.uint32).tolist() == sb.view(np.uint32).tolist() == sc.view(np.uint32).tolist()
            assert La.tolist() == Lb.tolist() == Lc.tolist()

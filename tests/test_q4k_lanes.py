"""Q4_K/Q5_K's lane search (the 8 sub-blocks of a super-block side by side) against the per-sub-block scalar
search it replaced (search_affine.qkx_search), bit for bit, on edge cases the golden vectors do not reach: flat,
one-signed, single-spike, tiny (subnormal), huge and non-finite sub-blocks, zero weights; with Q4_K's and Q5_K's
reference parameters and the importance path's."""
import numpy as np
import pytest
from numba import njit

from gguftool.quants import q4_k
from gguftool.quants.search_affine import SCRATCH_PER_ELEM, qkx_search

# (nmax, rmin, rdelta, nstep, le_check): quantize_row_q4_K_ref, quantize_row_q5_K_ref, the _impl paths
PARAMS = [(15, -1.0, 0.1, 20, False), (31, -0.5, 0.1, 15, False), (15, -0.9, 0.05, 36, True),
          (31, -0.9, 0.05, 36, True)]


@njit(cache=False, error_model="numpy")
def _weights(x, qw, use_imatrix, W):
    """W[j, l]: the weights of element l of sub-block j, as affine_k_scales_ref / _impl compute them."""
    sigma2 = np.float32(0.0)
    if use_imatrix:
        s = np.float32(0.0)
        for l in range(256):
            s += x[l] * x[l]
        sigma2 = np.float32(2.0) * s / np.float32(256.0)
    for j in range(8):
        sum_x2 = np.float32(0.0)
        for l in range(32):
            sum_x2 += x[32 * j + l] * x[32 * j + l]
        av_x = np.float32(np.sqrt(sum_x2 / np.float32(32.0)))
        for l in range(32):
            if use_imatrix:
                W[j, l] = qw[32 * j + l] * np.float32(np.sqrt(sigma2 + x[32 * j + l] * x[32 * j + l]))
            else:
                W[j, l] = av_x + abs(x[32 * j + l])


@njit(cache=False, error_model="numpy")
def _scalar(x, W, L, scales, mins, nmax, rmin, rdelta, nstep, le_check):
    Laux = np.zeros(32, np.uint8)
    fs = np.zeros(SCRATCH_PER_ELEM * 32, np.float32)
    for j in range(8):
        w = W[j].copy()
        sc, mn = qkx_search(32, nmax, x, 32 * j, w, 0, L, 32 * j, Laux, rmin, rdelta, nstep, False, le_check, fs)
        scales[j] = sc
        mins[j] = mn


@njit(cache=False, error_model="numpy")
def _lanes(x, W, L, scales, mins, nmax, rmin, rdelta, nstep, le_check):
    ws = np.zeros(q4_k._NW, np.float32)
    for j in range(8):
        for l in range(32):
            ws[256 + 8 * l + j] = W[j, l]
    q4_k._qkx_lanes(x, ws, L, scales, mins, nmax, rmin, rdelta, nstep, le_check)


def _cases():
    rng = np.random.default_rng(11)
    g = rng.standard_normal((12, 256)).astype(np.float32)
    out = [g, g * np.float32(1e-30), g * np.float32(1e-40), g * np.float32(1e30), np.abs(g), -np.abs(g),
           np.zeros((1, 256), np.float32), np.full((1, 256), 0.5, np.float32), np.full((1, 256), -0.5, np.float32),
           (np.round(g * 4) / 4).astype(np.float32), rng.integers(-7, 8, (4, 256)).astype(np.float32)]
    z = np.zeros((4, 256), np.float32)
    z[:, 3::37] = 1.0
    z[:, 20::41] = -2.0
    out.append(z)
    b = g[:4].copy()
    b[:, :32] = 0
    b[:, 32:64] = 7
    b[0, 5] = np.nan
    b[1, 40] = np.inf
    b[2, 70] = -np.inf
    b[3, :] = np.nan
    out.append(b)
    return np.concatenate(out).astype(np.float32)


@pytest.mark.slow
def test_lanes_match_scalar_search_bit_for_bit():
    rng = np.random.default_rng(5)
    X = _cases()
    ims = [(rng.random(256) + 0.01).astype(np.float32), np.zeros(256, np.float32),
           np.where(rng.random(256) < 0.5, 0, rng.random(256) * 100).astype(np.float32)]
    checked = 0
    with np.errstate(all="ignore"):
        for nmax, rmin, rdelta, nstep, le in PARAMS:
            for qw in ([None] if not le else ims):
                for x in X:
                    W = np.zeros((8, 32), np.float32)
                    _weights(x, np.zeros(256, np.float32) if qw is None else qw, qw is not None, W)
                    La, Lb = np.zeros(256, np.uint8), np.zeros(256, np.uint8)
                    sa, ma = np.zeros(8, np.float32), np.zeros(8, np.float32)
                    sb, mb = np.zeros(8, np.float32), np.zeros(8, np.float32)
                    args = (nmax, np.float32(rmin), np.float32(rdelta), nstep, le)
                    _scalar(x, W, La, sa, ma, *args)
                    _lanes(x, W, Lb, sb, mb, *args)
                    assert sa.view(np.uint32).tolist() == sb.view(np.uint32).tolist(), (nmax, nstep, x[:4])
                    assert ma.view(np.uint32).tolist() == mb.view(np.uint32).tolist(), (nmax, nstep, x[:4])
                    assert La.tolist() == Lb.tolist()
                    checked += 1
    assert checked == 8 * X.shape[0]

"""Q2_K's lane search (16 sub-blocks side by side) against the per-sub-block scalar search it replaced
(search_affine.qkx_search, the generic make_qkx2/3_quants port), on edge cases the golden vectors do not
reach: flat, one-signed, single-spike, tiny (subnormal), huge and non-finite sub-blocks, zero weights."""
import numpy as np
import pytest
from numba import njit

from gguftool.quants import q2_k
from gguftool.quants.search_affine import SCRATCH_PER_ELEM, qkx_search


@njit(cache=False, error_model="numpy")
def _scalar_searches(x, qw, use_imatrix, L, scales, mins):
    Laux = np.zeros(16, np.uint8)
    w = np.zeros(16, np.float32)
    fs = np.zeros(SCRATCH_PER_ELEM * 16, np.float32)
    sigma2 = np.float32(0.0)
    if use_imatrix:
        s = np.float32(0.0)
        for j in range(256):
            s += x[j] * x[j]
        sigma2 = s / np.float32(256.0)
    for j in range(16):
        for l in range(16):
            if use_imatrix:
                w[l] = qw[16 * j + l] * np.float32(np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]))
            else:
                w[l] = abs(x[16 * j + l])
        if use_imatrix:
            sc, mn = qkx_search(16, 3, x, 16 * j, w, 0, L, 16 * j, Laux, np.float32(-0.9), np.float32(0.05),
                                36, False, True, fs)
        else:
            sc, mn = qkx_search(16, 3, x, 16 * j, w, 0, L, 16 * j, Laux, np.float32(-0.5), np.float32(0.1),
                                15, True, False, fs)
        scales[j] = sc
        mins[j] = mn


@njit(cache=False, error_model="numpy")
def _lane_searches(x, qw, use_imatrix, L, scales, mins):
    ws = np.zeros(q2_k._NW, np.float32)
    sigma2 = np.float32(0.0)
    if use_imatrix:
        s = np.float32(0.0)
        for j in range(256):
            s += x[j] * x[j]
        sigma2 = s / np.float32(256.0)
    for j in range(16):
        for l in range(16):
            if use_imatrix:
                ws[256 + 16 * l + j] = qw[16 * j + l] * np.float32(np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]))
            else:
                ws[256 + 16 * l + j] = abs(x[16 * j + l])
    if use_imatrix:
        q2_k._qkx_lanes(x, ws, L, scales, mins, np.float32(-0.9), np.float32(0.05), 36, False, True)
    else:
        q2_k._qkx_lanes(x, ws, L, scales, mins, np.float32(-0.5), np.float32(0.1), 15, True, False)


def _cases():
    rng = np.random.default_rng(7)
    g = rng.standard_normal((24, 256)).astype(np.float32)
    out = [g, g * np.float32(1e-30), g * np.float32(1e-40), g * np.float32(1e30), np.abs(g), -np.abs(g),
           np.zeros((1, 256), np.float32), np.full((1, 256), 0.5, np.float32), np.full((1, 256), -0.5, np.float32),
           (np.round(g * 4) / 4).astype(np.float32), rng.integers(-3, 4, (8, 256)).astype(np.float32)]
    z = np.zeros((4, 256), np.float32)
    z[:, 3::37] = 1.0
    z[:, 20::41] = -2.0
    out.append(z)
    b = g[:4].copy()
    b[:, :16] = 0
    b[:, 16:32] = 7
    b[0, 5] = np.nan
    b[1, 40] = np.inf
    b[2, 70] = -np.inf
    b[3, :] = np.nan
    out.append(b)
    return np.concatenate(out).astype(np.float32)


@pytest.mark.slow
def test_lanes_match_scalar_search_bit_for_bit():
    rng = np.random.default_rng(3)
    X = _cases()
    ims = [np.ones(256, np.float32), (rng.random(256) + 0.01).astype(np.float32), np.zeros(256, np.float32),
           np.where(rng.random(256) < 0.5, 0, rng.random(256) * 100).astype(np.float32)]
    checked = 0
    with np.errstate(all="ignore"):
        for use_im, qw in [(False, ims[0])] + [(True, w) for w in ims]:
            for x in X:
                La = np.zeros(256, np.uint8)
                Lb = np.zeros(256, np.uint8)
                sa, ma = np.zeros(16, np.float32), np.zeros(16, np.float32)
                sb, mb = np.zeros(16, np.float32), np.zeros(16, np.float32)
                _scalar_searches(x, qw, use_im, La, sa, ma)
                _lane_searches(x, qw, use_im, Lb, sb, mb)
                assert sa.view(np.uint32).tolist() == sb.view(np.uint32).tolist()
                assert ma.view(np.uint32).tolist() == mb.view(np.uint32).tolist()
                assert La.tolist() == Lb.tolist()
                checked += 1
    assert checked == 5 * X.shape[0]

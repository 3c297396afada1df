"""Q6_K and Q3_K kernels (and the signed symmetric searches they use) against llama.cpp.

(The golden vectors, dequantization against gguf-py on them and the block functions are compared in
test_quants_golden.py.)
- round-trip error bounds on random data;
- live comparison with llama-cpp-python's libggml-base.so on fresh random and adversarial rows;
- make_qx_quants / make_q3_quants compiled vs interpreted (catches numba int/float promotion slips in the
  modes llama.cpp never exercises through a public entry point).
"""
from __future__ import annotations


import numpy as np
import pytest

from gguftool.quants import q3_k, q6_k
from gguftool.quants.bits import nearest_int_c
from gguftool.quants.search_symmetric import NT, make_q3_quants, make_q3_quants_rmse, make_qx_quants, make_qx_quants_w

MODULES = {"Q6_K": q6_k, "Q3_K": q3_k}
NO_IMATRIX = np.zeros(0, np.float32)


def _quantize(mod, x, imatrix=None):
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // 256 * mod.BLOCK_BYTES), np.uint8)
    mod.quantize_rows(x, NO_IMATRIX if imatrix is None else np.ascontiguousarray(imatrix, np.float32), out)
    return out


def _dequantize(mod, data, n_per_row):
    out = np.zeros((data.shape[0], n_per_row), np.float32)
    mod.dequantize_rows(np.ascontiguousarray(data), out)
    return out


def _assert_same_blocks(ours, ref, block_bytes, what):
    assert ours.shape == ref.shape, what
    diff = (ours.reshape(ours.shape[0], -1, block_bytes) != ref.reshape(ref.shape[0], -1, block_bytes)).any(-1)
    if diff.any():
        r, b = np.argwhere(diff)[0]
        sl = slice(b * block_bytes, (b + 1) * block_bytes)
        raise AssertionError(f"{what}: {int(diff.sum())} differing blocks; first at row {r} block {b}\n"
                             f"  ours {ours[r, sl].tolist()}\n  ref  {ref[r, sl].tolist()}")


@pytest.mark.parametrize("qtype,bound,bound_i", [("Q6_K", 0.021, 0.021), ("Q3_K", 0.17, 0.165)])
def test_round_trip_error(qtype, bound, bound_i):
    mod = MODULES[qtype]
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    imatrix = rng.uniform(0.5, 2.0, 1024).astype(np.float32)
    for im, b in ((None, bound), (imatrix, bound_i)):
        y = _dequantize(mod, _quantize(mod, x, im), 1024)
        rel = np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2))
        assert rel < b, (qtype, im is not None, rel)
        assert rel > b / 10, (qtype, rel)        # sanity: a lossy format really quantized
    # zero rows come back as exact zeros; scaling the input by a power of two scales the output exactly
    z = np.zeros((2, 256), np.float32)
    assert np.array_equal(_dequantize(mod, _quantize(mod, z), 256), z)
    y1 = _dequantize(mod, _quantize(mod, x[:4]), 1024)
    y2 = _dequantize(mod, _quantize(mod, x[:4] * np.float32(4.0)), 1024)
    assert np.array_equal(y1 * np.float32(4.0), y2)


# --- live llama.cpp
def _extreme_rows(rng, n):
    rows = []
    g = lambda: rng.standard_normal(n)  # noqa: E731
    for s in (1e-30, 1e-20, 1e-12, 1e-8, 1e-5, 1e3, 1e5, 1e8, 1e15, 1e19, 1e20, 1e30, 1e38):
        rows.append(np.clip(g() * s, -3.4e38, 3.4e38))
    for _ in range(4):
        v = np.zeros(n)
        v[rng.integers(n)] = rng.standard_normal() * 10 ** rng.uniform(-10, 10)
        rows.append(v)                                                   # single spike in a zero row
        v = g()
        v[rng.integers(n)] = 1e4 * rng.standard_normal()
        rows.append(v)                                                   # one outlier
        v = g()
        v[rng.integers(n // 16) * 16:][:16] *= 1e-6
        rows.append(v)                                                   # one nearly-zero sub-block
        rows.append(np.round(g() * 4))                                   # on the Q3_K grid
        rows.append(np.round(g() * 32))                                  # on the Q6_K grid
        rows.append(rng.integers(-32, 32, n) * 0.01)
        rows.append(g() ** 3)
        rows.append(g() * 10.0 ** rng.uniform(-6, 6, n))                 # wildly varying magnitudes
        v = g() * 10.0 ** rng.uniform(-40, 38.5, n) * 10 ** rng.uniform(-5, 5)
        v[rng.uniform(size=n) < 0.3] = 0
        rows.append(np.clip(v, -3.4e38, 3.4e38))
    rows.append(np.array([(-1) ** i * 2.0 ** -(i % 40) for i in range(n)]))
    return np.ascontiguousarray(np.stack(rows).astype(np.float32))


@pytest.mark.slow
def test_live_llama_cpp():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python provides the live ggml_quantize_chunk oracle")
    from llama_oracle import adversarial_rows, oracle_or_skip

    ggml = oracle_or_skip()
    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 31))
    rng = np.random.default_rng(seed)
    n = 512
    x = np.concatenate([
        rng.standard_normal((48, n)).astype(np.float32),
        (rng.standard_t(2.0, (16, n)) * 10 ** rng.uniform(-3, 3, (16, 1))).astype(np.float32),
        adversarial_rows(n, rng),
        _extreme_rows(rng, n),
    ])
    x = np.ascontiguousarray(x)
    imatrices = [
        None,
        rng.uniform(0, 2, n).astype(np.float32),
        (rng.standard_normal(n) ** 2).astype(np.float32),
        np.zeros(n, np.float32),                                             # all-zero importance
        np.where(rng.uniform(size=n) < 0.5, 0, 1e6).astype(np.float32),
        (10.0 ** rng.uniform(-20, 20, n)).astype(np.float32),
    ]
    for qtype, mod in MODULES.items():
        for k, im in enumerate(imatrices):
            ref = ggml.quantize(qtype, x, im)
            _assert_same_blocks(_quantize(mod, x, im), ref, mod.BLOCK_BYTES,
                                f"{qtype} imatrix #{k} (seed {seed})")


# --- the searches themselves
@pytest.mark.slow
def test_searches_compiled_equal_interpreted():
    rng = np.random.default_rng(99)
    for trial in range(12):      # the interpreted side is slow: keep it small
        n = (16, 32)[trial % 2]
        x = (rng.standard_normal(n) * 10 ** rng.uniform(-3, 3)).astype(np.float32)
        if trial % 5 == 0:
            x[: n // 2] = 0
        qw = rng.uniform(0, 3, n).astype(np.float32)
        for nmax in (4, 8, 16, 32):
            for rmse in (0, 1, 2, 3, 4, -1, -2, -3):
                for w in (NO_IMATRIX, qw):
                    L1 = np.zeros(n, np.int8)
                    L2 = np.zeros(n, np.int8)
                    s1 = make_qx_quants(n, nmax, x, L1, rmse, w)
                    s2 = make_qx_quants.py_func(n, nmax, x, L2, rmse, w)
                    assert np.float32(s1).view(np.uint32) == np.float32(s2).view(np.uint32), (trial, nmax, rmse)
                    assert np.array_equal(L1, L2)
                    assert L1.min() >= 0 and L1.max() < 2 * nmax
        for do_rmse in (True, False):
            L1 = np.zeros(n, np.int8)
            L2 = np.zeros(n, np.int8)
            s1 = make_q3_quants(n, 4, x, L1, do_rmse)
            s2 = make_q3_quants.py_func(n, 4, x, L2, do_rmse)
            assert np.float32(s1).view(np.uint32) == np.float32(s2).view(np.uint32)
            assert np.array_equal(L1, L2) and L1.min() >= 0 and L1.max() < 8


@pytest.mark.slow
def test_fast_searches_equal_generic():
    """make_qx_quants_w / make_q3_quants_rmse (the kernels' fast paths) against the literal translations."""
    rng = np.random.default_rng(2024)
    work = np.empty(3 * NT, np.float32)
    for trial in range(300):
        n = (16, 32)[trial % 2]
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n if trial % 3 == 0 else 1) * \
            10.0 ** rng.uniform(-25, 25)
        if trial % 7 == 0:
            x[rng.uniform(size=n) < 0.5] = 0
        if trial % 11 == 0:
            x = np.round(x / np.abs(x).max() * 6)
        x = x.astype(np.float32)
        off = 16 * (trial % 3)
        xbig = np.zeros(off + n + 16, np.float32)
        xbig[off:off + n] = x
        qw = (rng.uniform(0, 3, n) * 10.0 ** rng.uniform(-20, 20)).astype(np.float32)
        for nmax in (4, 8, 16, 32):
            with np.errstate(over="ignore"):       # x*x may overflow to inf, as in the reference
                xx = (x * x).astype(np.float32)
            for w in (qw, xx):
                L1 = np.zeros(n, np.int8)
                L2 = np.full(off + n + 16, 99, np.int8)
                s1 = make_qx_quants(n, nmax, x, L1, 1, w)
                s2 = make_qx_quants_w(n, nmax, xbig, off, L2, off, w, work)
                assert np.float32(s1).view(np.uint32) == np.float32(s2).view(np.uint32), (trial, nmax)
                assert np.array_equal(L1, L2[off:off + n]) and (L2[:off] == 99).all() and (L2[off + n:] == 99).all()
        L1 = np.zeros(n, np.int8)
        L2 = np.zeros(off + n, np.int8)
        s1 = make_q3_quants(n, 4, x, L1, True)
        s2 = make_q3_quants_rmse(n, 4, xbig, off, L2, off, work)
        assert np.float32(s1).view(np.uint32) == np.float32(s2).view(np.uint32), trial
        assert np.array_equal(L1, L2[off:])


def test_make_qx_quants_all_zero_and_plain_rounding():
    L = np.full(16, 7, np.int8)
    assert make_qx_quants(16, 32, np.zeros(16, np.float32), L, 1, NO_IMATRIX) == 0
    assert not L.any()
    x = np.arange(-8, 8, dtype=np.float32)               # max |x| is -8 -> iscale = -nmax / -8
    s = make_qx_quants(16, 8, x, L, 0, NO_IMATRIX)
    assert s == np.float32(1.0)                          # 1 / (-8 / -8)
    assert np.array_equal(L.astype(int) - 8, np.clip(np.arange(-8, 8), -8, 7))


def test_nearest_int_c_matches_magic_number_trick():
    vals = np.array([0.5, 1.5, 2.5, -2.5, 4194303.0, 5e6, -5e6, 1e30, -1e30, np.inf, -np.inf, np.nan],
                    np.float32)
    for v in vals:
        s = np.array([v + np.float32(12582912.0)], np.float32)
        expect = (int(s.view(np.int32)[0]) & 0x7FFFFF) - 0x400000
        if np.isnan(v):
            expect = 0                                   # x86 default NaN has mantissa 0x400000
        assert nearest_int_c(v) == expect, v

"""Q4_K, Q5_K, Q2_K kernels (gguftool.quants.q4_k / q5_k / q2_k) and the affine searches they use.

(The golden vectors, and dequantization against gguf-py on them, are compared in test_quants_golden.py.)
- round-trip error bounds on Gaussian data, with and without an imatrix;
- live comparison with llama.cpp's ggml_quantize_chunk (llama-cpp-python's libggml-base.so) on fresh random and
  adversarial rows and several imatrices (skipped with the reason when llama-cpp-python is absent).
The module drivers are called directly, so this does not depend on the public quantize() API.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from llama_oracle import adversarial_rows, first_diff_block, oracle_or_skip

TYPES = ["Q4_K", "Q5_K", "Q2_K"]
NO_IMATRIX = np.zeros(0, dtype=np.float32)


def _mod(t):
    return importlib.import_module(f"gguftool.quants.{t.lower()}")


def _quantize(t, x, imatrix=None):
    mod = _mod(t)
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // 256 * mod.BLOCK_BYTES), dtype=np.uint8)
    mod.quantize_rows(x, NO_IMATRIX if imatrix is None else np.ascontiguousarray(imatrix, np.float32), out)
    return out


def _dequantize(t, data, n):
    out = np.zeros((data.shape[0], n), dtype=np.float32)
    _mod(t).dequantize_rows(np.ascontiguousarray(data), out)
    return out


def _assert_same(t, got, want, what):
    fd = first_diff_block(got, want, _mod(t).BLOCK_BYTES)
    if fd is not None:
        r, b = fd
        bb = _mod(t).BLOCK_BYTES
        pytest.fail(f"{what}: {t} first differing block: row {r}, block {b}\n"
                    f"got  {got[r, b * bb:(b + 1) * bb].tolist()}\nwant {want[r, b * bb:(b + 1) * bb].tolist()}")


# rmse / std bounds for Gaussian rows (measured: Q4_K ~0.071-0.073, Q5_K ~0.036, Q2_K ~0.28-0.30)
_RMSE = {"Q4_K": 0.085, "Q5_K": 0.045, "Q2_K": 0.34}


@pytest.mark.parametrize("qtype", TYPES)
def test_round_trip_error(qtype):
    rng = np.random.default_rng(1234)
    x = (rng.standard_normal((32, 1024)) * 3.0).astype(np.float32)
    im = rng.exponential(1.0, 1024).astype(np.float32)
    for imx in (None, im):
        y = _dequantize(qtype, _quantize(qtype, x, imx), 1024)
        rel = float(np.sqrt(np.mean((x - y) ** 2)) / x.std())
        assert rel < _RMSE[qtype], (qtype, imx is not None, rel)
    # zeros stay exactly zero
    z = np.zeros((2, 256), np.float32)
    assert not _dequantize(qtype, _quantize(qtype, z), 256).any()


def test_thread_count_does_not_change_bytes():
    import numba

    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 512)).astype(np.float32)
    im = rng.exponential(1.0, 512).astype(np.float32)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = [_quantize(t, x, im) for t in TYPES]
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = [_quantize(t, x, im) for t in TYPES]
    finally:
        numba.set_num_threads(old)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


def test_nearest_int_c_matches_the_bit_trick():
    from gguftool.quants.bits import nearest_int_c

    rng = np.random.default_rng(3)
    vals = np.concatenate([
        rng.uniform(-10, 10, 200), np.arange(-6, 7) + 0.5, [4194303.0, -4194303.0, 4194304.0, -4194305.0],
        rng.uniform(-3e7, 3e7, 50), [1e30, -1e30, 3.4e38, np.inf, -np.inf, np.nan, 0.0, -0.0],
    ]).astype(np.float32)
    with np.errstate(all="ignore"):
        bits = (vals + np.float32(12582912.0)).astype(np.float32).view(np.int32)
    want = (bits & 0x007FFFFF) - 0x00400000
    got = np.array([nearest_int_c(v) for v in vals])
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_qkx3_null_weights_means_x_squared():
    from gguftool.quants.search_affine import make_qkx3_quants

    rng = np.random.default_rng(11)
    for _ in range(20):
        x = (rng.standard_normal(32) + rng.normal()).astype(np.float32)
        L1, L2, La = np.zeros(32, np.uint8), np.zeros(32, np.uint8), np.zeros(32, np.uint8)
        a = make_qkx3_quants(32, 15, x, NO_IMATRIX, L1, La, -0.9, 0.05, 36, False)
        b = make_qkx3_quants(32, 15, x, (x * x).astype(np.float32), L2, La, -0.9, 0.05, 36, False)
        assert a == b
        np.testing.assert_array_equal(L1, L2)
        assert L1.max() <= 15


def _imatrices(n, rng):
    sub = np.ones(n, np.float32)
    sub[32:64] = 0
    return {
        "exponential": rng.exponential(1.0, n).astype(np.float32),
        "sparse": np.where(rng.random(n) < 0.3, 0, rng.exponential(1.0, n)).astype(np.float32),
        "zero-subblock": sub,
        "all-zero": np.zeros(n, np.float32),
        "tiny": np.full(n, 1e-30, np.float32),
        "huge": rng.exponential(1e30, n).astype(np.float32),
    }


@pytest.mark.slow
@pytest.mark.parametrize("qtype", TYPES)
def test_live_llama_cpp(qtype):
    ggml = oracle_or_skip()
    rng = np.random.default_rng()          # fresh data every run; the seed is printed on failure
    seed = int(rng.integers(2**31))
    rng = np.random.default_rng(seed)
    n = 512
    x = np.ascontiguousarray(np.concatenate([
        adversarial_rows(n, rng),
        rng.standard_normal((24, n)).astype(np.float32),
        (rng.standard_normal((16, n)) * rng.exponential(1.0, (16, 1)) + rng.normal(0, 2, (16, 1))).astype(np.float32),
        rng.standard_t(2.0, (8, n)).astype(np.float32),
    ]))
    ims = {"none": None, **_imatrices(n, rng)}
    for name, im in ims.items():
        want = ggml.quantize(qtype, x, im)
        got = _quantize(qtype, x, im)
        _assert_same(qtype, got, want, f"live llama.cpp, imatrix={name}, seed={seed}")


def _gemma_rows(gemma3_gguf, request):
    """8 random rows of up to 4 small 2-D tensors of gemma-3-270m, dequantized with gguf-py. gguf-py's reader
    needs ~40 s for this file (262k-token vocabulary), so the rows are cached under pytest's cache dir."""
    gguf = pytest.importorskip("gguf", reason="gguf-py reads and dequantizes the real model")
    import os

    cache = Path(request.config.cache.mkdir("gguftool-models")) / "gemma3-rows-affine-k.npz"
    tag = str(gemma3_gguf.stat().st_size)
    if cache.exists():
        d = np.load(cache)
        if str(d["tag"]) == tag:
            return [(str(k), d[k]) for k in d.files if k != "tag"]
    reader = gguf.GGUFReader(str(gemma3_gguf))
    rng = np.random.default_rng(5)
    picked = [t for t in reader.tensors
              if len(t.shape) == 2 and int(t.shape[0]) % 256 == 0 and int(t.n_elements) <= 4_000_000][:4]
    assert picked, "no 2-D tensor with rows of a multiple of 256 in the Gemma-3 file"
    out = {}
    for t in picked:
        n = int(t.shape[0])
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, n)
        out[f"{t.name} ({t.tensor_type.name})"] = np.ascontiguousarray(
            w[rng.choice(w.shape[0], 8, replace=False)], dtype=np.float32)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, tag=np.array(tag), **out)
    os.replace(tmp, cache)
    return list(out.items())


@pytest.mark.slow
def test_live_llama_cpp_real_model_rows(gemma3_gguf, request):
    """Rows of a real model (gemma-3-270m, dequantized with gguf-py) against the live llama.cpp."""
    ggml = oracle_or_skip()
    rng = np.random.default_rng(6)
    rows_by_tensor = _gemma_rows(gemma3_gguf, request)
    assert rows_by_tensor
    for name, rows in rows_by_tensor:
        im = rng.exponential(1.0, rows.shape[1]).astype(np.float32)
        for qtype in TYPES:
            for imx in (None, im):
                _assert_same(qtype, _quantize(qtype, rows, imx), ggml.quantize(qtype, rows, imx),
                             f"gemma-3 {name} imatrix={imx is not None}")

"""IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M against llama.cpp, beyond the golden vectors
(tests/test_quants_golden_iq.py compares fixtures/golden/iq/<TYPE>.npz byte for byte):

- the importance-matrix rule: llama.cpp's ggml_quantize_chunk asserts an imatrix for IQ2_XXS, IQ2_XS and
  IQ1_S; gguftool raises QuantError instead. IQ2_S and IQ1_M take either path;
- the block functions of registry.py's interface reproduce golden blocks one at a time;
- live comparison with llama-cpp-python's libggml-base.so on fresh random, adversarial and real (SmolLM2)
  rows with and without importance matrices, including rows llama.cpp aborts on (a GGML_ASSERT in a lattice
  search, with overflowing values): gguftool raises QuantError on exactly those rows.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from gguftool.errors import QuantError
from gguftool.gguf.constants import GGMLType
from gguftool.quants import dequantize, quantize, registry

TYPES = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M", "IQ2_S")
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ1_S"}
GOLDEN_IQ = Path(__file__).resolve().parent.parent / "fixtures" / "golden" / "iq"
NO_IMATRIX = np.zeros(0, np.float32)


# --- the importance-matrix rule
@pytest.mark.parametrize("name", TYPES)
def test_imatrix_rule(name):
    mod = registry.kernels(GGMLType[name])
    assert mod.USES_IMATRIX is True
    assert mod.REQUIRES_IMATRIX is (name in NEEDS_IMATRIX)
    x = np.random.default_rng(3).standard_normal((2, 256)).astype(np.float32)
    if name in NEEDS_IMATRIX:
        with pytest.raises(QuantError, match=f"^{name} needs an importance matrix"):
            quantize(x, name)
        with pytest.raises(QuantError, match=f"^{name} needs an importance matrix"):
            mod.quantize_rows(x, NO_IMATRIX, np.zeros((2, mod.BLOCK_BYTES), np.uint8))
    else:
        q = quantize(x, name)
        assert q.shape == (2, mod.BLOCK_BYTES) and q.any()


@pytest.mark.parametrize("name", TYPES)
def test_block_functions(name):
    """make_scratch / prepare_row / quantize_block / dequantize_block give the golden blocks one at a time."""
    t = GGMLType[name]
    mod = registry.kernels(t)
    with np.load(GOLDEN_IQ / f"{name}.npz") as z:
        x = z["x__gauss"]
        im = z[f"im__gamma__{x.shape[1]}"]
        refs = [(im, z["qi__gauss__gamma"])]
        if "q__gauss" in z.files:
            refs.append((NO_IMATRIX, z["q__gauss"]))
    s = mod.make_scratch()
    y = np.empty(mod.BLOCK_BYTES, np.uint8)
    back = np.empty(256, np.float32)
    for r, b in ((0, 0), (3, 1), (7, 1)):
        xr = np.ascontiguousarray(x[r])
        for qw, ref in refs:
            mod.prepare_row(xr, qw, s)
            mod.quantize_block(xr[256 * b:256 * (b + 1)], np.ascontiguousarray(qw[256 * b:256 * (b + 1)]), y, s)
            want = ref[r, mod.BLOCK_BYTES * b:mod.BLOCK_BYTES * (b + 1)]
            assert np.array_equal(y, want), (name, r, b, qw.size > 0)
            mod.dequantize_block(y, back)
            full = dequantize(ref[r], t, x.shape[1])[0, 256 * b:256 * (b + 1)]
            assert np.array_equal(back.view(np.uint32), full.view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_abort_rows_raise(name):
    """The golden files mark the rows llama.cpp aborted on; gguftool refuses exactly those (one at a time)."""
    with np.load(GOLDEN_IQ / f"{name}.npz") as z:
        marked = [k for k in z.files if k.startswith("bad__")]
        assert marked, "the adversarial case has rows llama.cpp aborts on for every one of these types"
        for k in marked:
            parts = k.split("__")
            x = z["x__" + parts[1]]
            im = z[f"im__{parts[2]}__{x.shape[1]}"] if len(parts) > 2 else None
            for r in np.flatnonzero(z[k])[:2]:
                with pytest.raises(QuantError, match=f"^{name}: row 0: "):
                    quantize(x[r:r + 1], name, im)


# --- live llama.cpp
def _ours_or_bad_rows(name, x, im):
    """gguftool's bytes for x, or (None, rows it refuses) when it raises QuantError on some rows."""
    try:
        return quantize(x, name, im), []
    except QuantError:
        bad = []
        for r in range(len(x)):
            try:
                quantize(x[r:r + 1], name, im)
            except QuantError:
                bad.append(r)
        assert bad, "QuantError on the whole but on no single row"
        return None, bad


def _compare(ggml, name, x, im, what):
    """ggml_quantize_chunk against gguftool on x. Rows gguftool refuses (QuantError) must be rows llama.cpp
    aborts on (each checked in a forked child); the others, quantized together, must be byte-identical (one
    more child: an abort there fails the test). Returns the number of rows compared byte for byte."""
    from make_golden_iq import quantize_in_child

    t = GGMLType[name]
    bb = t.type_size
    # the lattice tables here, once: built in a forked child, llama.cpp's OpenMP init can hang (libgomp after fork)
    ggml.lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    ggml.lib.ggml_quantize_init(int(t))
    got, bad = _ours_or_bad_rows(name, x, im)
    for r in bad:
        assert quantize_in_child(ggml, t, x[r:r + 1], im) is None, \
            f"{name} {what}: gguftool refuses row {r}, llama.cpp quantizes it"
    if bad:
        x = np.ascontiguousarray(np.delete(x, bad, axis=0))
        got = quantize(x, name, im)
    ref = quantize_in_child(ggml, t, x, im) if bad else ggml.quantize(t, x, im)
    assert ref is not None, f"{name} {what}: llama.cpp aborts on rows gguftool quantizes"
    if not np.array_equal(got, ref):
        d = (got.reshape(len(x), -1, bb) != ref.reshape(len(x), -1, bb)).any(-1)
        r, b = np.argwhere(d)[0]
        pytest.fail(f"{name} {what}: {int(d.sum())} blocks differ, first row {r} block {b}\n"
                    f"  ours {bytes(got[r, b * bb:(b + 1) * bb]).hex()}\n"
                    f"  ref  {bytes(ref[r, b * bb:(b + 1) * bb]).hex()}")
    return len(x)


def _imatrices(rng, n):
    return [
        rng.uniform(0, 2, n).astype(np.float32),
        (rng.standard_normal(n) ** 2).astype(np.float32),
        np.zeros(n, np.float32),                                             # all-zero importance
        np.where(rng.uniform(size=n) < 0.5, 0, 1e6).astype(np.float32),
        (10.0 ** rng.uniform(-20, 20, n)).astype(np.float32),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", TYPES)
def test_live_random_and_adversarial(name):
    from llama_oracle import adversarial_rows, oracle_or_skip

    ggml = oracle_or_skip()
    seed = int(np.random.default_rng().integers(1 << 31))   # fresh rows every run; the seed is in the message
    rng = np.random.default_rng(seed)
    n = 512
    x = np.ascontiguousarray(np.concatenate([
        rng.standard_normal((12, n)).astype(np.float32),
        (rng.standard_t(2.0, (6, n)) * 10 ** rng.uniform(-3, 3, (6, 1))).astype(np.float32),
        adversarial_rows(n, rng),
    ]))
    ims = ([] if name in NEEDS_IMATRIX else [None]) + _imatrices(rng, n)
    compared = sum(_compare(ggml, name, x, im, f"imatrix #{k} (seed {seed})") for k, im in enumerate(ims))
    assert compared >= len(x) * len(ims) - 4 * len(ims)   # at most a few aborted rows per pass


@pytest.mark.slow
@pytest.mark.parametrize("name", TYPES)
def test_live_real_rows(name, smollm2_gguf):
    """SmolLM2-135M rows (ffn_down 1536 wide, attn_k 576 is not a multiple of 256 and is left out), as stored
    (on a Q4_1 grid) and moved off it with noise of a tenth of the row RMS."""
    from llama_oracle import oracle_or_skip

    from gguftool.gguf.reader import GGUFReader

    ggml = oracle_or_skip()
    rng = np.random.default_rng(11)
    with GGUFReader(smollm2_gguf) as r:
        rows = []
        for tname in ("blk.0.ffn_down.weight", "blk.7.ffn_down.weight", "blk.20.ffn_down.weight"):
            info = r.tensor(tname)
            q = np.array(r.tensor_array(info)[:4])
            rows.append(dequantize(q, info.type, info.shape[0]))
    x = np.concatenate(rows)
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=1, keepdims=True)).astype(np.float32)
    noisy = x + rng.standard_normal(x.shape).astype(np.float32) * rms * np.float32(0.1)
    x = np.ascontiguousarray(np.concatenate([x, noisy]))
    n = x.shape[1]
    ims = ([] if name in NEEDS_IMATRIX else [None]) + [
        (x.astype(np.float64) ** 2).mean(axis=0).astype(np.float32),         # an imatrix-like column energy
        rng.gamma(1.5, 1.0, n).astype(np.float32),
    ]
    for k, im in enumerate(ims):
        assert _compare(ggml, name, x, im, f"SmolLM2 imatrix #{k}") == len(x)

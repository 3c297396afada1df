"""F16, BF16, Q8_0 and the legacy 32-block types: conversions, dequantization, error bounds, live llama.cpp.

Byte-exactness on the golden vectors, and dequantize() against gguf-py on them, are in test_quants_golden.py;
here:
- the bitwise F16/BF16 converters against an arithmetic scalar reference (below) / ggml's formula;
- round-trip error bounds on random data, and the importance path lowering the weighted error;
- fresh random and adversarial rows against llama.cpp's own ggml_quantize_chunk (skipped without it).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from numba import njit

from gguftool.gguf.constants import GGMLType
from gguftool.quants import SUPPORTED_TYPES, bf16, dequantize, f16, quantize, registry

LEGACY = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
NO_W = np.empty(0, np.float32)


# --- F16 / BF16 converters
@njit(cache=True)
def fp32_to_fp16_bits(f):
    """float32 -> binary16 bits by arithmetic (frexp and rint; independent of quants.bits' bit manipulation):
    round to nearest even, NaN -> 0x7E00 with its sign."""
    f = np.float32(f)
    sign = 0x8000 if math.copysign(1.0, f) < 0 else 0     # sign bit, also of -0.0 and of NaN
    if f != f:
        return np.uint16(sign | 0x7E00)
    a = abs(f)
    if a >= np.float32(65520.0):            # halfway between 65504 and 65536 rounds (to even) up: inf
        return np.uint16(sign | 0x7C00)
    if a < np.float32(6.103515625e-05):     # below 2^-14: subnormal, unit 2^-24 (q == 1024 is the smallest normal)
        q = int(np.rint(a * np.float32(16777216.0)))
        return np.uint16(sign | q)
    m, e = math.frexp(a)                    # a = m * 2^e, m in [0.5, 1): unbiased exponent E = e - 1
    E = e - 1
    q = int(np.rint(a * np.float32(2.0 ** (10 - E))))  # in [1024, 2048]; 2048 carries into the exponent
    return np.uint16(sign | (((E + 14) << 10) + q))


@njit(cache=True)
def _scalar_f16(u32):
    out = np.empty(u32.size, np.uint16)
    f = u32.view(np.float32)
    for i in range(u32.size):
        out[i] = fp32_to_fp16_bits(f[i])
    return out


def _interesting_bits(rng) -> np.ndarray:
    """Random bit patterns plus every pattern near the F16 thresholds (rounding ties, subnormal edge, overflow)."""
    edges = []
    for v in (0x33000000, 0x33800000, 0x387FE000, 0x38800000, 0x477FE000, 0x477FF000, 0x47800000,
              0x7F800000, 0x00000000, 0x3F800000, 0x3F801000, 0x3F803000, 0x35000000, 0x36801000):
        edges.append(np.arange(v - 4096, v + 4096, dtype=np.int64))
    e = np.concatenate(edges) & 0x7FFFFFFF
    e = np.concatenate([e, e | 0x80000000]).astype(np.uint32)
    return np.concatenate([e, rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)])


@pytest.mark.slow
def test_f16_bitwise_matches_scalar_reference():
    u = _interesting_bits(np.random.default_rng(7))
    out = np.empty((1, 2 * u.size), np.uint8)
    f16.quantize_rows(u.view(np.float32).reshape(1, -1), NO_W, out)
    assert np.array_equal(out.view(np.uint16)[0], _scalar_f16(u))
    # and with numpy's own (round-to-nearest-even) conversion for every non-NaN value
    x = u.view(np.float32)
    finite = ~np.isnan(x)
    with np.errstate(over="ignore"):
        assert np.array_equal(out.view(np.uint16)[0][finite], x[finite].astype(np.float16).view(np.uint16))


def test_f16_dequantize_all_patterns():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty((1, h.size), np.float32)
    f16.dequantize_rows(h.view(np.uint8).reshape(1, -1), out)
    assert np.array_equal(out[0].view(np.uint32), h.view(np.float16).astype(np.float32).view(np.uint32))


def test_bf16_both_directions():
    u = _interesting_bits(np.random.default_rng(8))
    out = np.empty((1, 2 * u.size), np.uint8)
    bf16.quantize_rows(u.view(np.float32).reshape(1, -1), NO_W, out)
    # ggml_compute_fp32_to_bf16, vectorised in 64-bit integers
    w = u.astype(np.uint64)
    expect = ((w + 0x7FFF + ((w >> 16) & 1)) >> 16) & 0xFFFF
    nan = (w & 0x7FFFFFFF) > 0x7F800000
    expect[nan] = (w[nan] >> 16) | 64
    assert np.array_equal(out.view(np.uint16)[0], expect.astype(np.uint16))
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    back = np.empty((1, h.size), np.float32)
    bf16.dequantize_rows(h.view(np.uint8).reshape(1, -1), back)
    assert np.array_equal(back[0].view(np.uint32), h.astype(np.uint32) << 16)


# --- round-trip error bounds
# relative RMS error on N(0, 1) rows (measured values are about 60-80% of these)
RMS_BOUND = {"F32": 0.0, "F16": 4e-4, "BF16": 3e-3, "Q8_0": 8e-3, "Q5_1": 0.05, "Q5_0": 0.06, "Q4_1": 0.1,
             "Q4_0": 0.11, "Q6_K": 0.025, "Q5_K": 0.05, "Q4_K": 0.1, "Q3_K": 0.2, "Q2_K": 0.38,
             "IQ3_XXS": 0.3, "IQ3_S": 0.22,
             "IQ4_NL": 0.1, "IQ4_XS": 0.1, "MXFP4": 0.15, "TQ2_0": 0.85, "TQ1_0": 0.85,
             "IQ2_XXS": 0.6, "IQ2_XS": 0.55, "IQ2_S": 0.45, "IQ1_S": 0.85, "IQ1_M": 0.9}


@pytest.fixture(scope="module")
def gaussian():
    rng = np.random.default_rng(99)
    x = rng.standard_normal((32, 1024)).astype(np.float32)
    imatrix = (rng.random(1024) ** 4 + 1e-3).astype(np.float32)
    return x, imatrix


def test_every_supported_type_has_a_bound():
    assert set(RMS_BOUND) == {t.name for t in SUPPORTED_TYPES}


@pytest.mark.parametrize("name", sorted(RMS_BOUND))
def test_round_trip_error(gaussian, name):
    x, imatrix = gaussian
    needs_imatrix = GGMLType[name] in registry.REQUIRES_IMATRIX   # llama.cpp refuses these without one
    for w in ((imatrix,) if needs_imatrix else (None, imatrix)):
        y = dequantize(quantize(x, name, w), name, x.shape[1])
        rel = float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2)))
        assert rel <= RMS_BOUND[name], (name, w is not None, rel)


def test_q8_0_elementwise_bound(gaussian):
    x, _ = gaussian
    y = dequantize(quantize(x, "Q8_0"), "Q8_0", x.shape[1])
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    # half a step, plus the fp16 rounding of the scale times the largest level
    bound = amax / 127 * (0.5 + 127 * 2.0 ** -11) * 1.0001
    assert (np.abs((y - x).reshape(-1, 32)) <= bound).all()


@pytest.mark.parametrize("name,levels", [("Q4_0", 16), ("Q4_1", 15), ("Q5_0", 32), ("Q5_1", 31)])
def test_legacy_ref_elementwise_bound(gaussian, name, levels):
    x, _ = gaussian
    y = dequantize(quantize(x, name), name, x.shape[1])
    xb = x.reshape(-1, 32)
    span = xb.max(1, keepdims=True) - xb.min(1, keepdims=True) if name.endswith("_1") \
        else 2 * np.abs(xb).max(1, keepdims=True)
    # within one quantization step (rounding, clamping of the far end, fp16 scale/min)
    assert (np.abs((y - x).reshape(-1, 32)) <= span / levels * 1.01).all()


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_importance_path_lowers_weighted_error(gaussian, name):
    x, imatrix = gaussian
    n = x.shape[1]

    def werr(q):
        return float(((dequantize(q, name, n) - x) ** 2 * imatrix).sum())

    assert werr(quantize(x, name, imatrix)) < 0.97 * werr(quantize(x, name))


# --- live llama.cpp
def _imatrices(n, rng):
    sparse = (rng.random(n) ** 2).astype(np.float32)
    sparse[::5] = 0
    return {"none": None, "random": (rng.random(n) ** 4).astype(np.float32), "sparse": sparse,
            "zeros": np.zeros(n, np.float32), "huge": np.full(n, 1e20, np.float32)}


def _signed_zero_rows(n, rng):
    """Blocks whose min or max is a zero of either sign, met in either order (C keeps the first one met,
    and the sign reaches the stored fp16 fields)."""
    g = rng.standard_normal(n).astype(np.float32)
    rows = [np.full(n, -0.0, np.float32)]
    r = np.abs(g)
    r[::32] = -0.0                                                 # min is -0.0, first in each block
    rows.append(r)
    r = np.abs(g)
    r[1::32] = -0.0
    r[::32] = 0.0                                                  # +0.0 met before -0.0
    rows.append(r)
    r = -np.abs(g)
    r[5::32] = -0.0
    r[9::32] = 0.0                                                 # max is a zero, -0.0 first
    rows.append(r)
    r = np.where(rng.random(n) < 0.5, np.float32(-0.0), np.float32(0.0)).astype(np.float32)
    rows.append(r)                                                 # only zeros, random signs
    return np.stack(rows)


def _halfway_rows(n, rng):
    """Blocks whose largest magnitude is 127 (Q8_0's scale is then exactly 1) holding levels at k + 0.5 and
    one float32 step either side, of both signs: where roundf (halfway away from zero) differs from other
    roundings, and where a rounding done as x + 0.5 would be off by one."""
    k = rng.integers(0, 127, n).astype(np.float32)
    half = (k + np.float32(0.5)) * rng.choice(np.array([-1, 1], np.float32), n)
    rows = [half, np.nextafter(half, np.float32(0)), np.nextafter(half, np.float32(np.inf))]
    for r in rows:
        r[::32] = np.float32(127.0)
    return np.stack(rows).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("n_per_row", [96, 256, 576])
@pytest.mark.parametrize("name", LEGACY)
def test_against_live_llama_cpp(name, n_per_row):
    from llama_oracle import adversarial_rows, first_diff_block, oracle_or_skip

    ggml = oracle_or_skip()
    rng = np.random.default_rng(1000 + n_per_row)
    x = np.concatenate([
        adversarial_rows(n_per_row, rng),
        rng.standard_normal((24, n_per_row)).astype(np.float32),
        (rng.standard_t(2.0, (8, n_per_row)) * rng.choice([1e-6, 1e-3, 1.0, 1e3], (8, 1))).astype(np.float32),
        (rng.standard_normal((4, n_per_row)) * 1e-39).astype(np.float32),  # subnormal inputs: 1/d overflows
        _signed_zero_rows(n_per_row, rng),
        _halfway_rows(n_per_row, rng),
    ])
    bb = GGMLType[name].type_size
    for label, w in _imatrices(n_per_row, rng).items():
        ours = quantize(x, name, w)
        ref = ggml.quantize(name, x, w)
        diff = first_diff_block(ours, ref, bb)
        assert diff is None, f"{name} n={n_per_row} imatrix={label}: first differing (row, block) {diff}"

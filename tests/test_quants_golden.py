"""Every golden vector (fixtures/golden/*.npz, made with llama.cpp's ggml_quantize_chunk) reproduced byte for byte.

The one place the golden vectors are compared, parametrized by type x file x path: ``q_<TYPE>`` is quantized
without an imatrix, ``qi_<TYPE>`` with the file's imatrix, through the public quantize() and through the
type module's row driver directly; each golden output is decoded like gguf-py does, bit for bit; and the block
functions of every type module (registry.py's convention) reproduce golden blocks one at a time.
A type whose kernel module is missing fails (it does not skip): these are the core exactness tests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gguftool.gguf.constants import GGMLType
from gguftool.quants import dequantize, quantize, registry

GOLDEN = Path(__file__).resolve().parent.parent / "fixtures" / "golden"
NO_IMATRIX = np.zeros(0, np.float32)


def _cases():
    cases = []
    for path in sorted(GOLDEN.glob("*.npz")):
        with np.load(path) as d:
            names = [k for k in d.files if k.startswith(("q_", "qi_"))]
        for k in names:
            prefix, tname = k.split("_", 1)
            cases.append((tname, path.name, k))
    cases.sort(key=lambda c: (GGMLType[c[0]], c[1], c[2]))
    return [pytest.param(f, k, id=f"{t}-{Path(f).stem}-{k.split('_')[0]}") for t, f, k in cases]


CASES = _cases()
# the types these files cover: the IQ / TQ / MXFP4 types have golden files of their own (fixtures/golden/iq/,
# tests/test_quants_golden_iq.py)
TYPES = tuple(t for t in registry.KERNEL_TYPES if not (GOLDEN / "iq" / f"{t.name}.npz").exists())
# golden arrays per type: 7 files x 2 paths; the K types only in the 6 files whose rows are a multiple of 256
EXPECTED_ARRAYS = {t: (12 if t.block_size == 256 else 14) for t in TYPES}


def test_golden_files_present():
    files = sorted(GOLDEN.glob("*.npz"))
    assert len(files) >= 7
    assert len(CASES) >= 150
    counts = {t: 0 for t in TYPES}
    for f in files:
        with np.load(f) as d:
            for k in d.files:
                if k.startswith(("q_", "qi_")):
                    counts[GGMLType[k.split("_", 1)[1]]] += 1
            # a file without K vectors must be one whose rows K types cannot take
            assert ("q_Q4_K" in d.files) == (d["x"].shape[1] % 256 == 0), f.name
    assert counts == EXPECTED_ARRAYS


def describe_first_diff(got: np.ndarray, exp: np.ndarray, qtype: GGMLType, x: np.ndarray) -> str:
    bb = qtype.type_size
    rows = exp.shape[0]
    d = (got.reshape(rows, -1, bb) != exp.reshape(rows, -1, bb)).any(-1)
    r, b = (int(v) for v in np.argwhere(d)[0])
    bs = qtype.block_size
    return (f"{int(d.sum())} of {d.size} blocks differ; first: row {r} block {b} "
            f"(elements {b * bs}..{(b + 1) * bs - 1})\n"
            f"  got      {bytes(got[r, b * bb:(b + 1) * bb]).hex()}\n"
            f"  expected {bytes(exp[r, b * bb:(b + 1) * bb]).hex()}\n"
            f"  x[:8]    {x[r, b * bs:b * bs + 8]}")


def _load(fname, key):
    with np.load(GOLDEN / fname) as d:
        x, imatrix, exp = d["x"], d["imatrix"], d[key]
    prefix, tname = key.split("_", 1)
    return x, (imatrix if prefix == "qi" else None), exp, GGMLType[tname]


@pytest.mark.parametrize("fname,key", CASES)
def test_golden(fname, key):
    """The public API and the type module's row driver (called directly, so neither hides the other)."""
    x, imatrix, exp, qtype = _load(fname, key)
    got = quantize(x, qtype, imatrix=imatrix)
    assert got.dtype == np.uint8
    assert got.shape == exp.shape, (got.shape, exp.shape)
    if not np.array_equal(got, exp):
        pytest.fail(f"{fname} {key} (quantize): " + describe_first_diff(got, exp, qtype, x))
    mod = registry.kernels(qtype)
    drv = np.zeros_like(exp)
    mod.quantize_rows(np.ascontiguousarray(x, np.float32),
                      NO_IMATRIX if imatrix is None else np.ascontiguousarray(imatrix, np.float32), drv)
    if not np.array_equal(drv, exp):
        pytest.fail(f"{fname} {key} ({mod.__name__}.quantize_rows): " + describe_first_diff(drv, exp, qtype, x))


@pytest.mark.parametrize("fname,key", CASES)
def test_dequantize_matches_gguf_py(fname, key):
    gguf_quants = pytest.importorskip("gguf.quants", reason="gguf-py (pip install gguf) is the independent "
                                                             "dequantizer this test compares with")
    from gguf import GGMLQuantizationType

    x, _, q, qtype = _load(fname, key)
    ours = dequantize(q, qtype, x.shape[1])
    theirs = gguf_quants.dequantize(q, GGMLQuantizationType[qtype.name]).astype(np.float32).reshape(ours.shape)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), \
        f"{key}: max |diff| {np.nanmax(np.abs(ours - theirs))}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_block_functions(qtype):
    """make_scratch / prepare_row / quantize_block / dequantize_block on single blocks of gauss_2048 give the
    golden blocks (both paths) and what dequantize_rows gives."""
    mod = registry.kernels(qtype)
    bs, bb = qtype.block_size, qtype.type_size
    with np.load(GOLDEN / "gauss_2048.npz") as z:
        x, imatrix = z["x"], z["imatrix"]
        refs = (z["q_" + qtype.name], z["qi_" + qtype.name])
    s = mod.make_scratch()
    y = np.empty(bb, np.uint8)
    back = np.empty(bs, np.float32)
    for r, b in ((0, 0), (3, 5), (15, 7)):
        xr = np.ascontiguousarray(x[r])
        xb = xr[bs * b:bs * (b + 1)]
        for qw, ref in ((NO_IMATRIX, refs[0]), (imatrix, refs[1])):
            mod.prepare_row(xr, qw, s)
            mod.quantize_block(xb, np.ascontiguousarray(qw[bs * b:bs * (b + 1)]), y, s)
            assert np.array_equal(y, ref[r, bb * b:bb * (b + 1)]), (qtype.name, r, b, qw.size > 0)
            mod.dequantize_block(y, back)
            want = dequantize(ref[r], qtype, x.shape[1])[0, bs * b:bs * (b + 1)]
            assert np.array_equal(back.view(np.uint32), want.view(np.uint32)), (qtype.name, r, b)

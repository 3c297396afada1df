"""Every golden vector (fixtures/golden/*.npz, made with llama.cpp's ggml_quantize_chunk) reproduced byte for byte.

One test per (file, array): ``q_<TYPE>`` is quantized without an imatrix, ``qi_<TYPE>`` with the file's
imatrix. A type whose kernel module is missing fails (it does not skip): these are the core exactness tests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gguftool.gguf.constants import GGMLType
from gguftool.quants import quantize

GOLDEN = Path(__file__).resolve().parent.parent / "fixtures" / "golden"


def _cases():
    cases = []
    for path in sorted(GOLDEN.glob("*.npz")):
        with np.load(path) as d:
            names = sorted(k for k in d.files if k.startswith(("q_", "qi_")))
        cases += [pytest.param(path.name, k, id=f"{path.stem}-{k}") for k in names]
    return cases


CASES = _cases()


def test_golden_files_present():
    assert len(list(GOLDEN.glob("*.npz"))) >= 7
    assert len(CASES) >= 150


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


@pytest.mark.parametrize("fname,key", CASES)
def test_golden(fname, key):
    with np.load(GOLDEN / fname) as d:
        x, imatrix, exp = d["x"], d["imatrix"], d[key]
    prefix, tname = key.split("_", 1)
    qtype = GGMLType[tname]
    got = quantize(x, tname, imatrix=imatrix if prefix == "qi" else None)
    assert got.dtype == np.uint8
    assert got.shape == exp.shape, (got.shape, exp.shape)
    if not np.array_equal(got, exp):
        pytest.fail(f"{fname} {key}: " + describe_first_diff(got, exp, qtype, x))

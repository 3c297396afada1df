"""The IQ / TQ / MXFP4 golden vectors (fixtures/golden/iq/<TYPE>.npz, scripts/make_golden_iq.py) reproduced byte
for byte, and llama.cpp's dequantization of them reproduced bit for bit.

Generic over the files present: every ``q__<case>`` (no imatrix) and ``qi__<case>__<pattern>`` array of every
npz is a test case, run through the public quantize() and through the type module's row driver. Rows on which
llama.cpp aborted when the file was made (``bad__…``) are left out. A type whose kernel is missing from the
registry fails (it does not skip): these are core exactness tests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gguftool.gguf.constants import GGMLType
from gguftool.quants import dequantize, quantize, registry

GOLDEN_IQ = Path(__file__).resolve().parent.parent / "fixtures" / "golden" / "iq"
NO_IMATRIX = np.zeros(0, np.float32)


def _type_of(path: Path) -> GGMLType:
    return GGMLType[path.stem]


def _cases():
    out = []
    for path in sorted(GOLDEN_IQ.glob("*.npz")):
        with np.load(path) as d:
            keys = [k for k in d.files if k.startswith(("q__", "qi__"))]
        for k in keys:
            out.append(pytest.param(path.name, k, id=f"{path.stem}-{k}"))
    return out


def _dq_cases():
    out = []
    for path in sorted(GOLDEN_IQ.glob("*.npz")):
        with np.load(path) as d:
            keys = [k for k in d.files if k.startswith("dq__")]
        out += [pytest.param(path.name, k, id=f"{path.stem}-{k}") for k in keys]
    return out


CASES = _cases()
DQ_CASES = _dq_cases()


def _load(fname: str, key: str):
    """x, imatrix (None for q__), expected bytes, rows to compare (bool mask), type."""
    with np.load(GOLDEN_IQ / fname) as d:
        parts = key.split("__")
        case = parts[1]
        x = d["x__" + case]
        imatrix = d[f"im__{parts[2]}__{x.shape[1]}"] if parts[0] == "qi" else None
        exp = d[key]
        badkey = "bad__" + "__".join(parts[1:])
        good = ~d[badkey] if badkey in d.files else np.ones(x.shape[0], bool)
    return x, imatrix, exp, good, _type_of(GOLDEN_IQ / fname)


def describe_first_diff(got: np.ndarray, exp: np.ndarray, qtype: GGMLType, x: np.ndarray) -> str:
    bb, bs = qtype.type_size, qtype.block_size
    rows = exp.shape[0]
    d = (got.reshape(rows, -1, bb) != exp.reshape(rows, -1, bb)).any(-1)
    r, b = (int(v) for v in np.argwhere(d)[0])
    return (f"{int(d.sum())} of {d.size} blocks differ; first: row {r} block {b} "
            f"(elements {b * bs}..{(b + 1) * bs - 1})\n"
            f"  got      {bytes(got[r, b * bb:(b + 1) * bb]).hex()}\n"
            f"  expected {bytes(exp[r, b * bb:(b + 1) * bb]).hex()}\n"
            f"  x[:8]    {x[r, b * bs:b * bs + 8]}")


def test_golden_iq_files_well_formed():
    """Every file names its type in meta, holds x for every output and an imatrix for every pattern used."""
    assert (GOLDEN_IQ / "README.md").is_file()
    for path in sorted(GOLDEN_IQ.glob("*.npz")):
        t = _type_of(path)
        with np.load(path) as d:
            assert str(d["meta"][0]) == t.name, path.name
            for k in d.files:
                if k.startswith(("q__", "qi__")):
                    parts = k.split("__")
                    x = d["x__" + parts[1]]
                    assert d[k].shape == (x.shape[0], t.row_bytes(x.shape[1])), (path.name, k)
                    if parts[0] == "qi":
                        assert f"im__{parts[2]}__{x.shape[1]}" in d.files, (path.name, k)


@pytest.mark.parametrize("fname,key", CASES)
def test_golden_iq(fname, key):
    x, imatrix, exp, good, qtype = _load(fname, key)
    assert registry.has_kernel(qtype), f"gguftool has no {qtype.name} kernel (golden file {fname})"
    x, exp = np.ascontiguousarray(x[good]), exp[good]
    got = quantize(x, qtype, imatrix=imatrix)
    assert got.shape == exp.shape, (got.shape, exp.shape)
    if not np.array_equal(got, exp):
        pytest.fail(f"{fname} {key} (quantize): " + describe_first_diff(got, exp, qtype, x))
    mod = registry.kernels(qtype)
    drv = np.zeros_like(exp)
    mod.quantize_rows(x, NO_IMATRIX if imatrix is None else np.ascontiguousarray(imatrix, np.float32), drv)
    if not np.array_equal(drv, exp):
        pytest.fail(f"{fname} {key} ({mod.__name__}.quantize_rows): " + describe_first_diff(drv, exp, qtype, x))


@pytest.mark.parametrize("fname,key", DQ_CASES)
def test_golden_iq_dequantize(fname, key):
    """dq__<case> is llama.cpp's to_float of the output named in dqsrc__<case>: ours gives the same bits."""
    case = key.split("__", 1)[1]
    with np.load(GOLDEN_IQ / fname) as d:
        want = d[key]
        q = d[str(d["dqsrc__" + case])]
    qtype = _type_of(GOLDEN_IQ / fname)
    assert registry.has_kernel(qtype), f"gguftool has no {qtype.name} kernel (golden file {fname})"
    got = dequantize(q, qtype, want.shape[1])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), \
        f"{fname} {key}: {int((got.view(np.uint32) != want.view(np.uint32)).sum())} values differ"

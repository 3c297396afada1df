"""IQ3_XXS and IQ3_S: the lattice tables, the kernels against llama.cpp, and the rows llama.cpp aborts on.

(The golden vectors, fixtures/golden/iq/IQ3_*.npz, are compared in test_quants_golden_iq.py.)
- the tables iq3_grids.py builds at import against a brute-force reading of iq3xs_init_impl;
- the decoders against gguf-py (an independent implementation with its own grid tables);
- round-trip error bounds, exact power-of-two scaling, block functions = row driver = public API;
- the live llama.cpp (llama-cpp-python's ggml_quantize_chunk) on fresh random, adversarial, extreme and real
  rows with several importance matrices;
- the rows on which llama.cpp aborts (a GGML_ASSERT in the lattice search): gguftool raises QuantError naming
  the row, and predicts exactly those rows (checked against the golden files' marked rows and, live, against
  a llama.cpp process that dies).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gguftool.quants import QuantError, dequantize, iq3_grids, iq3_s, iq3_xxs, quantize

MODULES = {"IQ3_XXS": iq3_xxs, "IQ3_S": iq3_s}
TABLES = {"IQ3_XXS": (iq3_grids.GRID_XXS, *iq3_grids.SEARCH_XXS), "IQ3_S": (iq3_grids.GRID_S, *iq3_grids.SEARCH_S)}
NO_IMATRIX = np.zeros(0, np.float32)
GOLDEN_IQ = Path(__file__).resolve().parent.parent / "fixtures" / "golden" / "iq"


def _rows(mod, x, imatrix=None):
    """Our bytes and the per-row 'llama.cpp aborts here' flags (the row driver without the raise)."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // 256 * mod.BLOCK_BYTES), np.uint8)
    failed = np.zeros(x.shape[0], np.bool_)
    w = NO_IMATRIX if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    mod._quantize_rows(x, w, out, failed, *TABLES[mod.GGML_TYPE.name])
    return out, failed


def _assert_same_blocks(ours, ref, block_bytes, what):
    assert ours.shape == ref.shape, what
    diff = (ours.reshape(ours.shape[0], -1, block_bytes) != ref.reshape(ref.shape[0], -1, block_bytes)).any(-1)
    if diff.any():
        r, b = np.argwhere(diff)[0]
        sl = slice(b * block_bytes, (b + 1) * block_bytes)
        raise AssertionError(f"{what}: {int(diff.sum())} differing blocks; first at row {r} block {b}\n"
                             f"  ours {ours[r, sl].tolist()}\n  ref  {ref[r, sl].tolist()}")


# --- the tables
def _brute_neighbours(grid, u, nwant):
    """iq3xs_init_impl's list for the off-grid tuple u: every grid point at the nwant nearest distinct squared
    distances, sorted by (distance, index)."""
    pos = np.array([2 * ((u >> (3 * k)) & 7) + 1 for k in range(4)])
    d2 = [(int(((grid[j].astype(int) - pos) ** 2).sum()), j) for j in range(grid.shape[0])]
    d2.sort()
    out, seen = [], []
    for d, j in d2:
        if d not in seen:
            if len(seen) == nwant:
                break
            seen.append(d)
        out.append(j)
    return out


@pytest.mark.parametrize("qtype,nwant,size,total", [("IQ3_XXS", 2, 256, 22825), ("IQ3_S", 3, 512, 28317)])
def test_tables(qtype, nwant, size, total):
    grid = iq3_grids.GRID_XXS if qtype == "IQ3_XXS" else iq3_grids.GRID_S
    kmap = iq3_grids.KMAP_XXS if qtype == "IQ3_XXS" else iq3_grids.KMAP_S
    neigh = iq3_grids.NEIGHBOURS_XXS if qtype == "IQ3_XXS" else iq3_grids.NEIGHBOURS_S
    skmap, sindex, svalues = iq3_grids.SEARCH_XXS if qtype == "IQ3_XXS" else iq3_grids.SEARCH_S
    assert grid.shape == (size, 4) and set(np.unique(grid)) <= {1, 3, 5, 7, 9, 11, 13, 15}
    on = np.flatnonzero(kmap >= 0)
    assert on.size == size and sorted(kmap[on]) == list(range(size))
    for u in on:    # kmap inverts the grid
        assert [2 * ((u >> (3 * k)) & 7) + 1 for k in range(4)] == grid[kmap[u]].tolist()
    # llama.cpp's allocation: num_neighbors + num_not_in_map entries
    assert neigh.size == total
    rng = np.random.default_rng(3)
    off = np.flatnonzero(kmap < 0)
    for u in list(off[:40]) + list(rng.choice(off, 160, replace=False)) + [off[-1]]:
        s = -kmap[u] - 1
        n = int(neigh[s])
        assert neigh[s + 1:s + 1 + n].tolist() == _brute_neighbours(grid, int(u), nwant), u
        # the padded search layout holds the same list, then NaN entries up to a multiple of 8
        ss = -skmap[u] - 1
        m = int(sindex[ss])
        assert m % 8 == 0 and n <= m < n + 8
        assert sindex[ss + 1:ss + 1 + n].tolist() == neigh[s + 1:s + 1 + n].tolist()
        assert np.array_equal(svalues[:, ss + 1:ss + 1 + n].T, grid[neigh[s + 1:s + 1 + n]].astype(np.float32))
        assert np.isnan(svalues[:, ss + 1 + n:ss + 1 + m]).all()
    assert np.array_equal(skmap[on], kmap[on])


@pytest.mark.parametrize("qtype", sorted(MODULES))
def test_dequantize_matches_gguf_py(qtype):
    """Random blocks (finite fp16 scales) decode as gguf-py decodes them: the grids and the layout."""
    gguf = pytest.importorskip("gguf", reason="gguf-py is the independent decoder")
    mod = MODULES[qtype]
    rng = np.random.default_rng(11)
    blocks = rng.integers(0, 256, (64, 4 * mod.BLOCK_BYTES), dtype=np.uint8)
    d = (rng.standard_normal((64, 4)) * 10.0 ** rng.uniform(-6, 3, (64, 4))).astype(np.float16)
    for b in range(4):
        blocks[:, b * mod.BLOCK_BYTES:b * mod.BLOCK_BYTES + 2] = d[:, b:b + 1].view(np.uint8)
    ours = dequantize(blocks, qtype, 1024)
    ref = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, qtype)).reshape(64, 1024)
    assert np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("qtype,bound,bound_i", [("IQ3_XXS", 0.22, 0.22), ("IQ3_S", 0.19, 0.19)])
def test_round_trip_and_interfaces(qtype, bound, bound_i):
    mod = MODULES[qtype]
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    imatrix = rng.uniform(0.5, 2.0, 1024).astype(np.float32)
    for im, b in ((None, bound), (imatrix, bound_i)):
        q = quantize(x, qtype, im)
        y = dequantize(q, qtype, 1024)
        rel = np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2))
        assert b / 10 < rel < b, (qtype, im is not None, rel)
        # the block functions (registry.py's interface) give the row driver's bytes and decode
        s = mod.make_scratch()
        blk = np.zeros(mod.BLOCK_BYTES, np.uint8)
        back = np.zeros(256, np.float32)
        for r, j in ((0, 0), (5, 3), (15, 2)):
            mod.prepare_row(x[r], NO_IMATRIX if im is None else im, s)
            mod.quantize_block(x[r, 256 * j:256 * (j + 1)], NO_IMATRIX if im is None else im[256 * j:256 * (j + 1)],
                               blk, s)
            assert np.array_equal(blk, q[r, mod.BLOCK_BYTES * j:mod.BLOCK_BYTES * (j + 1)]), (r, j)
            mod.dequantize_block(blk, back)
            assert np.array_equal(back, y[r, 256 * j:256 * (j + 1)])
    # zero rows decode to zeros; scaling the input by a power of two scales the decoded output exactly
    assert np.array_equal(dequantize(quantize(np.zeros((2, 256), np.float32), qtype), qtype, 256),
                          np.zeros((2, 256), np.float32))
    y1 = dequantize(quantize(x[:4], qtype), qtype, 1024)
    y2 = dequantize(quantize(x[:4] * np.float32(4.0), qtype), qtype, 1024)
    assert np.array_equal(y1 * np.float32(4.0), y2)


@pytest.mark.parametrize("qtype", sorted(MODULES))
def test_abort_rows_raise(qtype):
    """A row llama.cpp aborts on (its lattice search's distances overflow) is a QuantError naming the row; the
    golden files' rows marked as aborted are exactly the rows we flag."""
    x = np.random.default_rng(2).standard_normal((3, 512)).astype(np.float32)
    x[1] *= np.float32(1e20)
    with pytest.raises(QuantError, match=rf"^row 1: llama.cpp aborts quantizing it to {qtype}"):
        quantize(x, qtype)
    with pytest.raises(QuantError, match=r"^row 1: "):
        quantize(x, qtype, np.ones(512, np.float32))
    with np.load(GOLDEN_IQ / f"{qtype}.npz") as d:
        marked = 0
        for k in d.files:
            if not k.startswith(("q__", "qi__")):
                continue
            parts = k.split("__")
            xx = d["x__" + parts[1]]
            im = d[f"im__{parts[2]}__{xx.shape[1]}"] if parts[0] == "qi" else None
            bad = d.get("bad__" + "__".join(parts[1:]), np.zeros(xx.shape[0], bool))
            _, failed = _rows(MODULES[qtype], xx, im)
            assert np.array_equal(failed, bad), (k, np.flatnonzero(failed), np.flatnonzero(bad))
            marked += int(bad.sum())
    assert marked > 0      # the files do hold such rows


# --- live llama.cpp
def _extreme_rows(rng, n):
    rows = []
    g = lambda: rng.standard_normal(n)  # noqa: E731
    for s in (1e-30, 1e-20, 1e-12, 1e-9, 1e-8, 3e-8, 1e-5, 1e3, 1e5, 1e8, 1e10, 1e11, 1e12):
        rows.append(g() * s)
    for _ in range(3):
        v = np.zeros(n)
        v[rng.integers(n)] = rng.standard_normal() * 10 ** rng.uniform(-10, 10)
        rows.append(v)                                                   # single spike in a zero row
        v = g()
        v[rng.integers(n)] = 1e4 * rng.standard_normal()
        rows.append(v)                                                   # one outlier
        v = g()
        v[rng.integers(n // 32) * 32:][:32] = 0
        rows.append(v)                                                   # one zero sub-block (IQ3_S's cursors)
        v = g()
        v[rng.integers(n // 32) * 32:][:32] *= 1e-9
        rows.append(v)                                                   # one sub-block under IQ3_XXS's eps
        rows.append(rng.integers(-8, 8, n) * 2 + 1.0)                    # on the lattice
        rows.append(np.round(g() * 4))
        rows.append(g() ** 3)
        rows.append(g() * 10.0 ** rng.uniform(-6, 6, n))                 # wildly varying magnitudes
        v = g() * 10.0 ** rng.uniform(-40, 11, n)
        v[rng.uniform(size=n) < 0.3] = 0
        rows.append(v)
    return np.stack(rows).astype(np.float32)


@pytest.mark.slow
def test_live_llama_cpp():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python provides the live ggml_quantize_chunk oracle")
    from llama_oracle import adversarial_rows, oracle_or_skip

    ggml = oracle_or_skip()
    seed = int(np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    n = 512
    x = np.ascontiguousarray(np.concatenate([
        rng.standard_normal((24, n)).astype(np.float32),
        (rng.standard_t(2.0, (8, n)) * 10 ** rng.uniform(-3, 3, (8, 1))).astype(np.float32),
        adversarial_rows(n, rng, sub=32),
        _extreme_rows(rng, n),
    ]))
    imatrices = [
        None,
        rng.uniform(0, 2, n),
        rng.standard_normal(n) ** 2,
        np.zeros(n),                                             # all-zero importance: no trial scale wins
        np.where(rng.uniform(size=n) < 0.5, 0, 1e6),
        10.0 ** rng.uniform(-20, 20, n),
    ]
    for qtype, mod in MODULES.items():
        for k, im in enumerate(imatrices):
            im = None if im is None else im.astype(np.float32)
            ours, failed = _rows(mod, x, im)
            # llama.cpp aborts on rows whose search distances overflow (only the huge ones): leave them out
            assert (np.abs(x[failed]).max(axis=1) > 1e11).all(), (qtype, k, np.flatnonzero(failed))
            ref = ggml.quantize(qtype, x[~failed], im)
            _assert_same_blocks(ours[~failed], ref, mod.BLOCK_BYTES, f"{qtype} imatrix #{k} (seed {seed})")


_ABORT_CHILD = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from llama_oracle import load_oracle
ggml, why = load_oracle()
x = np.load(sys.argv[3])
ggml.quantize(sys.argv[2], x, None)
print("returned")
"""


@pytest.mark.slow
@pytest.mark.parametrize("qtype", sorted(MODULES))
def test_llama_cpp_aborts_where_we_refuse(qtype, tmp_path):
    """The row we refuse kills a llama.cpp process; its neighbour row (1e11, no overflow) does not."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python provides the live ggml_quantize_chunk oracle")
    g = np.random.default_rng(8).standard_normal(256).astype(np.float32)
    tests_dir = str(Path(__file__).resolve().parent)
    for scale, aborts in ((1e11, False), (1e14, True)):
        x = (g * np.float32(scale))[None, :]
        _, failed = _rows(MODULES[qtype], x)
        assert bool(failed[0]) == aborts
        f = tmp_path / f"x{scale:g}.npy"
        np.save(f, x)
        p = subprocess.run([sys.executable, "-c", _ABORT_CHILD, tests_dir, qtype, str(f)], capture_output=True,
                           text=True, timeout=120)
        assert (p.returncode != 0) == aborts, (scale, p.returncode, p.stderr[-500:])
        if aborts:
            assert "GGML_ASSERT" in p.stderr
        else:
            assert "returned" in p.stdout


@pytest.mark.slow
def test_live_llama_cpp_real_model_rows(gemma3_gguf, request):
    """Rows of a real model (gemma-3-270m, dequantized with gguf-py) against the live llama.cpp, and the same
    rows moved off their Q4_K/Q6_K grid with seeded noise."""
    from llama_oracle import oracle_or_skip
    from test_quants_affine_k import _gemma_rows

    ggml = oracle_or_skip()
    rng = np.random.default_rng(6)
    rows_by_tensor = _gemma_rows(gemma3_gguf, request)
    assert rows_by_tensor
    for name, rows in rows_by_tensor:
        noisy = rows + (rng.standard_normal(rows.shape) * 0.1 * np.sqrt((rows ** 2).mean(1, keepdims=True)))
        im = rng.exponential(1.0, rows.shape[1]).astype(np.float32)
        for x in (rows, noisy.astype(np.float32)):
            for qtype, mod in MODULES.items():
                for imx in (None, im):
                    ours, failed = _rows(mod, x, imx)
                    assert not failed.any()
                    _assert_same_blocks(ours, ggml.quantize(qtype, x, imx), mod.BLOCK_BYTES,
                                        f"gemma-3 {name} {qtype} imatrix={imx is not None}")

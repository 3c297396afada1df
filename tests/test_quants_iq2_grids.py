"""The IQ2/IQ1 lattice tables (gguftool/quants/iq_grids_2.py) equal llama.cpp's, and the shared searches.

The grids, maps and neighbour lists are pinned by the sha256 of the tables llama.cpp's own iq2xs_init_impl
builds (scripts/check_iq2_tables.py compiles ggml-quants.c and prints them); the kgrid tables, the
dequantization grids and the sign table are compared with gguf-py's independent copies.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from gguftool.quants import iq_grids_2 as g

# sha256 of llama.cpp's iq2_data[i].grid / .map / .neighbours (scripts/check_iq2_tables.py, llama.cpp of
# llama-cpp-python 0.3.36)
LLAMA_TABLES = {
    g.IQ2_XXS: ("66eeec56ebb1a92f016b0f2db4e541fd89f6d0e98420e0320f141ef9d8352c44",
                "709b1f45e8457bc27656b3bc37ea881ffc567fe71540df5aae912097b77e2fd1",
                "fb8727a3ecbf6124f63c263d0c1b05925d580426a1d732df1d91514b84a21724"),
    g.IQ2_XS: ("9ecaef3c92b0303966e67ad654b072680ee1fbd5a10e671ffe4f2d402c72a7fd",
               "d6b796100158d2c7de48d0a2d5c38efc400471f822f874f631ab71dd47454326",
               "b94f3f7601b0130674b6e0b7fdccc240b7234d31db4d60601dfc0ff6872a129e"),
    g.IQ1: ("0f0eceb34d699cdb07efa55b2e8e4d5a56a4d30f645263db5e94999f1bdda165",
            "732ed77320813d3250cbecd7235db1a2d0a661ee4b54fa2a0b5d1cd4e08c5ef0",
            "9a5d4a8807610d7ecdb328c531a60a6e10a202801f9290a6ed17daf3b9a4b054"),
    g.IQ2_S: ("55cf5d20e27350dd4273d9635292a4b05997fe3cc594002cc6c59844b24c6d1a",
              "bdd7645b9d68dcd282605e039b72ed729c4252e518c5d6ffb12282135a8c37c8",
              "7e06788dce7035c2d4fdc983be81429c26fc3106db8d76a2771b285f9c2eb8ed"),
}
KINDS = {"IQ2_XXS": g.IQ2_XXS, "IQ2_XS": g.IQ2_XS, "IQ1": g.IQ1, "IQ2_S": g.IQ2_S}


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()


@pytest.mark.parametrize("name", KINDS)
def test_tables_equal_llama_cpp(name):
    kind = KINDS[name]
    t = g.tables(kind)
    assert t.grid.shape == (g._GRID_SIZE[kind], 8)
    assert t.kmap.shape == (g.KMAP_SIZE,)
    got = (_sha(t.grid), _sha(t.kmap.astype("<i4")), _sha(t.neighbours.astype("<u2")))
    assert got == LLAMA_TABLES[kind]
    assert g.tables(kind) is t  # built once


@pytest.mark.parametrize("name", KINDS)
def test_neighbour_lists_are_the_nearest(name):
    """Structural check, independent of the pinned hashes: each off-grid point's list holds exactly the grid
    points at its nwant smallest distances, in (distance, index) order."""
    kind = KINDS[name]
    t = g.tables(kind)
    grid = t.grid.astype(np.int64)
    rng = np.random.default_rng(5)
    off = np.flatnonzero(t.kmap < 0)
    for u in rng.choice(off, 40, replace=False):
        pos = 2 * ((u >> (2 * np.arange(8))) & 3) + 1
        d2 = ((grid - pos) ** 2).sum(axis=1)
        keep = np.unique(d2)[:g._NWANT[kind]]
        want = sorted(np.flatnonzero(np.isin(d2, keep)), key=lambda j: (d2[j], j))
        o = -int(t.kmap[u]) - 1
        n = int(t.neighbours[o])
        assert list(t.neighbours[o + 1:o + 1 + n]) == want


def test_kgrids_and_dequant_grids_match_gguf_py():
    gq = pytest.importorskip("gguf.quants", reason="gguf-py (pip install gguf) holds independent copies")
    for cls, kind in ((gq.IQ2_XXS, g.IQ2_XXS), (gq.IQ2_XS, g.IQ2_XS), (gq.IQ2_S, g.IQ2_S), (gq.IQ1_S, g.IQ1)):
        assert bytes.fromhex(cls.grid_hex.decode()) == g.kgrid(kind).astype("<u2").tobytes(), cls.__name__
        levels = (g.kgrid(kind).astype(np.int64)[:, None] >> (2 * np.arange(8))) & 3
        want = np.array(cls.grid_map, dtype=np.int64)[levels]
        assert np.array_equal(g.dequant_grid(kind).astype(np.int64), want), cls.__name__
    assert bytes(g.KSIGNS_IQ2XS) == gq.IQ2_XXS.ksigns


def test_sort_order_is_stable():
    """glibc's qsort of 16/32 pairs is a merge sort: equal values keep their index order (-0.0 == 0.0)."""
    from numba import njit

    @njit
    def order(x):
        idx = np.zeros(x.size, np.int32)
        g.sort_order(x, x.size, idx)
        return idx

    x = np.array([0.5, -0.0, 0.0, 0.5, -1.0, 0.0, 2.0, -0.0] * 4, np.float32)
    assert list(order(x)) == list(np.argsort(x, kind="stable"))

"""gguftool.importance.files: reading (and writing) GGUF and legacy .dat importance matrices.

The weights must be what llama-quantize computes (tools/quantize/quantize.cpp load_imatrix): in_sum2 / count per
expert matrix for GGUF (1 where the count is 0), values / ncall for .dat - float32 divisions.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from gguftool.errors import FormatError, ImatrixError
from gguftool.importance.files import (Imatrix, ImatrixEntry, read_imatrix, write_imatrix_gguf,
                                   write_imatrix_legacy)

from conftest import QUANTIZE_REF

LLAMA_IMATRIX = os.path.join(QUANTIZE_REF, "llama_imatrix")


def _im():
    rng = np.random.default_rng(1)
    return Imatrix({
        "blk.0.attn_q.weight": ImatrixEntry(rng.random((1, 64), dtype=np.float32) * 100, np.array([512])),
        "blk.0.ffn_down_exps.weight": ImatrixEntry(rng.random((3, 32), dtype=np.float32),
                                                    np.array([256, 0, 1024])),
        "output.weight": ImatrixEntry(rng.random((1, 64), dtype=np.float32), np.array([7])),
    }, ["calib.txt"], 12, 512)


def test_gguf_roundtrip_and_weights(tmp_path):
    im = _im()
    p = tmp_path / "im.gguf"
    write_imatrix_gguf(p, im)
    got = read_imatrix(p)
    assert not got.is_legacy and got.has_metadata
    assert (got.datasets, got.chunk_count, got.chunk_size) == (["calib.txt"], 12, 512)
    assert sorted(got.entries) == sorted(im.entries)
    for name, e in im.entries.items():
        np.testing.assert_array_equal(got.entries[name].in_sum2, e.in_sum2)
        np.testing.assert_array_equal(got.entries[name].counts, e.counts)
    w = got.weights()
    e = im.entries["blk.0.attn_q.weight"]
    np.testing.assert_array_equal(w["blk.0.attn_q.weight"], e.in_sum2[0] / np.float32(512))
    moe = w["blk.0.ffn_down_exps.weight"]
    assert moe.shape == (96,) and moe.dtype == np.float32
    np.testing.assert_array_equal(moe[32:64], np.ones(32, np.float32))  # count 0 -> weight 1
    np.testing.assert_array_equal(moe[64:], im.entries["blk.0.ffn_down_exps.weight"].in_sum2[2] / np.float32(1024))


def test_gguf_layout_is_llama_imatrix_layout(tmp_path):
    from gguftool.gguf.reader import GGUFReader

    p = tmp_path / "im.gguf"
    write_imatrix_gguf(p, _im())
    with GGUFReader(p) as r:
        assert [kv.key for kv in r.kvs] == ["general.type", "imatrix.datasets", "imatrix.chunk_count",
                                            "imatrix.chunk_size"]
        assert r.get("general.type") == "imatrix"
        names = [(t.name, t.shape) for t in r.tensors]
    assert names == [("blk.0.attn_q.weight.in_sum2", (64,)), ("blk.0.attn_q.weight.counts", (1,)),
                     ("blk.0.ffn_down_exps.weight.in_sum2", (32, 3)), ("blk.0.ffn_down_exps.weight.counts", (1, 3)),
                     ("output.weight.in_sum2", (64,)), ("output.weight.counts", (1,))]


def test_legacy_roundtrip(tmp_path):
    # counts that are powers of two with ncall = count / chunk_size keep value/count*ncall/ncall exact
    im = Imatrix({"a.weight": ImatrixEntry(np.arange(1, 33, dtype=np.float32).reshape(1, 32), np.array([1024])),
                  "b.weight": ImatrixEntry(np.zeros((1, 32), np.float32), np.array([0]))}, ["x.txt"], 3, 512)
    p = tmp_path / "im.dat"
    write_imatrix_legacy(p, im)
    got = read_imatrix(p)
    assert got.is_legacy and got.datasets == ["x.txt"] and got.chunk_count == 3
    assert list(got.entries) == ["a.weight"]  # entries without data are skipped
    assert int(got.entries["a.weight"].counts[0]) == 2  # ncall = ceil(1024 / 512)
    np.testing.assert_array_equal(got.weights()["a.weight"], np.arange(1, 33, dtype=np.float32) / np.float32(1024))


def _legacy_bytes(entries, trailer=b""):
    b = struct.pack("<i", len(entries))
    for name, ncall, vals in entries:
        raw = name.encode()
        b += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(vals))
        b += np.asarray(vals, "<f4").tobytes()
    return b + trailer


def test_legacy_ncall_zero_keeps_values_and_trailer_optional(tmp_path):
    p = tmp_path / "im.dat"
    p.write_bytes(_legacy_bytes([("t.weight", 0, [1.5, 2.5]), ("u.weight", 4, [2.0, 6.0])]))
    got = read_imatrix(p)
    assert got.chunk_count == 0 and got.datasets == []
    w = got.weights()
    np.testing.assert_array_equal(w["t.weight"], np.array([1.5, 2.5], np.float32))
    np.testing.assert_array_equal(w["u.weight"], np.array([0.5, 1.5], np.float32))


def test_filtered_include_exclude():
    im = _im()
    assert sorted(im.filtered(exclude=["attn"]).entries) == ["blk.0.ffn_down_exps.weight", "output.weight"]
    assert sorted(im.filtered(include=["output", "attn_q"]).entries) == ["blk.0.attn_q.weight", "output.weight"]
    assert im.filtered(include=["nothing"]).entries == {}


# --- bad files


def test_missing_file(tmp_path):
    with pytest.raises(ImatrixError, match="no such imatrix file"):
        read_imatrix(tmp_path / "nope.dat")


@pytest.mark.parametrize("blob,msg", [
    (b"", "too short"),
    (b"hello world, this is text\n", "not an imatrix file"),
    (struct.pack("<i", 0), "not an imatrix file"),
    (struct.pack("<i", 2_000_000_000) + bytes(40), "not an imatrix file"),
    (_legacy_bytes([("t.weight", 1, [1.0, 2.0])])[:-3], "truncated|needs 8 bytes"),
    (struct.pack("<ii", 1, -5) + bytes(20), "bad name length -5"),
    (struct.pack("<ii", 1, 1) + b"x" + struct.pack("<ii", 1, 0) + bytes(8), "bad value count 0"),
])
def test_bad_legacy_files(tmp_path, blob, msg):
    p = tmp_path / "bad.dat"
    p.write_bytes(blob)
    with pytest.raises(ImatrixError, match=msg):
        read_imatrix(p)


def _write_gguf(path, tensors, kvs=None):
    from gguftool.gguf.constants import GGUFValueType
    from gguftool.gguf.values import kv_array, kv_u32
    from gguftool.gguf.writer import GGUFWriter

    with GGUFWriter(path) as w:
        for kv in kvs if kvs is not None else [kv_array("imatrix.datasets", GGUFValueType.STRING, ["d"]),
                                              kv_u32("imatrix.chunk_count", 1), kv_u32("imatrix.chunk_size", 8)]:
            w.add_kv(kv)
        for name, arr, t in tensors:
            w.add_tensor_info(name, tuple(reversed(arr.shape)), t)
        w.write_header()
        for name, arr, _ in tensors:
            w.write_tensor_data(name, arr)
        w.finish()


def test_gguf_sums_without_counts(tmp_path):
    p = tmp_path / "im.gguf"
    _write_gguf(p, [("a.weight.in_sum2", np.ones(32, np.float32), "F32")])
    with pytest.raises(ImatrixError, match="mismatched sums and counts for a.weight"):
        read_imatrix(p)


def test_gguf_wrong_tensor_type(tmp_path):
    p = tmp_path / "im.gguf"
    _write_gguf(p, [("a.weight.in_sum2", np.ones(32, np.float16), "F16"),
                    ("a.weight.counts", np.ones(1, np.float32), "F32")])
    with pytest.raises(ImatrixError, match="must be F32"):
        read_imatrix(p)


def test_gguf_without_metadata_is_flagged(tmp_path):
    p = tmp_path / "im.gguf"
    _write_gguf(p, [("a.weight.in_sum2", np.ones(32, np.float32), "F32"),
                    ("a.weight.counts", np.ones(1, np.float32), "F32")], kvs=[])
    assert read_imatrix(p).has_metadata is False


def test_gguf_damaged(tmp_path):
    p = tmp_path / "im.gguf"
    write_imatrix_gguf(p, _im())
    data = p.read_bytes()
    p.write_bytes(data[:200])
    with pytest.raises(FormatError):
        read_imatrix(p)


# --- files written by llama.cpp's llama-imatrix (fixtures/quantize_reference/llama_imatrix/)


def test_reads_llama_imatrix_files_in_both_formats(tmp_path):
    g = read_imatrix(os.path.join(LLAMA_IMATRIX, "tiny.imatrix.gguf"))
    d = read_imatrix(os.path.join(LLAMA_IMATRIX, "tiny.imatrix.dat"))
    assert g.has_metadata and not g.is_legacy and d.is_legacy
    assert sorted(g.entries) == sorted(d.entries) and len(g.entries) > 0
    assert g.chunk_count == d.chunk_count > 0
    wg, wd = g.weights(), d.weights()
    for name in wg:
        np.testing.assert_allclose(wd[name], wg[name], rtol=1e-5)
    # what we write from what we read is the file llama-imatrix wrote
    out = tmp_path / "again.gguf"
    write_imatrix_gguf(out, g)
    assert out.read_bytes() == open(os.path.join(LLAMA_IMATRIX, "tiny.imatrix.gguf"), "rb").read()

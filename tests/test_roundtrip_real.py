"""Round trips on the real llama.cpp / gguf-py files: read, write back unchanged, compare byte for byte."""
from __future__ import annotations

import filecmp

import pytest

from gguftool.gguf.reader import GGUFReader
from gguftool.gguf.writer import GGUFWriter


def _rewrite(src, dst):
    with GGUFReader(src) as r:
        with GGUFWriter(dst, protect=[src]) as w:
            w.add_kvs(r.kvs)
            for t in r.tensors:
                w.add_tensor_info(t.name, t.shape, t.type)
            w.write_header()
            assert w.data_offset == r.data_offset
            assert [(t.name, t.offset) for t in w.tensor_infos] == [(t.name, t.offset) for t in r.tensors]
            for t in r.tensors:
                w.write_tensor_data(t.name, r.tensor_bytes(t))


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2_gguf", "gemma3_gguf"])
def test_roundtrip_byte_identical(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    dst = tmp_path / "out.gguf"
    _rewrite(src, dst)
    assert dst.stat().st_size == src.stat().st_size
    assert filecmp.cmp(src, dst, shallow=False)

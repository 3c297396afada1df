"""GGUFReader on hand-built files: parsing, typed values, tensor views, and validation errors naming offsets."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from gguftool.errors import FormatError
from gguftool.gguf.constants import GGMLType, GGUFValueType as VT
from gguftool.gguf.reader import GGUFReader


# --- a tiny hand-rolled encoder, independent of GGUFWriter
def s(x: bytes | str) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload: bytes) -> bytes:
    return s(key) + struct.pack("<i", vtype) + payload


def ti(name, shape, ttype, offset) -> bytes:
    return s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape) + \
        struct.pack("<iQ", ttype, offset)


def build(kvs=(), tis=(), data=b"", *, version=3, n_kv=None, n_t=None, align=32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tis) if n_t is None else n_t,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tis)
    head += bytes(-len(head) % align)
    return head + data


def err(buf) -> str:
    with pytest.raises(FormatError) as e:
        GGUFReader(buf)
    return str(e.value)


def test_minimal_file():
    buf = build([kv("a", VT.UINT32, struct.pack("<I", 7))], [ti("t", (4, 2), GGMLType.F32, 0)],
                np.arange(8, dtype=np.float32).tobytes())
    with GGUFReader(buf) as r:
        assert (r.version, r.alignment, r.file_size) == (3, 32, len(buf))
        assert r.get("a") == 7 and r.kvs[0].type == VT.UINT32
        t = r.tensor("t")
        assert (t.shape, t.type, t.offset, t.nbytes, t.n_elements) == ((4, 2), GGMLType.F32, 0, 32, 8)
        assert t.info_offset == 24 + len(kv("a", VT.UINT32, b"1234"))
        a = r.tensor_array(t)
        assert a.shape == (2, 4) and a.dtype == np.float32 and a[1, 3] == 7
        assert r.data_offset == len(buf) - 32


def test_block_type_view_and_no_copy(tmp_path):
    buf = build([], [ti("q", (64, 3), GGMLType.Q8_0, 0)], bytes(range(204)))
    p = tmp_path / "q.gguf"
    p.write_bytes(buf)
    with GGUFReader(p) as r:
        rows = r.tensor_array("q")
        assert rows.shape == (3, 68) and rows.dtype == np.uint8
        assert rows[1, 0] == 68
        raw = r.tensor_bytes("q")
        assert not raw.flags.owndata and not raw.flags.writeable
    assert rows[2, 67] == 203  # views outlive close()


def test_string_array_and_nested():
    strings = [b"a", b"", "é".encode(), b"\xff\xfe"]  # last one is invalid UTF-8, kept via surrogateescape
    arr = struct.pack("<iQ", VT.STRING, 4) + b"".join(s(x) for x in strings)
    nested = struct.pack("<iQ", VT.ARRAY, 2) + struct.pack("<iQ", VT.INT16, 2) + struct.pack("<hh", -1, 2) + \
        struct.pack("<iQ", VT.STRING, 1) + s("z")
    buf = build([kv("s", VT.ARRAY, arr), kv("n", VT.ARRAY, nested), kv("b", VT.BOOL, b"\x01")])
    with GGUFReader(buf) as r:
        assert r.get("s")[:3] == ["a", "", "é"]
        assert r.get("s")[3].encode("utf-8", "surrogateescape") == b"\xff\xfe"
        n = r.kvs[1].value
        assert n.element_type == VT.ARRAY and n.values[0].element_type == VT.INT16
        assert r.metadata["n"][0].tolist() == [-1, 2] and r.metadata["n"][1] == ["z"]
        assert r.get("b") is True


@pytest.mark.parametrize("buf, msg", [
    (b"", "at byte 0: magic needs 4 bytes"),
    (b"GGML" + bytes(20), "not a GGUF file"),
    (build(version=1), "GGUF version 1 is not supported"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian GGUF file"),
    (build(version=4), "unsupported GGUF version 4"),
    (build(n_kv=2**40), "KV count 1099511627776 is impossible"),
    (build(n_t=2**60), "tensor count 1152921504606846976 is impossible"),
    (build([struct.pack("<Q", 2**40) + b"x" * 20]), "at byte 24: key of KV pair 0 has length 1099511627776"),
    (build([kv("", VT.UINT8, b"\x00")]), "empty key"),
    (build([kv("k", VT.UINT8, b"\x00"), kv("k", VT.UINT8, b"\x00")]), "at byte 38: duplicate key 'k'"),
    (build([kv("k", 13, b"\x00" * 8)]), "at byte 33: key 'k' has unknown value type 13"),
    (build([kv("k", VT.ARRAY, struct.pack("<iQ", 99, 0))]), "unknown element type 99"),
    (build([kv("k", VT.ARRAY, struct.pack("<iQ", VT.UINT64, 2**61))]), "claims 2305843009213693952 UINT64"),
    (build([kv("k", VT.STRING, struct.pack("<Q", 2**63))]), "has length 9223372036854775808"),
    (build([kv("general.alignment", VT.UINT32, struct.pack("<I", 0))]), "is not a power of two"),
    (build([kv("general.alignment", VT.UINT32, struct.pack("<I", 48))]), "48 is not a power of two"),
    (build([kv("general.alignment", VT.INT32, struct.pack("<i", 32))]), "must be of type UINT32, not INT32"),
    (build([], [ti("t", (1,) * 5, 0, 0)]), "has 5 dimensions"),
    (build([], [ti("t", (1,), 4, 0)], bytes(32)), "unknown ggml type 4"),
    (build([], [ti("t", (16,), GGMLType.Q8_0, 0)], bytes(64)), "not a multiple of the block size 32"),
    (build([], [ti("t", (1,), 0, 0), ti("t", (1,), 0, 32)], bytes(64)), "duplicate tensor name 't'"),
    (build([], [ti("t", (1,), 0, 4)], bytes(64)), "data offset 4 is not a multiple of the alignment 32"),
    (build([], [ti("t", (100,), 0, 0)], bytes(64)), "extends past the end of the file"),
    (build([], [ti("t", (2**62,), 0, 0)], bytes(64)), "extends past the end of the file"),
    (build([], [ti("t", (16,), 0, 0), ti("u", (8,), 0, 32)], bytes(96)), "overlaps tensor 't'"),
    (build([], [ti("t", (1,), 0, 0)]), "extends past the end of the file"),
])
def test_errors(buf, msg):
    assert msg in err(buf)


def test_truncated_at_every_byte_is_format_error():
    arr = struct.pack("<iQ", VT.STRING, 2) + s("ab") + s("c")
    buf = build([kv("k", VT.UINT32, b"\x01\x00\x00\x00"), kv("s", VT.ARRAY, arr)],
                [ti("t", (8,), GGMLType.F32, 0)], bytes(32))
    GGUFReader(buf).close()
    for n in range(len(buf)):
        with pytest.raises(FormatError):
            GGUFReader(buf[:n])


def test_directory_and_missing_and_empty(tmp_path):
    assert "is a directory" in err(tmp_path)
    assert "no such file" in err(tmp_path / "nope.gguf")
    (tmp_path / "e.gguf").write_bytes(b"")
    assert "file is empty" in err(tmp_path / "e.gguf")

"""GGUFWriter: every value type, nested arrays, v2/v3, odd alignments, streaming chunks, temp-file safety."""
from __future__ import annotations

import os

import numpy as np
import pytest

from gguftool.errors import GGUFError
from gguftool.gguf.constants import GGMLType, GGUFValueType as VT
from gguftool.gguf.reader import GGUFReader
from gguftool.gguf.values import KV, GGUFArray
from gguftool.gguf.writer import GGUFWriter, encode_kv


def all_types_kvs():
    return [
        KV("t.u8", VT.UINT8, 255), KV("t.i8", VT.INT8, -128), KV("t.u16", VT.UINT16, 65535),
        KV("t.i16", VT.INT16, -32768), KV("t.u32", VT.UINT32, 4294967295), KV("t.i32", VT.INT32, -2147483648),
        KV("t.f32", VT.FLOAT32, 1.5), KV("t.bool", VT.BOOL, True), KV("t.str", VT.STRING, "héllo\n\x00"),
        KV("t.u64", VT.UINT64, 2**64 - 1), KV("t.i64", VT.INT64, -2**63), KV("t.f64", VT.FLOAT64, 0.1),
        KV("a.u8", VT.ARRAY, GGUFArray(VT.UINT8, np.array([1, 2, 3], np.uint8))),
        KV("a.i8", VT.ARRAY, GGUFArray(VT.INT8, np.array([-1, 2], np.int8))),
        KV("a.u16", VT.ARRAY, GGUFArray(VT.UINT16, [1, 65535])),
        KV("a.i16", VT.ARRAY, GGUFArray(VT.INT16, [-5])),
        KV("a.u32", VT.ARRAY, GGUFArray(VT.UINT32, [])),
        KV("a.i32", VT.ARRAY, GGUFArray(VT.INT32, np.arange(-3, 3, dtype=np.int32))),
        KV("a.f32", VT.ARRAY, GGUFArray(VT.FLOAT32, np.array([0.5, -1e30, np.inf], np.float32))),
        KV("a.bool", VT.ARRAY, GGUFArray(VT.BOOL, [True, False, True])),
        KV("a.str", VT.ARRAY, GGUFArray(VT.STRING, ["a", "", "ünï", "x" * 300])),
        KV("a.u64", VT.ARRAY, GGUFArray(VT.UINT64, [2**64 - 1])),
        KV("a.i64", VT.ARRAY, GGUFArray(VT.INT64, [-2**63, 7])),
        KV("a.f64", VT.ARRAY, GGUFArray(VT.FLOAT64, [1e300])),
        KV("a.nested", VT.ARRAY, GGUFArray(VT.ARRAY, [
            GGUFArray(VT.INT32, [1, 2]), GGUFArray(VT.STRING, ["p", "q"]),
            GGUFArray(VT.ARRAY, [GGUFArray(VT.FLOAT32, [3.0])]), GGUFArray(VT.UINT8, [])])),
    ]


def write_file(path, kvs, tensors=(), *, version=3, alignment=None, **kw):
    with GGUFWriter(path, version=version, alignment=alignment, **kw) as w:
        w.add_kvs(kvs)
        for name, shape, t, _ in tensors:
            w.add_tensor_info(name, shape, t)
        w.write_header()
        for name, _, _, data in tensors:
            w.write_tensor_data(name, data)
    return path


def small_tensors(seed=0):
    rng = np.random.default_rng(seed)
    return [
        ("a", (3,), GGMLType.F32, rng.standard_normal(3).astype(np.float32)),
        ("b", (32, 2), GGMLType.Q8_0, rng.integers(0, 256, 68, dtype=np.uint8)),
        ("c", (5, 1, 1), GGMLType.F16, np.arange(5, dtype=np.float16)),
        ("d", (), GGMLType.I32, np.array([7], np.int32)),
        ("e", (0, 4), GGMLType.F32, np.zeros(0, np.float32)),
    ]


def _same(a, b):
    if isinstance(a, GGUFArray):
        assert isinstance(b, GGUFArray) and a.element_type == b.element_type and len(a) == len(b)
        if a.element_type == VT.ARRAY:
            for x, y in zip(a.values, b.values):
                _same(x, y)
        elif a.element_type == VT.STRING:
            assert list(a.values) == list(b.values)
        else:
            assert np.array_equal(np.asarray(a.values), np.asarray(b.values))
    else:
        assert a == b


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("alignment", [None, 1, 8, 64, 256])
def test_all_value_types_round_trip(tmp_path, version, alignment):
    kvs = all_types_kvs()
    if alignment is not None:
        kvs = [KV("general.alignment", VT.UINT32, alignment)] + kvs
    p = write_file(tmp_path / "x.gguf", kvs, small_tensors(), version=version)
    with GGUFReader(p) as r:
        assert r.version == version
        assert r.alignment == (alignment or 32)
        assert r.data_offset % r.alignment == 0
        assert [kv.key for kv in r.kvs] == [kv.key for kv in kvs]
        for mine, theirs in zip(kvs, r.kvs):
            assert mine.type == theirs.type
            _same(mine.value, theirs.value)
        assert r.tensors[0].offset == 0
        for t, (name, shape, ttype, data) in zip(r.tensors, small_tensors()):
            assert (t.name, t.shape, t.type) == (name, shape, ttype)
            assert t.offset % r.alignment == 0
            assert r.tensor_bytes(t).tobytes() == np.asarray(data).tobytes()
        # rewrite: byte-identical
        q = tmp_path / "y.gguf"
        with GGUFWriter(q, version=r.version) as w:
            w.add_kvs(r.kvs)
            for t in r.tensors:
                w.add_tensor_info(t.name, t.shape, t.type)
            for t in r.tensors:
                w.write_tensor_data(t.name, r.tensor_bytes(t))
    assert q.read_bytes() == p.read_bytes()


def test_padding_is_zero_and_file_ends_aligned(tmp_path):
    p = write_file(tmp_path / "x.gguf", [KV("k", VT.STRING, "v")], small_tensors())
    raw = p.read_bytes()
    with GGUFReader(p) as r:
        assert raw[r.header_end:r.data_offset] == bytes(r.data_offset - r.header_end)
        t = r.tensors[0]
        end = r.data_offset + t.offset + t.nbytes
        assert raw[end:r.data_offset + r.tensors[1].offset] == bytes(r.data_offset + r.tensors[1].offset - end)
    assert len(raw) % 32 == 0


def test_alignment_argument_and_kv_conflict(tmp_path):
    with pytest.raises(GGUFError, match="contradicts"):
        GGUFWriter(tmp_path / "x.gguf", alignment=64).add_kv(KV("general.alignment", VT.UINT32, 32))
    with pytest.raises(GGUFError, match="power of two"):
        GGUFWriter(tmp_path / "x.gguf", alignment=48)
    with pytest.raises(GGUFError, match="must be UINT32"):
        GGUFWriter(tmp_path / "x.gguf").add_kv(KV("general.alignment", VT.INT32, 32))
    p = write_file(tmp_path / "x.gguf", [], [("a", (3,), GGMLType.F32, np.zeros(3, np.float32))], alignment=128)
    with GGUFReader(p) as r:
        # a non-default alignment is recorded in general.alignment, the only place readers learn it from
        assert r.alignment == 128 and r.get("general.alignment") == 128
        assert r.kv("general.alignment").type == VT.UINT32
        assert r.data_offset % 128 == 0


def test_chunked_iterable_data(tmp_path):
    data = np.arange(64, dtype=np.float32)
    p = tmp_path / "x.gguf"
    with GGUFWriter(p) as w:
        w.add_tensor_info("t", (16, 4), GGMLType.F32)
        w.write_header()
        w.write_tensor_data("t", (data[i:i + 16] for i in range(0, 64, 16)))
    with GGUFReader(p) as r:
        assert np.array_equal(r.tensor_array("t"), data.reshape(4, 16))


@pytest.mark.parametrize("n", [63 * 4, 65 * 4])
def test_wrong_size_is_refused_and_no_file_left(tmp_path, n):
    p = tmp_path / "x.gguf"
    with pytest.raises(GGUFError, match="'t'"):
        with GGUFWriter(p) as w:
            w.add_tensor_info("t", (16, 4), GGMLType.F32)
            w.write_tensor_data("t", bytes(n))
    assert os.listdir(tmp_path) == []


def test_out_of_order_and_missing(tmp_path):
    p = tmp_path / "x.gguf"
    with pytest.raises(GGUFError, match="out of order"):
        with GGUFWriter(p) as w:
            w.add_tensor_info("a", (1,), GGMLType.F32)
            w.add_tensor_info("b", (1,), GGMLType.F32)
            w.write_tensor_data("b", bytes(4))
    with pytest.raises(GGUFError, match="only 1 of 2 tensors"):
        with GGUFWriter(p) as w:
            w.add_tensor_info("a", (1,), GGMLType.F32)
            w.add_tensor_info("b", (1,), GGMLType.F32)
            w.write_tensor_data("a", bytes(4))
    assert os.listdir(tmp_path) == []


def test_keyboard_interrupt_leaves_nothing(tmp_path):
    p = tmp_path / "x.gguf"
    with pytest.raises(KeyboardInterrupt):
        with GGUFWriter(p) as w:
            w.add_tensor_info("a", (1,), GGMLType.F32)
            w.write_header()
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_existing_target_and_protect(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"old")
    with pytest.raises(GGUFError, match="already exists"):
        GGUFWriter(p)
    with pytest.raises(GGUFError, match="is the input file"):
        GGUFWriter(p, overwrite=True, protect=[tmp_path / "." / "x.gguf"])
    write_file(p, [KV("k", VT.UINT8, 1)], overwrite=True)
    with GGUFReader(p) as r:
        assert r.get("k") == 1


def test_duplicate_and_bad_declarations(tmp_path):
    w = GGUFWriter(tmp_path / "x.gguf")
    w.add_kv(KV("k", VT.UINT8, 1))
    with pytest.raises(GGUFError, match="duplicate metadata key 'k'"):
        w.add_kv(KV("k", VT.UINT8, 1))
    w.add_tensor_info("t", (32,), "q8_0")
    with pytest.raises(GGUFError, match="duplicate tensor name 't'"):
        w.add_tensor_info("t", (32,), "q8_0")
    with pytest.raises(GGUFError, match="not a multiple of the Q4_K block size 256"):
        w.add_tensor_info("u", (32,), "q4_k")
    with pytest.raises(GGUFError, match="5 dimensions"):
        w.add_tensor_info("v", (1, 1, 1, 1, 1), "f32")
    w.abort()


@pytest.mark.parametrize("kv", [KV("k", VT.UINT8, 256), KV("k", VT.INT32, 2**31), KV("k", VT.UINT32, -1),
                                KV("k", VT.INT32, "3"), KV("k", VT.STRING, 3),
                                KV("k", VT.ARRAY, GGUFArray(VT.UINT8, [300]))])
def test_values_that_do_not_fit(kv):
    with pytest.raises(GGUFError, match="'k'"):
        encode_kv(kv)


def test_explicit_offsets_with_gap(tmp_path):
    p = tmp_path / "x.gguf"
    with GGUFWriter(p) as w:
        w.add_tensor_info("a", (1,), GGMLType.F32, offset=64)
        w.add_tensor_info("b", (1,), GGMLType.F32, offset=128)
        w.write_tensor_data("a", np.float32([1]))
        w.write_tensor_data("b", np.float32([2]))
    with GGUFReader(p) as r:
        assert [t.offset for t in r.tensors] == [64, 128]
        assert r.tensor_array("b")[0] == 2


def test_invalid_utf8_strings_survive_round_trip(tmp_path):
    # invalid UTF-8 is read with surrogateescape and written back unchanged
    raw_str = b"ok\xff\xfe"
    s = raw_str.decode("utf-8", "surrogateescape")
    p = write_file(tmp_path / "x.gguf", [KV("s", VT.STRING, s), KV("a", VT.ARRAY, GGUFArray(VT.STRING, [s, "é"]))])
    assert raw_str in p.read_bytes()
    with GGUFReader(p) as r:
        assert r.get("s") == s and r.get("a") == [s, "é"]
        q = write_file(tmp_path / "y.gguf", r.kvs)
    assert q.read_bytes() == p.read_bytes()


_RANGES = {VT.UINT8: (0, 2**8), VT.INT8: (-2**7, 2**7), VT.UINT16: (0, 2**16), VT.INT16: (-2**15, 2**15),
           VT.UINT32: (0, 2**32), VT.INT32: (-2**31, 2**31), VT.UINT64: (0, 2**64), VT.INT64: (-2**63, 2**63)}


def _random_scalar(rng, t):
    if t in _RANGES:
        lo, hi = _RANGES[t]
        return lo + int(rng.integers(0, 2**62)) * (hi - lo) // 2**62
    if t == VT.FLOAT32:
        return float(np.float32(rng.standard_normal()))
    if t == VT.FLOAT64:
        return float(rng.standard_normal())
    if t == VT.BOOL:
        return bool(rng.integers(0, 2))
    return "".join(chr(int(c)) for c in rng.integers(32, 0x3000, int(rng.integers(0, 20))))


def _random_array(rng, depth):
    et = VT(int(rng.integers(0, 13)))
    if et == VT.ARRAY and depth >= 2:
        et = VT.STRING
    n = int(rng.integers(0, 6))
    if et == VT.ARRAY:
        return GGUFArray(et, [_random_array(rng, depth + 1) for _ in range(n)])
    return GGUFArray(et, [_random_scalar(rng, et) for _ in range(n)])


def _random_value(rng):
    t = VT(int(rng.integers(0, 13)))
    return t, (_random_array(rng, 0) if t == VT.ARRAY else _random_scalar(rng, t))


@pytest.mark.parametrize("seed", range(20))
def test_random_metadata_round_trip(tmp_path, seed):
    rng = np.random.default_rng(seed)
    kvs = []
    for i in range(int(rng.integers(1, 25))):
        t, v = _random_value(rng)
        kvs.append(KV(f"k{i}.{t.name.lower()}", t, v))
    types = [GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q6_K, GGMLType.IQ4_XS, GGMLType.TQ2_0]
    tensors = []
    for j in range(int(rng.integers(0, 6))):
        t = types[int(rng.integers(0, len(types)))]
        shape = (t.block_size * int(rng.integers(1, 3)),) + tuple(int(d) for d in rng.integers(1, 4, rng.integers(0, 4)))
        n = int(np.prod(shape))
        tensors.append((f"t{j}", shape, t, rng.integers(0, 256, t.nbytes(n), dtype=np.uint8)))
    align = int(2 ** rng.integers(0, 8))
    p = write_file(tmp_path / "x.gguf", [KV("general.alignment", VT.UINT32, align)] + kvs, tensors,
                   version=int(rng.choice([2, 3])))
    with GGUFReader(p) as r:
        assert r.alignment == align
        for mine, theirs in zip(kvs, r.kvs[1:]):
            assert mine.key == theirs.key and mine.type == theirs.type
            _same(mine.value, theirs.value)
        for (name, shape, t, data), info in zip(tensors, r.tensors):
            assert (info.name, info.shape, info.type) == (name, shape, t)
            assert r.tensor_bytes(info).tobytes() == data.tobytes()
        q = tmp_path / "y.gguf"
        with GGUFWriter(q, version=r.version) as w:
            w.add_kvs(r.kvs)
            for info in r.tensors:
                w.add_tensor_info(info.name, info.shape, info.type)
            for info in r.tensors:
                w.write_tensor_data(info.name, r.tensor_bytes(info))
    assert q.read_bytes() == p.read_bytes()


# --- write_behind: the same bytes, written by a background thread


def _mixed_tensors():
    rng = np.random.default_rng(1)
    big = rng.standard_normal(3 * 2**18).astype(np.float32)            # 3 MiB: several batches
    return small_tensors() + [
        ("big", (2**18, 3), GGMLType.F32, big),
        ("chunks", (256, 3 * 2**10), GGMLType.F32, (big[i:i + 2**16] for i in range(0, 3 * 2**18, 2**16))),
        ("tail", (7,), GGMLType.F32, np.arange(7, dtype=np.float32)),
    ]


def test_write_behind_writes_the_same_bytes(tmp_path):
    a = write_file(tmp_path / "a.gguf", all_types_kvs(), _mixed_tensors())
    b = write_file(tmp_path / "b.gguf", all_types_kvs(), _mixed_tensors(), write_behind=True)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.gguf", "b.gguf"]


def test_write_behind_error_is_raised_and_no_file_left(tmp_path, monkeypatch):
    from gguftool.gguf import write_behind

    def full(fd, bufs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write_behind.os, "writev", full)
    with pytest.raises(OSError, match="No space left"):
        write_file(tmp_path / "x.gguf", [], _mixed_tensors(), write_behind=True)
    assert os.listdir(tmp_path) == []

"""gguftool.hf.checkpoint: safetensors headers checked against the file, lazy BF16/F16/F32 reads, shard order."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gguftool.errors import ConvertError
from gguftool.hf.checkpoint import Checkpoint, SafetensorsFile, bf16_to_f32

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "fixtures" / "tiny-llama"


def write_st(path: Path, tensors: dict[str, tuple[str, np.ndarray]], header_extra: dict | None = None) -> None:
    header, blobs, off = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header.update(header_extra or {})
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_reads_each_dtype_exactly(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    words = (x.view(np.uint32) >> 16).astype(np.uint16)
    write_st(tmp_path / "model.safetensors", {"a": ("F32", x), "b": ("F16", x.astype(np.float16)),
                                              "c": ("BF16", words)})
    f = SafetensorsFile(tmp_path / "model.safetensors")
    assert np.array_equal(f.tensors["a"].read_f32(), x)
    assert np.array_equal(f.tensors["b"].read_f32(), x.astype(np.float16).astype(np.float32))
    assert np.array_equal(f.tensors["c"].read_f32(), bf16_to_f32(words))
    assert f.tensors["c"].read_f32().dtype == np.float32
    f.close()


def test_tiny_fixture_order_and_config():
    with Checkpoint.open(TINY / "model.safetensors") as ck:
        assert ck.config["architectures"] == ["LlamaForCausalLM"]
        names = list(ck.tensors)
        assert names == sorted(names)  # one shard: sorted by name, as gguf-py's SafetensorsLocal
        assert ck.dominant_dtype() == "BF16"
        assert ck.tensors["model.embed_tokens.weight"].shape == (512, 256)


def test_sharded_checkpoint_through_index(tmp_path):
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    write_st(tmp_path / "model-00002-of-00002.safetensors", {"z.weight": ("F32", a), "b.weight": ("F32", a)})
    write_st(tmp_path / "model-00001-of-00002.safetensors", {"y.weight": ("F32", a + 1)})
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "z.weight": "model-00002-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors",
        "y.weight": "model-00001-of-00002.safetensors"}}))
    with Checkpoint.open(tmp_path) as ck:
        # shard files sorted, then names sorted within each shard (llama.cpp's index_tensors order)
        assert list(ck.tensors) == ["y.weight", "b.weight", "z.weight"]
        assert np.array_equal(ck.tensors["y.weight"].read_f32(), a + 1)


def test_missing_shard_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ConvertError, match="shard file\\(s\\) missing: model-00001-of-00002.safetensors"):
        Checkpoint.open(tmp_path)


def test_missing_config(tmp_path):
    shutil.copy(TINY / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ConvertError, match="missing config.json"):
        Checkpoint.open(tmp_path / "model.safetensors")


@pytest.mark.parametrize("case, message", [
    ("short", "too short for the 8-byte header length"),
    ("huge_len", "header length .* exceeds the file size"),
    ("bad_json", "not valid JSON"),
    ("truncated_data", "data_offsets .* outside the .* data bytes"),
    ("bad_shape", "bad shape"),
    ("size_mismatch", "needs 32 bytes but data_offsets"),
    ("unknown_dtype", "unknown dtype 'Q4'"),
])
def test_corrupt_headers(tmp_path, case, message):
    p = tmp_path / "model.safetensors"
    a = np.zeros((2, 4), np.float32)
    write_st(p, {"w": ("F32", a)})
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if case == "short":
        p.write_bytes(raw[:5])
    elif case == "huge_len":
        p.write_bytes((10 ** 12).to_bytes(8, "little") + raw[8:])
    elif case == "bad_json":
        p.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    elif case == "truncated_data":
        p.write_bytes(raw[:-4])
    else:
        if case == "bad_shape":
            header["w"]["shape"] = [2, -4]
        elif case == "size_mismatch":
            header["w"]["shape"] = [2, 4]
            header["w"]["data_offsets"] = [0, 16]
        elif case == "unknown_dtype":
            header["w"]["dtype"] = "Q4"
        h = json.dumps(header).encode()
        p.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])
    with pytest.raises(ConvertError, match=message):
        SafetensorsFile(p)


def test_unsupported_dtype_parsed(tmp_path):
    """The header of an integer tensor is accepted (its byte length checked); converting it is refused later,
    naming it (tests/test_validation.py), since the converter drops some such tensors without reading them."""
    write_st(tmp_path / "model.safetensors", {"w": ("I64", np.zeros(3, np.int64))})
    t = SafetensorsFile(tmp_path / "model.safetensors").tensors["w"]
    assert (t.dtype, t.shape, t.nbytes) == ("I64", (3,), 24)


def test_reading_maps_instead_of_loading(tmp_path):
    """array() is a view of the memory map: no copy until a tensor is converted."""
    x = np.ones((64, 64), np.float32)
    write_st(tmp_path / "model.safetensors", {"w": ("F32", x)})
    f = SafetensorsFile(tmp_path / "model.safetensors")
    v = f.tensors["w"].array()
    assert not v.flags.owndata and not v.flags.writeable
    del v
    f.close()


def test_index_and_shards_must_agree(tmp_path):
    a = np.zeros((2, 4), np.float32)
    write_st(tmp_path / "model-00001-of-00001.safetensors", {"x.weight": ("F32", a)})
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x.weight": "model-00001-of-00001.safetensors", "y.weight": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(ConvertError, match="weight_map and shard files disagree: missing tensor\\(s\\) y.weight"):
        Checkpoint.open(tmp_path)

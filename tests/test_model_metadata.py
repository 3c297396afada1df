"""GGUF metadata read by the model and the tokenizer is checked before use: a bad value is an ImatrixError naming
the file, the key and the value, and a size the tensors do not back is refused before anything proportional to it
is allocated."""
from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from gguftool.errors import ImatrixError
from gguftool.gguf.constants import GGUFValueType as VT
from gguftool.gguf.values import KV, GGUFArray
from gguftool.model.config import ModelConfig
from gguftool.model.tokenizer import Tokenizer

from test_model_forward import write_model

BASE = {
    "general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
    "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.feed_forward_length": 96,
    "llama.attention.layer_norm_rms_epsilon": 1e-6,
}


def _config(**changes):
    meta = dict(BASE)
    for k, v in changes.items():
        key = "llama." + k.replace("__", ".")
        if v is None:
            meta.pop(key, None)
        else:
            meta[key] = v
    return ModelConfig.from_metadata(meta, origin="m.gguf")


def test_valid_metadata_reads():
    cfg = _config(attention__key_length=16, rope__dimension_count=16)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.rope_dims) == (2, 64, 4, 2, 16, 16)
    # per-layer arrays with one value for every layer are that value
    cfg = _config(attention__head_count_kv=GGUFArray(VT.UINT32, np.array([2, 2], dtype=np.uint32)))
    assert cfg.n_head_kv == 2


@pytest.mark.parametrize("changes,message", [
    ({"attention__head_count": 0}, "m.gguf: bad metadata: llama.attention.head_count = 0 (expected 1 .. 64)"),
    ({"rope__dimension_count": 999}, "llama.rope.dimension_count = 999 (expected 2 .. 16)"),
    ({"rope__dimension_count": 7}, "llama.rope.dimension_count = 7 (RoPE rotates pairs"),
    ({"rope__freq_base": 0.0}, "llama.rope.freq_base = 0.0 (expected a finite number > 0.0)"),
    ({"rope__freq_base": float("nan")}, "llama.rope.freq_base = nan"),
    ({"rope__freq_base": "fast"}, "llama.rope.freq_base = 'fast' (expected a number)"),
    ({"block_count": "abc"}, "llama.block_count = 'abc' (expected an integer)"),
    ({"block_count": True}, "llama.block_count = True (expected an integer)"),
    ({"block_count": 10_000_000}, "llama.block_count = 10000000 (expected 1 .. 1048576)"),
    ({"embedding_length": -5}, "llama.embedding_length = -5"),
    ({"feed_forward_length": 0}, "llama.feed_forward_length = 0"),
    ({"attention__layer_norm_rms_epsilon": [1, 2]}, "per-layer values of llama.attention.layer_norm_rms_epsilon"),
    ({"attention__layer_norm_rms_epsilon": ["x"]}, "expected a number or an array of numbers"),
    ({"attention__layer_norm_rms_epsilon": []}, "expected a number or an array of numbers"),
    ({"attention__head_count": 3, "attention__head_count_kv": 1},
     "llama.embedding_length = 64 is not a multiple of llama.attention.head_count = 3"),
    ({"attention__head_count_kv": 3}, "llama.attention.head_count = 4 is not a multiple of "
                                      "llama.attention.head_count_kv = 3"),
    ({"attention__head_count_kv": 8}, "llama.attention.head_count_kv = 8 (expected 1 .. 4)"),
    ({"attention__key_length": 0}, "llama.attention.key_length = 0"),
    ({"context_length": -1}, "llama.context_length = -1"),
    ({"rope__scaling__type": "yarn", "rope__scaling__factor": 4.0, "rope__scaling__original_context_length": 64,
      "rope__freq_base": 1.0}, "llama.rope.freq_base = 1.0 (YaRN needs a base other than 1)"),
    ({"rope__scaling__type": 3}, "llama.rope.scaling.type = 3 (expected a string)"),
    ({"rope__scaling__factor": -2.0, "rope__scaling__type": "linear"}, "llama.rope.scaling.factor = -2.0"),
    ({"expert_count": 4, "expert_used_count": 9}, "llama.expert_used_count = 9 (4 experts)"),
    ({"attention__layer_norm_rms_epsilon": None}, "missing the metadata key llama.attention.layer_norm_rms_epsilon"),
])
def test_bad_metadata_is_named(changes, message):
    with pytest.raises(ImatrixError) as e:
        _config(**changes)
    assert message in str(e.value)
    # a wrong value is named with its file; what is missing or unsupported is about "the model"
    assert str(e.value).startswith("m.gguf: bad metadata: ") != ("missing" in message or "per-layer" in message)


def test_architecture_must_be_a_string():
    with pytest.raises(ImatrixError, match=r"general.architecture = \['llama'\]"):
        ModelConfig.from_metadata({**BASE, "general.architecture": ["llama"]})


# --- sizes against the tensors present


def _source_with(tmp_path, **kvs):
    from gguftool.gguf.source import open_gguf_source
    path = write_model(tmp_path / "m.gguf", "llama", np.random.default_rng(1))
    src = open_gguf_source(str(path))
    for key, (vtype, value) in kvs.items():
        src.kvs = [kv for kv in src.kvs if kv.key != key] + [KV(key, vtype, value)]
    return src, str(path)


@pytest.mark.parametrize("key,vtype,value,message", [
    ("llama.block_count", VT.UINT32, 1_000_000, "llama.block_count = 1000000, but the tensors are those of 2 layers"),
    ("llama.block_count", VT.UINT32, 1, "llama.block_count = 1, but the tensors are those of 2 layers"),
    ("llama.vocab_size", VT.UINT32, 20_000_000, "llama.vocab_size = 20000000, but token_embd.weight has 259 rows"),
    ("llama.embedding_length", VT.UINT32, 1 << 20, "tensor token_embd.weight has shape (64, 259), expected (1048576, "),
    ("llama.feed_forward_length", VT.UINT32, 1 << 20, "tensor blk.0.ffn_gate.weight has shape (64, 96)"),
    ("llama.attention.key_length", VT.UINT32, 32, "tensor blk.0.attn_q.weight has shape (64, 64), expected (64, 128)"),
])
def test_sizes_checked_against_tensors_before_allocating(tmp_path, key, vtype, value, message):
    from gguftool.model.forward import Model
    src, path = _source_with(tmp_path, **{key: (vtype, value)})
    try:
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(ImatrixError) as e:
            Model.from_source(src, origin=path)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        src.close()
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    assert seconds < 2 and peak < 300 << 20, (seconds, peak)


def test_rope_factor_tensor_length_is_checked(tmp_path):
    from gguftool.model.forward import Model
    from gguftool.pipeline.source import SourceTensor
    src, path = _source_with(tmp_path)
    try:
        emb = next(t for t in src.tensors if t.name == "output_norm.weight")   # 64 values, not head_dim / 2

        class Renamed(SourceTensor):
            name, shape, type = "rope_freqs.weight", emb.shape, emb.type

            def read_f32(self):
                return emb.read_f32()

            def read_raw(self):
                return emb.read_raw()

        src.tensors = src.tensors + [Renamed()]
        with pytest.raises(ImatrixError, match=r"tensor rope_freqs.weight has shape \(64,\), expected \(8,\)"):
            Model.from_source(src, origin=path)
    finally:
        src.close()


# --- tokenizer metadata


def _tok_meta(**changes):
    tokens = ["<unk>", "<s>", "</s>", "a", "b"]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [0.0] * 5,
            "tokenizer.ggml.token_type": [2, 3, 3, 1, 1]}
    meta.update({"tokenizer.ggml." + k: v for k, v in changes.items()})
    return meta


def test_valid_tokenizer_metadata():
    tok = Tokenizer.from_metadata(_tok_meta(bos_token_id=1, add_bos_token=True), origin="m.gguf")
    assert tok.bos_id == 1 and tok.add_bos and tok.n_vocab == 5


@pytest.mark.parametrize("changes,message", [
    ({"model": 5}, "tokenizer.ggml.model = 5 (expected a string)"),
    ({"tokens": [1, 2, 3]}, "tokenizer.ggml.tokens = [1, 2, 3] (3 values) (expected an array of strings)"),
    ({"tokens": "abc"}, "tokenizer.ggml.tokens = 'abc' (expected an array)"),
    ({"scores": [0.0, 1.0]}, "tokenizer.ggml.scores has 2 values, expected 5 (one per token)"),
    ({"scores": ["x"] * 5}, "(expected an array of finite numbers)"),
    ({"scores": [0.0, float("inf"), 0.0, 0.0, 0.0]}, "(expected an array of finite numbers)"),
    ({"token_type": [1, 1, 9, 1, 1]}, "tokenizer.ggml.token_type[2] = 9 (token types are 0 .. 6)"),
    ({"token_type": [1.5] * 5}, "(expected an array of integers)"),
    ({"token_type": [[1]] * 5}, "(expected an array of integers)"),
    ({"bos_token_id": "x"}, "tokenizer.ggml.bos_token_id = 'x' (expected an integer)"),
    ({"add_bos_token": "yes"}, "tokenizer.ggml.add_bos_token = 'yes' (expected a boolean)"),
    ({"pre": 3}, "tokenizer.ggml.pre = 3 (expected a string)"),
    ({"model": "gpt2", "pre": "gpt-2", "merges": ["a b", "ab"]}, "tokenizer.ggml.merges[1] = 'ab' (expected two "
                                                                 "token texts separated by a space)"),
    ({"model": "gpt2", "pre": "gpt-2", "merges": [1]}, "tokenizer.ggml.merges = [1] (1 values)"),
])
def test_bad_tokenizer_metadata_is_named(changes, message):
    with pytest.raises(ImatrixError) as e:
        Tokenizer.from_metadata(_tok_meta(**changes), origin="m.gguf")
    assert str(e.value).startswith("m.gguf: ") and message in str(e.value), str(e.value)

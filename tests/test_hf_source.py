"""gguftool.hf: architecture tables, tokenizer metadata and the HF TensorSource against llama.cpp's converter.

fixtures/convert_reference/*.json hold what convert_hf_to_gguf.py wrote for the same checkpoints (see the README
there); here the in-memory source (no file written) is compared with the "convert" part of those files.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gguftool.errors import ConvertError
from gguftool.hf import archs as A
from gguftool.hf.source import open_hf_source, size_label
from gguftool.hf.vocab import SpecialVocab, does_token_look_special, vocab_kvs

from conftest import CONVERT_REF as REF, TINY_LLAMA as TINY
from make_convert_reference import _plain, array_digest

DESCRIPTIVE_EXCEPT = {"general.architecture", "general.type", "general.file_type", "general.quantization_version"}


def source_digest(src) -> dict:
    kvs = []
    for kv in src.kvs:
        if kv.type.name == "ARRAY":
            vals = list(kv.value.values)
            kvs.append([kv.key, f"ARRAY[{kv.value.element_type.name}]", {"len": len(vals), "sha256": array_digest(vals)}])
        else:
            kvs.append([kv.key, kv.type.name, _plain(kv.value if kv.type.name != "FLOAT32" else np.float32(kv.value))])
    tensors = [[t.name, t.type.name, [int(x) for x in t.shape], hashlib.sha256(t.read_raw().tobytes()).hexdigest()]
               for t in src.tensors]
    return {"kv": kvs, "tensors": tensors}


def strip_descriptive(kvs):
    return [kv for kv in kvs if not kv[0].startswith("general.") or kv[0] in DESCRIPTIVE_EXCEPT]


def test_tiny_fixture_matches_llama_cpp_converter():
    ref = json.loads((REF / "tiny-llama.json").read_text())
    assert ref["outtype"] == "bf16"
    src = open_hf_source(TINY / "model.safetensors")
    try:
        mine = source_digest(src)
    finally:
        src.close()
    assert strip_descriptive(mine["kv"]) == strip_descriptive(ref["convert"]["kv"])
    assert mine["tensors"] == ref["convert"]["tensors"]
    assert len(mine["tensors"]) == 21


def test_tiny_fixture_f32_transforms_are_lossless():
    """The f32 view of a BF16 checkpoint is exact, and Q/K are permuted (involution check via inverse)."""
    src = open_hf_source(TINY, outtype="f32")
    try:
        by = {t.name: t for t in src.tensors}
        q = by["blk.0.attn_q.weight"]
        raw = q.st.read_f32()
        got = q.read_f32()
        n_head = 4
        inv = got.reshape(n_head, raw.shape[0] // n_head // 2, 2, -1).swapaxes(1, 2).reshape(raw.shape)
        assert np.array_equal(inv, raw)
        assert not np.array_equal(got, raw)
        k = by["blk.0.attn_k.weight"]  # 2 kv heads: permuted with the kv head count
        rk = k.st.read_f32()
        assert np.array_equal(k.read_f32().reshape(2, 32, 2, -1).swapaxes(1, 2).reshape(rk.shape), rk)
        e = by["token_embd.weight"]
        assert np.array_equal(e.read_rows(5, 9), e.read_f32()[5:9])
        assert [t.type.name for t in src.tensors if t.name.endswith("norm.weight")] == ["F32"] * 5
    finally:
        src.close()


def test_tensor_names_match_gguf_py_mapping():
    gguf = pytest.importorskip("gguf", reason="gguf-py holds llama.cpp's tensor name tables")
    archs = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
             "gemma3": gguf.MODEL_ARCH.GEMMA3}
    for arch in (A.LLAMA, A.QWEN2, A.QWEN3, A.GEMMA3):
        m = gguf.get_tensor_name_map(archs[arch.gguf_arch], 3)
        for hf in arch.tensors:
            for suffix in (".weight", ".bias"):
                name = hf.format(bid=2) + suffix
                assert arch.map_name(name) == m.get_name(name, try_suffixes=(".weight", ".bias")), name


def test_unsupported_architecture_lists_supported():
    with pytest.raises(ConvertError, match="unsupported architecture 'GPT2LMHeadModel'; supported: "
                                           "DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, "
                                           "Gemma2ForCausalLM, Gemma3ForCausalLM, GptOssForCausalLM, LLaMAForCausalLM, "
                                           "LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Phi3ForCausalLM, "
                                           "Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM$"):
        A.arch_for_config({"architectures": ["GPT2LMHeadModel"]})


def test_moe_config_keys_as_transformers_presents_them():
    # Qwen3-MoE's config class stores num_experts as num_local_experts; its defaults fill the rest
    hp = A.normalized_config(A.QWEN3MOE, {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 256,
                                          "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 1000,
                                          "num_experts": 12})
    assert hp["num_local_experts"] == 12 and "num_experts" not in hp
    assert (hp["num_experts_per_tok"], hp["moe_intermediate_size"], hp["num_key_value_heads"]) == (8, 768, 4)
    assert "head_dim" not in hp   # Qwen3MoeConfig has none: no attention.key_length is written


def test_config_defaults_as_transformers_fills_them():
    hp = A.normalized_config(A.QWEN3, {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 256,
                                       "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 1000})
    assert hp["head_dim"] == 128 and hp["num_key_value_heads"] == 32 and hp["max_position_embeddings"] == 32768
    assert hp["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    hp = A.normalized_config(A.GEMMA3, {"architectures": ["Gemma3ForCausalLM"], "hidden_size": 256,
                                        "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 1000,
                                        "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                        "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert hp["rope_parameters"]["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    kv = {k.key: k.value for k in A.hyperparameters(A.GEMMA3, hp)}
    assert kv["gemma3.rope.scaling.type"] == "linear" and kv["gemma3.rope.freq_base_swa"] == 1e4
    assert kv["gemma3.attention.sliding_window"] == 4096


def test_llama3_rope_freqs_match_torch_formula():
    hp = A.normalized_config(A.LLAMA, {"architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
                                       "num_attention_heads": 32, "num_hidden_layers": 2, "vocab_size": 1000,
                                       "rope_theta": 500000.0, "rope_scaling": {
                                           "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                           "original_max_position_embeddings": 8192, "rope_type": "llama3"}})
    f = A.llama3_rope_freqs(hp)
    assert f.dtype == np.float32 and f.shape == (32,)
    assert f[0] == 1.0 and f[-1] == 32.0
    assert np.all(np.diff(f) >= 0)
    # The exact bytes are proven against llama.cpp's converter (torch float32 formula) by the llama3-rope
    # variant's reference hashes in test_hf_archs; here the shape of the ramp between the two wavelengths.
    assert np.count_nonzero((f > 1.0) & (f < 32.0)) == 3


def test_special_vocab_from_config_and_tokenizer_config(tmp_path):
    for name in ("tokenizer.model", "tokenizer_config.json", "config.json"):
        shutil.copy(TINY / name, tmp_path / name)
    sv = SpecialVocab(tmp_path, n_vocab=512)
    # no tokenizer.json: ids come from config.json, add_* flags and the template from tokenizer_config.json
    assert sv.ids == {"bos": 1, "eos": 2}
    assert sv.add == {"bos": True, "eos": False}
    assert sv.chat_template.startswith("{{ bos_token }}")
    (tmp_path / "chat_template.jinja").write_text("T")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert SpecialVocab(tmp_path).chat_template == "T"


def test_does_token_look_special():
    assert does_token_look_special("<|im_start|>") and does_token_look_special("<unused12>")
    assert not does_token_look_special("<s>") and not does_token_look_special("hello")


def test_missing_tokenizer(tmp_path):
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    with pytest.raises(ConvertError, match="no tokenizer found \\(expected tokenizer.model or tokenizer.json\\)"):
        vocab_kvs("llama", tmp_path, {"vocab_size": 512})


def test_size_label_matches_gguf_py():
    assert [size_label(n) for n in (1_441_024, 134_515_008, 7_241_732_096, 999)] == ["1.4M", "135M", "7.2B",
                                                                                     "1.0K"]


def _copy_tiny(tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    shutil.copytree(TINY, d)
    return d


def test_shape_mismatch_with_config(tmp_path):
    d = _copy_tiny(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 768
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="tensor 'model.layers.0.mlp.down_proj.weight' has shape \\[256, 512\\] "
                                           "but config.json implies \\[256, 768\\]"):
        open_hf_source(d)


def test_missing_layer_tensors(tmp_path):
    d = _copy_tiny(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="checkpoint is missing tensor\\(s\\) blk.2.attn_norm.weight"):
        open_hf_source(d)


def _byte_level_chars() -> list[str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def test_bpe_tokenizer_json_unknown_pre_tokenizer(tmp_path):
    """A GPT-2 style tokenizer.json whose check hash llama.cpp does not know: warning naming it, 'default'."""
    chars = _byte_level_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [["Ġ", "t"], ["h", "e"], ["Ġt", "he"]]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tj = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [{"id": vocab["<|endoftext|>"], "content": "<|endoftext|>", "single_word": False,
                            "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
          "normalizer": None,
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
          "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                    "merges": merges}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                                "add_prefix_space": False}))
    kvs, info = vocab_kvs("llama", tmp_path, {"vocab_size": len(vocab) + 2})
    kv = {k.key: k for k in kvs}
    assert info.pre == "default" and kv["tokenizer.ggml.pre"].value == "default"
    assert any("BPE pre-tokenizer not recognized (check hash " in w for w in info.warnings)
    assert kv["tokenizer.ggml.model"].value == "gpt2"
    assert list(kv["tokenizer.ggml.merges"].value.values) == ["Ġ t", "h e", "Ġt he"]
    toks = kv["tokenizer.ggml.tokens"].value.values
    types = kv["tokenizer.ggml.token_type"].value.values
    assert toks[-2:] == ["[PAD260]", "[PAD261]"] and list(types[-3:]) == [3, 5, 5]
    assert kv["tokenizer.ggml.eos_token_id"].value == 259
    # ByteLevel post-processor: add_bos/add_eos false; add_prefix_space from tokenizer_config comes first
    assert kv["tokenizer.ggml.add_bos_token"].value is False
    assert [k.key for k in kvs][0] == "tokenizer.ggml.add_space_prefix"

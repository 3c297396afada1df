"""The model hyperparameters the forward pass needs, read from GGUF metadata (llama.cpp's ``llama_hparams``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .metadata import Metadata, MetadataReader
from . import gptoss
from .mla import MLAConfig, mla_config
from .ops import yarn_corr_dims

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3", "deepseek2",
                   "gpt-oss")
QK_NORM_ARCHS = ("qwen3", "qwen3moe", "gemma3")
GEMMA_ARCHS = ("gemma2", "gemma3")   # scaled embeddings, post norms, GELU, Q pre-scaled
_MAX_INT = 2**31 - 1                 # context lengths, vocabulary size, enum values: int32 in llama.cpp


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
    rope_freq_scale_swa: float = 1.0   # the sliding-window layers' RoPE scale (gemma: none; gpt-oss: the model's)
    yarn_corr_swa: tuple | None = None  # YaRN on the sliding-window layers (gpt-oss), their correction dimensions
    attn_scale: float = 0.0   # 0: 1/sqrt(head_dim)
    n_swa: int = 0            # sliding window (gemma2/3, gpt-oss), 0: none
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
    mla: MLAConfig | None = None        # deepseek2: multi-head latent attention and DeepSeek routing (model.mla)

    @classmethod
    def from_metadata(cls, meta: Metadata, n_vocab: int | None = None, *, origin: str = "") -> "ModelConfig":
        """From GGUF metadata (``meta.get(key, default)``, a TensorSource works). Every value is checked for type
        and range first; errors (ImatrixError) name ``origin`` (the file), the key and the value. The sizes are
        checked against the tensors by ``Model``."""
        md = MetadataReader(meta, origin)
        arch = md.get_str("general.architecture")
        if arch is None:
            md.fail("the model has no general.architecture key")
        if arch not in SUPPORTED_ARCHS:
            md.fail(f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
        a = arch + "."
        n_layer = md.get_int(a + "block_count", lo=1, required=True)
        n_embd = md.get_int(a + "embedding_length", lo=1, required=True)
        n_head = md.get_int(a + "attention.head_count", lo=1, hi=n_embd, required=True)
        n_head_kv = md.get_int(a + "attention.head_count_kv", n_head, lo=1, hi=n_head)
        if n_head % n_head_kv:
            md.invalid(f"{a}attention.head_count = {n_head} is not a multiple of "
                    f"{a}attention.head_count_kv = {n_head_kv}")
        if not md.has(a + "attention.key_length") and n_embd % n_head:
            md.invalid(f"{a}embedding_length = {n_embd} is not a multiple of "
                       f"{a}attention.head_count = {n_head} (and there is no {a}attention.key_length)")
        head_dim = md.get_int(a + "attention.key_length", n_embd // n_head, lo=1)
        head_dim_v = md.get_int(a + "attention.value_length", head_dim, lo=1)
        n_expert = md.get_int(a + "expert_count", 0)
        n_ff = md.get_int(a + "feed_forward_length", 0, lo=0 if n_expert else 1, required=not n_expert)
        eps = md.get_float(a + "attention.layer_norm_rms_epsilon", hi=1.0, required=True)
        rope_dims = md.get_int(a + "rope.dimension_count", head_dim, lo=2, hi=head_dim)
        if rope_dims % 2:
            md.bad(a + "rope.dimension_count", rope_dims, "RoPE rotates pairs: expected an even number")
        base = md.get_float(a + "rope.freq_base", 10000.0, lo_open=True)
        scaling = md.get_str(a + "rope.scaling.type")
        factor = md.get_float(a + "rope.scaling.factor")
        freq_scale = 1.0
        if scaling in (None, "none"):
            scale_linear = md.get_float(a + "rope.scale_linear")
            if scaling is None and scale_linear:
                freq_scale = 1.0 / scale_linear
        elif scaling == "linear":
            if factor:
                freq_scale = 1.0 / factor
        elif scaling == "yarn":
            if not factor:
                md.fail(f"YaRN scaling without {a}rope.scaling.factor")
            if base == 1.0:
                md.bad(a + "rope.freq_base", base, "YaRN needs a base other than 1")
            freq_scale = float(np.float32(1.0) / np.float32(factor))
        else:
            md.fail(f"unsupported RoPE scaling {scaling!r} ({a}rope.scaling.type)")
        neox = arch in ("qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3", "gpt-oss")
        n_vocab = n_vocab or md.get_int(a + "vocab_size", 0, hi=_MAX_INT)
        cfg = cls(arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
                  head_dim_v=head_dim_v, n_ff=n_ff, n_vocab=int(n_vocab),
                  rms_eps=eps, rope_dims=rope_dims, rope_neox=neox, rope_base=base, rope_freq_scale=freq_scale)
        if arch in GEMMA_ARCHS:
            # sliding-window layers: gemma3 5 of every 6 (own rope base), gemma2 every other one (same base)
            n_swa = md.get_int(a + "attention.sliding_window", 4096 if arch == "gemma2" else 0, hi=_MAX_INT)
            if n_swa > 0:
                cfg.n_swa = n_swa
                pattern = 6 if arch == "gemma3" else 2
                cfg.swa_layers = [il % pattern < pattern - 1 for il in range(n_layer)]
                cfg.rope_base_swa = md.get_float(a + "rope.freq_base_swa", 10000.0 if arch == "gemma3" else base,
                                                 lo_open=True)
            cfg.final_softcap = md.get_float(a + "final_logit_softcapping", 0.0)
            if arch == "gemma2":
                cfg.attn_softcap = md.get_float(a + "attn_logit_softcapping", 0.0)
            if n_layer == (62 if arch == "gemma3" else 46):   # the 27B models scale by the model width per head
                cfg.attn_scale = 1.0 / math.sqrt(float(n_embd // n_head))
            else:
                cfg.attn_scale = float(np.float32(1.0) / np.sqrt(np.float32(head_dim)))
        cfg.rope_attn_factor = md.get_float(a + "rope.scaling.attn_factor", 1.0) or 1.0
        cfg.rope_orig_ctx = (md.get_int(a + "rope.scaling.original_context_length", 0, hi=_MAX_INT)
                             or md.get_int(a + "context_length", 0, hi=_MAX_INT))
        if scaling == "yarn":
            # llama_context: yarn_attn_factor = get_mscale(factor) / (1 + 0.1 ln factor) * rope_attn_factor
            f32 = np.float32
            fac = f32(1) / f32(freq_scale)
            mscale = f32(0.1) * np.log(fac) + f32(1) if fac > 1 else f32(1)
            cfg.rope_attn_factor = float(mscale * (f32(1) / (f32(1) + f32(0.1) * np.log(fac)))
                                         * f32(cfg.rope_attn_factor))
            if not cfg.rope_orig_ctx:
                md.fail(f"YaRN scaling without {a}rope.scaling.original_context_length")
            cfg.yarn_corr = yarn_corr_dims(rope_dims, cfg.rope_orig_ctx, base)
        if arch == "deepseek2":
            cfg.mla = mla_config(md, cfg)
            return cfg
        if arch == gptoss.ARCH:
            gptoss.configure(md, cfg)
            return cfg
        if n_expert:
            cfg.n_expert = n_expert
            cfg.n_expert_used = md.get_int(a + "expert_used_count", 0)
            if not 0 < cfg.n_expert_used <= n_expert:
                md.invalid(f"{a}expert_used_count = {cfg.n_expert_used} ({n_expert} experts)")
            cfg.n_ff_exp = md.get_int(a + "expert_feed_forward_length", 0) or n_ff
            if cfg.n_ff_exp <= 0:
                md.fail(f"the model is missing the metadata key {a}expert_feed_forward_length")
            gating = md.get_int(a + "expert_gating_func", 1, hi=_MAX_INT)
            if gating != 1:
                md.fail(f"unsupported expert gating function {gating} ({a}expert_gating_func; only softmax)")
            if md.get_int(a + "expert_group_count", 0, hi=_MAX_INT) > 1:
                md.fail(f"grouped expert selection ({a}expert_group_count) is not supported")
            if (md.get_int(a + "expert_shared_count", 0, hi=_MAX_INT)
                    or md.get_int(a + "expert_shared_feed_forward_length", hi=_MAX_INT)):
                md.fail("shared experts are not supported")
            cfg.expert_weights_scale = md.get_float(a + "expert_weights_scale", 0.0)
        elif arch == "qwen3moe":
            md.fail("the model is missing the metadata key qwen3moe.expert_count")
        return cfg

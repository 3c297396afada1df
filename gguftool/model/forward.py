"""A float32 numpy forward pass of llama-family decoders, the same computation llama.cpp's CPU graph does.

Used by ``gguftool imatrix``: every matrix multiplication reports its input to a hook before it runs, so the
importance matrix can accumulate the per-column sums of squares llama-imatrix collects.

Architectures: ``llama`` (and ``mistral``), ``qwen2`` (Q/K/V biases), ``qwen3`` (per-head Q/K RMSNorm),
``gemma3`` (scaled embeddings, pre/post norms, GELU gate, alternating sliding-window / global layers), ``gemma2``
(the same without Q/K norms, every other layer sliding, attention scores soft-capped), ``phi3`` (fused QKV and
gate|up weights, LongRoPE factors and attention factor), and the
mixture-of-experts FFN of ``llama`` (Mixtral) and ``qwen3moe``: softmax router, top-k experts, renormalized
weights (build_moe_ffn); the experts' inputs go to ``hook.experts`` as llama-imatrix collects MUL_MAT_ID inputs.

Numerics follow ggml's CPU kernels where it matters for agreement with llama-imatrix:
- RMSNorm sums squares in double and scales by ``1/sqrtf(mean + eps)`` in float (ggml_compute_forward_rms_norm_f32);
- RoPE angles are built in float by repeated multiplication with ``powf(base, -2/n_dims)``
  (ggml_rope_cache_init), "normal" mode rotates adjacent pairs (llama), NEOX mode the two halves (qwen, gemma);
- the KV cache holds K and V as float16 (llama.cpp's default cache type), so K (after RoPE) and V are rounded to
  float16 before attention (``kv_f16``); Q stays float32 as in ggml's tiled flash-attention kernel;
- gemma's GELU goes through ggml's float16 lookup table (input and output rounded to float16).
Matrix products are float32 BLAS (numpy), threads set with ``set_num_threads``.
"""
from __future__ import annotations

import ctypes
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import ImatrixError
from .weights import WeightStore

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3")
_QK_NORM_ARCHS = ("qwen3", "qwen3moe", "gemma3")
_GEMMA_ARCHS = ("gemma2", "gemma3")   # scaled embeddings, post norms, GELU, Q pre-scaled

# hook(weight_names, x): x is the (n_tokens, n_in) float32 input of a matmul by each of the named weights
Hook = Callable[[Sequence[str], np.ndarray], None]


# --- BLAS threads
def set_num_threads(n: int) -> bool:
    """Set the thread count of the BLAS library numpy uses (OpenBLAS or MKL). True when it could be set."""
    names = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads_64_",
             "scipy_openblas_set_num_threads", "openblas_set_num_threads64_", "openblas_set_num_threads",
             "MKL_Set_Num_Threads")
    libs = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if "/" in line else ""
                if path.endswith(".so") or ".so." in path:
                    low = path.lower()
                    if "blas" in low or "mkl" in low:
                        libs.add(path)
    except OSError:
        return False
    done = False
    for path in sorted(libs):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(int(n))
                done = True
                break
    return done


# --- configuration
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
        if arch in _GEMMA_ARCHS:
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


# --- numerics
def rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    """ggml_rms_norm (double sum of squares, float scale) followed by the weight multiply."""
    x64 = x.astype(np.float64)
    mean = (np.einsum("...i,...i->...", x64, x64) / x.shape[-1]).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
    y = x * scale[..., None]
    if w is not None:
        y *= w
    return y


def yarn_corr_dims(n_dims: int, n_ctx_orig: int, base: float, beta_fast: float = 32.0,
                   beta_slow: float = 1.0) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims: the dimensions between which YaRN blends interpolation into extrapolation."""
    f32 = np.float32

    def corr_dim(n_rot):
        return f32(n_dims) * np.log(f32(n_ctx_orig) / (f32(n_rot) * f32(2) * f32(math.pi))) / (f32(2) * np.log(f32(base)))

    start, end = np.floor(corr_dim(beta_fast)), np.ceil(corr_dim(beta_slow))
    return float(max(f32(0), start)), float(min(f32(n_dims - 1), end))


def rope_cache(n_pos: int, n_dims: int, base: float, freq_scale: float,
               freq_factors: np.ndarray | None = None, mscale: float = 1.0,
               yarn_corr: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (n_pos, n_dims/2) built as ggml_rope_cache_init does (float32 angle recurrence; angles
    divided by the per-dimension ``freq_factors``; cos and sin multiplied by ``mscale``, the attention factor).
    ``yarn_corr``: YaRN (ext_factor 1) with these correction dimensions: per dimension a ramp blends the
    interpolated angle into the extrapolated one, and the magnitude gets 1 + 0.1 ln(1/freq_scale) (rope_yarn)."""
    theta_scale = np.float32(math.pow(np.float32(base), -2.0 / n_dims))
    half = n_dims // 2
    theta = np.empty((n_pos, half), dtype=np.float32)
    theta[:, 0] = np.arange(n_pos, dtype=np.float32)
    for i in range(1, half):
        theta[:, i] = theta[:, i - 1] * theta_scale
    if freq_factors is not None:
        theta = theta / freq_factors[:half].astype(np.float32)
    extrap = theta
    theta = theta * np.float32(freq_scale)
    mscale = np.float32(mscale)
    if yarn_corr is not None:
        low, high = (np.float32(v) for v in yarn_corr)
        y = (np.arange(half, dtype=np.float32) - low) / max(np.float32(0.001), high - low)
        ramp = (np.float32(1) - np.minimum(np.float32(1), np.maximum(np.float32(0), y))).astype(np.float32)
        theta = theta * (np.float32(1) - ramp) + extrap * ramp
        mscale = mscale * (np.float32(1) + np.float32(0.1) * np.log(np.float32(1) / np.float32(freq_scale)))
    t64 = theta.astype(np.float64)
    c, s_ = np.cos(t64).astype(np.float32), np.sin(t64).astype(np.float32)
    if mscale != 1.0:
        c, s_ = c * mscale, s_ * mscale
    return c, s_


def apply_rope(x: np.ndarray, c: np.ndarray, s: np.ndarray, n_dims: int, neox: bool) -> np.ndarray:
    """x: (..., H, D); c/s: cos/sin broadcastable to (..., H, n_dims/2). Rotates the first n_dims of each head."""
    out = x.copy()
    if neox:
        half = n_dims // 2
        x0 = x[..., :half]
        x1 = x[..., half:n_dims]
        out[..., :half] = x0 * c - x1 * s
        out[..., half:n_dims] = x0 * s + x1 * c
    else:
        x0 = x[..., 0:n_dims:2]
        x1 = x[..., 1:n_dims:2]
        out[..., 0:n_dims:2] = x0 * c - x1 * s
        out[..., 1:n_dims:2] = x0 * s + x1 * c
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def gelu_f16_table(x: np.ndarray) -> np.ndarray:
    """ggml's GELU (tanh form) through its float16 table: input and result rounded to float16 for |x| < 10."""
    xh = x.astype(np.float16).astype(np.float32)
    a = np.float32(0.7978845608028654)
    b = np.float32(0.044715)
    g = np.float32(0.5) * xh * (np.float32(1.0) + np.tanh(a * xh * (np.float32(1.0) + b * xh * xh)))
    g = g.astype(np.float16).astype(np.float32)
    g = np.where(x <= -10.0, np.float32(0.0), np.where(x >= 10.0, x, g))
    return g.astype(np.float32)


# --- activations as ggml's CPU matmul sees them
# A quantized (or F16/BF16) weight is multiplied on the CPU with the activations converted to the weight type's
# ``vec_dot_type`` (ggml-cpu.c type_traits_cpu): F16 / BF16 rounding, or 8-bit blocks (Q8_0 / Q8_1: 32 values,
# scale max|x|/127 stored as fp16, round half to even as the AVX2 quantize_row_q8_0/q8_1; Q8_K: 256 values, scale
# -127/max with the signed extreme value, quantize_row_q8_K_ref). The integer dot products that follow are exact,
# so the dequantized weights times the dequantized activations in float32 give the same result - except for
# Q4_1/Q5_1, whose block minimum multiplies Q8_1's block sum stored as fp16: that rounding is added separately.
_VEC_DOT = {
    "F16": "f16", "BF16": "bf16",
    "Q4_0": "q8_0", "Q5_0": "q8_0", "Q8_0": "q8_0", "IQ4_NL": "q8_0", "MXFP4": "q8_0",
    "Q4_1": "q8_1", "Q5_1": "q8_1",
    "Q2_K": "q8_K", "Q3_K": "q8_K", "Q4_K": "q8_K", "Q5_K": "q8_K", "Q6_K": "q8_K", "IQ2_XXS": "q8_K",
    "IQ2_XS": "q8_K", "IQ2_S": "q8_K", "IQ3_XXS": "q8_K", "IQ3_S": "q8_K", "IQ1_S": "q8_K", "IQ1_M": "q8_K",
    "IQ4_XS": "q8_K", "TQ1_0": "q8_K", "TQ2_0": "q8_K",
}
_BLOCK_MIN = {"Q4_1": 20, "Q5_1": 24}   # bytes per 32-value block; fp16 d then fp16 m at its start


def activations_as(x: np.ndarray, kind: str | None):
    """x (rows, k) float32 after conversion to the vec_dot type ``kind``; for q8_1 also the per-block correction
    fp16(d * sum(q)) - fp16(d) * sum(q) (rows, k/32) that the weights' block minima multiply."""
    if kind is None:
        return x, None
    if kind == "f16":
        return x.astype(np.float16).astype(np.float32), None
    if kind == "bf16":
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        r = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
        r = np.where(np.isnan(x), (bits | np.uint32(0x00400000)) & np.uint32(0xFFFF0000), r)
        return r.astype(np.uint32).view(np.float32), None
    n, k = x.shape
    if kind in ("q8_0", "q8_1"):
        if k % 32:
            return x, None
        b = x.reshape(n, k // 32, 32)
        amax = np.abs(b).max(axis=-1, keepdims=True)
        d32 = amax / np.float32(127.0)
        d = d32.astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
        q = np.rint(b * inv)
        xq = (q * d).reshape(n, k)
        if kind == "q8_0":
            return xq, None
        qs = q.sum(axis=-1)
        s16 = (d32[..., 0] * qs).astype(np.float16).astype(np.float32)
        return xq, (s16 - (q * d).sum(axis=-1, dtype=np.float32)).astype(np.float32)
    if kind == "q8_K":
        if k % 256:
            return x, None
        b = x.reshape(n, k // 256, 256)
        idx = np.abs(b).argmax(axis=-1)[..., None]
        mx = np.take_along_axis(b, idx, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = np.where(mx != 0, np.float32(-127.0) / mx, np.float32(0.0)).astype(np.float32)
            d = np.where(mx != 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
        q = np.minimum(np.float32(127.0), np.rint(iscale * b))
        return (q * d).reshape(n, k), None
    return x, None


def block_minima(raw: np.ndarray, block_bytes: int, n_rows: int) -> np.ndarray:
    """The fp16 minimum ``m`` of every 32-value block of a Q4_1/Q5_1 tensor, (rows, blocks) float32."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, block_bytes)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    return m.reshape(n_rows, -1)


# --- model
class Model:
    """Weights (float32: a dict or a WeightStore) and the forward pass. Build with ``Model.from_source(source)``."""

    query_block = 128   # attention rows computed at once

    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], kv_f16: bool = True,
                 n_threads: int = 1):
        self.cfg = config
        self.n_threads = 1
        self._pool = None
        self.set_threads(n_threads)
        self.w = weights
        self.kv_f16 = kv_f16
        self.act_kinds: dict[str, str] = {}          # weight -> vec_dot conversion of its activations
        self.block_minima: dict[str, np.ndarray] = {}  # Q4_1/Q5_1 weight -> its block minima
        self._rope: dict = {}
        self._check()

    # required tensors per layer, by architecture
    def _layer_names(self, il: int) -> list[str]:
        p = f"blk.{il}."
        names = [p + "attn_norm.weight", p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight",
                 p + "attn_output.weight", p + "ffn_norm.weight"]
        if self.cfg.n_expert:
            names += [p + "ffn_gate_inp.weight", p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight",
                      p + "ffn_down_exps.weight"]
        else:
            names += [p + "ffn_gate.weight", p + "ffn_up.weight", p + "ffn_down.weight"]
        if self.cfg.arch in _QK_NORM_ARCHS:
            names += [p + "attn_q_norm.weight", p + "attn_k_norm.weight"]
        if self.cfg.arch in _GEMMA_ARCHS:
            names += [p + "post_attention_norm.weight", p + "post_ffw_norm.weight"]
        if self.cfg.arch == "phi3":   # fused Q/K/V and gate|up
            names = [n for n in names if not n.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight",
                                                          "ffn_gate.weight"))]
            names.append(p + "attn_qkv.weight")
        return names

    def _check(self) -> None:
        cfg = self.cfg
        need = ["token_embd.weight", "output_norm.weight"]
        for il in range(cfg.n_layer):
            need += self._layer_names(il)
        missing = [n for n in need if n not in self.w]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ImatrixError(f"the model is missing tensor {missing[0]}{more}")
        emb = self._shape("token_embd.weight")
        if len(emb) != 2 or emb[1] != cfg.n_embd:
            raise ImatrixError(f"tensor token_embd.weight has shape {emb[::-1]}, expected ({cfg.n_embd}, n_vocab)")
        if not cfg.n_vocab:
            cfg.n_vocab = emb[0]
        expect = {
            "attn_q.weight": (cfg.n_head * cfg.head_dim, cfg.n_embd),
            "attn_k.weight": (cfg.n_head_kv * cfg.head_dim, cfg.n_embd),
            "attn_v.weight": (cfg.n_head_kv * cfg.head_dim_v, cfg.n_embd),
            "attn_output.weight": (cfg.n_embd, cfg.n_head * cfg.head_dim_v),
        }
        if cfg.n_expert:
            E, ff = cfg.n_expert, cfg.n_ff_exp
            expect.update({"ffn_gate_inp.weight": (E, cfg.n_embd), "ffn_gate_exps.weight": (E, ff, cfg.n_embd),
                           "ffn_up_exps.weight": (E, ff, cfg.n_embd), "ffn_down_exps.weight": (E, cfg.n_embd, ff)})
        elif cfg.arch == "phi3":
            for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight"):
                del expect[n]
            expect.update({"attn_qkv.weight": ((cfg.n_head + 2 * cfg.n_head_kv) * cfg.head_dim, cfg.n_embd),
                           "ffn_up.weight": (2 * cfg.n_ff, cfg.n_embd), "ffn_down.weight": (cfg.n_embd, cfg.n_ff)})
            if ("rope_factors_long.weight" in self.w) != ("rope_factors_short.weight" in self.w):
                raise ImatrixError("a LongRoPE model needs both rope_factors_long and rope_factors_short")
        else:
            expect.update({"ffn_gate.weight": (cfg.n_ff, cfg.n_embd), "ffn_up.weight": (cfg.n_ff, cfg.n_embd),
                           "ffn_down.weight": (cfg.n_embd, cfg.n_ff)})
        for il in range(cfg.n_layer):
            for suffix, shape in expect.items():
                name = f"blk.{il}.{suffix}"
                if self._shape(name) != shape:
                    raise ImatrixError(f"tensor {name} has shape {self._shape(name)[::-1]}, "
                                       f"expected {shape[::-1]}")

    def _shape(self, name: str) -> tuple[int, ...]:
        """Shape of weight ``name`` (numpy order) without reading it from a WeightStore."""
        shape = getattr(self.w, "shape", None)
        return shape(name) if shape is not None else tuple(self.w[name].shape)

    @classmethod
    def from_source(cls, source, kv_f16: bool = True, n_threads: int = 1, as_stored: bool = True,
                    weight_budget: int | None = None) -> "Model":
        """A model over the tensors of a TensorSource, read as float32 on first use (see model.weights).

        ``weight_budget``: bytes of float32 weights to keep in memory (None: all; the model's F32 size at most);
        the others are read again from the source at each forward pass. ``as_stored``: convert matmul
        activations for each weight's stored type as llama.cpp does (see ``activations_as``); False evaluates the
        model as its F32 dequantization."""
        cfg = ModelConfig.from_metadata(source)
        kinds: dict[str, str] = {}
        minima: dict[str, np.ndarray] = {}
        for t in source.tensors:
            if len(t.shape) > 3 or (len(t.shape) == 3 and not t.name.endswith("_exps.weight")):
                raise ImatrixError(f"tensor {t.name} has {len(t.shape)} dimensions: not a weight gguftool can "
                                   "evaluate")
            tname = getattr(getattr(t, "type", None), "name", "")
            kind = _VEC_DOT.get(tname) if as_stored else None
            if kind is not None and len(t.shape) >= 2:
                kinds[t.name] = kind
                if tname in _BLOCK_MIN:
                    n_rows = t.n_elements // t.shape[0]
                    m = block_minima(t.read_raw(), _BLOCK_MIN[tname], n_rows)
                    minima[t.name] = m.reshape(t.shape[2], t.shape[1], -1) if len(t.shape) == 3 else m
        weights = WeightStore(source.tensors, weight_budget)
        model = cls(cfg, weights, kv_f16=kv_f16, n_threads=n_threads)
        model.act_kinds = kinds
        model.block_minima = minima
        return model

    @property
    def output_name(self) -> str:
        """The weight the logits are computed with ('output.weight', or 'token_embd.weight' when tied)."""
        return "output.weight" if "output.weight" in self.w else "token_embd.weight"

    def weight_names(self) -> list[str]:
        """Names of the matmul weights a forward pass reports to the hook (MoE experts: to ``hook.experts``)."""
        names = [n for il in range(self.cfg.n_layer) for n in self._layer_names(il) if not n.endswith("norm.weight")]
        return names + [self.output_name]

    def _rope_tables(self, n_pos: int, il: int):
        cfg = self.cfg
        swa = bool(cfg.swa_layers) and cfg.swa_layers[il]
        base = cfg.rope_base_swa if swa else cfg.rope_base
        fs = 1.0 if swa else cfg.rope_freq_scale
        ff = self.w.get("rope_freqs.weight")
        if "rope_factors_short.weight" in self.w:   # LongRoPE: llama_model::get_rope_factors by context size
            long = cfg.rope_orig_ctx and n_pos > cfg.rope_orig_ctx
            ff = self.w["rope_factors_long.weight" if long else "rope_factors_short.weight"]
        key = (n_pos, base, fs, ff is not None)
        tab = self._rope.get(key)
        if tab is None:
            tab = rope_cache(n_pos, cfg.rope_dims, base, fs, ff, cfg.rope_attn_factor,
                             None if swa else cfg.yarn_corr)
            self._rope[key] = tab
        return tab

    def _matmul(self, x: np.ndarray, name: str) -> np.ndarray:
        """x @ W.T with the activations converted as ggml's CPU matmul converts them for W's type."""
        xq, corr = activations_as(x, self.act_kinds.get(name))
        y = xq @ self.w[name].T
        if corr is not None and name in self.block_minima:
            y += corr @ self.block_minima[name].T
        return y

    def _matmul_expert(self, x: np.ndarray, name: str, e: int) -> np.ndarray:
        """x @ W[e].T for expert e of a 3-D weight (activations converted as for a 2-D one)."""
        xq, corr = activations_as(x, self.act_kinds.get(name))
        y = xq @ self.w[name][e].T
        if corr is not None and name in self.block_minima:
            y += corr @ self.block_minima[name][e].T
        return y

    def _moe_ffn(self, h: np.ndarray, p: str, hook) -> np.ndarray:
        """llm_graph_context::build_moe_ffn with softmax gating, normalized weights, SiLU experts: the router picks
        n_expert_used experts per token (top probabilities), each runs its gate/up/down FFN, and the outputs are
        summed with the renormalized router probabilities. ``hook.experts(names, e, x, n_expert)`` (if the hook has it)
        receives each expert's matmul inputs, as llama-imatrix collects MUL_MAT_ID inputs."""
        cfg = self.cfg
        logits = self._matmul(h, p + "ffn_gate_inp.weight")
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True, dtype=np.float32)
        k = cfg.n_expert_used
        sel = np.argsort(-probs, axis=1, kind="stable")[:, :k]                  # ggml_argsort_top_k
        weights = np.take_along_axis(probs, sel, axis=1)
        weights /= np.maximum(weights.sum(axis=1, keepdims=True), np.float32(6.103515625e-5))
        if cfg.expert_weights_scale not in (0.0, 1.0):
            weights *= np.float32(cfg.expert_weights_scale)
        collect = getattr(hook, "experts", None) if hook is not None else None

        def run(e):
            rows, slots = np.nonzero(sel == e)
            if rows.size == 0:
                return None
            xe = h[rows]
            g = self._matmul_expert(xe, p + "ffn_gate_exps.weight", e)
            u = self._matmul_expert(xe, p + "ffn_up_exps.weight", e)
            a = silu(g) * u
            y = self._matmul_expert(a, p + "ffn_down_exps.weight", e) * weights[rows, slots][:, None]
            return e, rows, xe, a, y

        out = np.zeros_like(h)
        for res in self.map_jobs(run, range(cfg.n_expert)):
            if res is None:
                continue
            e, rows, xe, a, y = res
            out[rows] += y       # a token picks an expert at most once: no repeated rows
            if collect is not None:
                collect((p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight"), e, xe, cfg.n_expert)
                collect((p + "ffn_down_exps.weight",), e, a, cfg.n_expert)
        return out

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = self._matmul(x, name)
        b = self.w.get(name[:-len("weight")] + "bias")
        if b is not None:
            y += b
        return y

    def _mask(self, T: int, il: int) -> np.ndarray:
        """Additive (T, T) mask: -inf above the diagonal (and outside the sliding window on SWA layers)."""
        cfg = self.cfg
        swa = bool(cfg.n_swa and cfg.swa_layers and cfg.swa_layers[il])
        key = ("mask", T, swa)
        m = self._rope.get(key)
        if m is None:
            pos = np.arange(T)
            masked = pos[None, :] > pos[:, None]
            if swa:
                masked |= (pos[:, None] - pos[None, :]) >= cfg.n_swa
            m = np.where(masked, np.float32(-np.inf), np.float32(0.0)).astype(np.float32)
            self._rope[key] = m
        return m

    # --- threading: BLAS runs single-threaded, work is split over rows / heads on a thread pool
    # (numpy releases the GIL in matmul and ufuncs; OpenBLAS's own threads fare badly on small products)
    def set_threads(self, n: int) -> None:
        n = max(1, int(n))
        if n != self.n_threads:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = ThreadPoolExecutor(n) if n > 1 else None
            self.n_threads = n
        set_num_threads(1)

    def map_jobs(self, fn, jobs) -> list:
        """Run fn(job) for every job, on the pool when there is one; results in order."""
        jobs = list(jobs)
        if self._pool is None or len(jobs) < 2:
            return [fn(j) for j in jobs]
        return list(self._pool.map(fn, jobs))

    def row_ranges(self, n: int, min_rows: int = 16) -> list[tuple[int, int]]:
        parts = max(1, min(self.n_threads, n // min_rows))
        step = -(-n // parts)
        return [(r, min(n, r + step)) for r in range(0, n, step)]

    def _attention(self, q, k, v, il: int, out: np.ndarray) -> None:
        """q: (B,T,H,D) k: (B,T,Hkv,D) v: (B,T,Hkv,Dv) -> out (B,T,Hkv,G,Dv), causal (and sliding-window) softmax."""
        cfg = self.cfg
        B, T, H, D = q.shape
        Hkv = cfg.n_head_kv
        G = H // Hkv
        Dv = v.shape[-1]
        scale = np.float32(cfg.attn_scale) if cfg.attn_scale else np.float32(1.0) / np.sqrt(np.float32(D))
        if cfg.arch in _GEMMA_ARCHS:
            q = q * scale      # gemma scales Q before attention, then attends with scale 1
            scale = np.float32(1.0)
        cap = np.float32(cfg.attn_softcap)
        # heads h = kv*G + g share kv head kv (ggml broadcasts K/V over the query heads the same way);
        # per (sequence, kv head) the G query heads of a position are adjacent rows of one 2-D product
        qh = np.ascontiguousarray(q.reshape(B, T, Hkv, G, D).transpose(0, 2, 1, 3, 4))   # (B, Hkv, T, G, D)
        kh = np.ascontiguousarray(k.transpose(0, 2, 1, 3))                               # (B, Hkv, T, D)
        vh = np.ascontiguousarray(v.transpose(0, 2, 1, 3))                               # (B, Hkv, T, Dv)
        mask = self._mask(T, il)
        qb = min(T, self.query_block)
        # keys after a block's last query are masked anyway, so they are never computed
        jobs = [(b, kv, q0, min(T, q0 + qb)) for b in range(B) for kv in range(Hkv) for q0 in range(0, T, qb)]

        def run(job):
            b, kv, q0, q1 = job
            s = qh[b, kv, q0:q1].reshape(-1, D) @ kh[b, kv, :q1].T     # ((q1-q0)*G, q1)
            if scale != 1.0:
                s *= scale
            if cap:                                     # gemma2: scores soft-capped before the mask
                s = np.tanh(s / cap) * cap
            s = s.reshape(q1 - q0, G, q1)
            s += mask[q0:q1, None, :q1]
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True, dtype=np.float32)
            out[b, q0:q1, kv] = (s.reshape(-1, q1) @ vh[b, kv, :q1]).reshape(q1 - q0, G, Dv)

        self.map_jobs(run, jobs)

    def forward(self, tokens: np.ndarray, hook: Hook | None = None, logits_from: int = 0,
                logits_to: int | None = None, process_output: bool = False) -> np.ndarray:
        """Evaluate ``tokens`` (B, T): B independent sequences at positions 0..T-1.

        Returns logits (B, logits_to - logits_from, n_vocab) for those positions (float32). ``hook`` receives every
        matmul input of a ``blk.*`` weight, and of the output weight when ``process_output``.
        """
        cfg = self.cfg
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None, :]
        B, T = tokens.shape
        N = B * T
        if logits_to is None:
            logits_to = T
        emb = self.w["token_embd.weight"]
        if tokens.size and (tokens.min() < 0 or tokens.max() >= emb.shape[0]):
            raise ImatrixError(f"token id out of range 0..{emb.shape[0] - 1}")
        x = emb[tokens.reshape(-1)].astype(np.float32)       # (N, n_embd)
        if cfg.arch in _GEMMA_ARCHS:
            x *= np.float32(math.sqrt(cfg.n_embd))
        H, Hkv, D, Dv = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
        G = H // Hkv
        gemma = cfg.arch in _GEMMA_ARCHS
        fused = cfg.arch == "phi3"     # attn_qkv = Q|K|V, ffn_up = gate|up
        moe = cfg.n_expert > 0
        pos = np.tile(np.arange(T), B)
        w = self.w
        ranges = self.row_ranges(N)
        h = np.empty((N, cfg.n_embd), dtype=np.float32)
        q = np.empty((N, H, D), dtype=np.float32)
        k = np.empty((N, Hkv, D), dtype=np.float32)
        v = np.empty((N, Hkv, Dv), dtype=np.float32)
        o = np.empty((B, T, Hkv, G, Dv), dtype=np.float32)
        m = np.empty((N, cfg.n_ff), dtype=np.float32) if not moe else None
        for il in range(cfg.n_layer):
            p = f"blk.{il}."
            cos, sin = self._rope_tables(T, il)
            qn = w.get(p + "attn_q_norm.weight")
            kn = w.get(p + "attn_k_norm.weight")

            def stage_a(r):
                r0, r1 = r
                hh = rms_norm(x[r0:r1], w[p + "attn_norm.weight"], cfg.rms_eps)
                h[r0:r1] = hh
                if fused:
                    qkv = self._linear(hh, p + "attn_qkv.weight")
                    qq = qkv[:, :H * D].reshape(-1, H, D)
                    kk = qkv[:, H * D:(H + Hkv) * D].reshape(-1, Hkv, D)
                    vv = qkv[:, (H + Hkv) * D:].reshape(-1, Hkv, Dv)
                else:
                    qq = self._linear(hh, p + "attn_q.weight").reshape(-1, H, D)
                    kk = self._linear(hh, p + "attn_k.weight").reshape(-1, Hkv, D)
                    vv = self._linear(hh, p + "attn_v.weight").reshape(-1, Hkv, Dv)
                if qn is not None:
                    qq = rms_norm(qq, qn, cfg.rms_eps)
                    kk = rms_norm(kk, kn, cfg.rms_eps)
                c = cos[pos[r0:r1]][:, None, :]
                s_ = sin[pos[r0:r1]][:, None, :]
                q[r0:r1] = apply_rope(qq, c, s_, cfg.rope_dims, cfg.rope_neox)
                kk = apply_rope(kk, c, s_, cfg.rope_dims, cfg.rope_neox)
                if self.kv_f16:   # llama.cpp's KV cache is float16
                    kk = kk.astype(np.float16).astype(np.float32)
                    vv = vv.astype(np.float16).astype(np.float32)
                k[r0:r1] = kk
                v[r0:r1] = vv

            self.map_jobs(stage_a, ranges)
            if hook is not None:
                hook((p + "attn_qkv.weight",) if fused else (p + "attn_q.weight", p + "attn_k.weight",
                                                            p + "attn_v.weight"), h)
            self._attention(q.reshape(B, T, H, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, Dv), il, o)
            a_in = o.reshape(N, H * Dv)
            if hook is not None:
                hook((p + "attn_output.weight",), a_in)

            def stage_c(r):
                r0, r1 = r
                aa = self._linear(a_in[r0:r1], p + "attn_output.weight")
                if gemma:
                    aa = rms_norm(aa, w[p + "post_attention_norm.weight"], cfg.rms_eps)
                xx = x[r0:r1] + aa
                x[r0:r1] = xx
                hh = rms_norm(xx, w[p + "ffn_norm.weight"], cfg.rms_eps)
                h[r0:r1] = hh
                if moe:
                    return
                if fused:
                    gu = self._linear(hh, p + "ffn_up.weight")
                    g, u = gu[:, :cfg.n_ff], gu[:, cfg.n_ff:]
                else:
                    g = self._linear(hh, p + "ffn_gate.weight")
                    u = self._linear(hh, p + "ffn_up.weight")
                m[r0:r1] = (gelu_f16_table(g) if gemma else silu(g)) * u

            self.map_jobs(stage_c, ranges)
            if moe:
                if hook is not None:
                    hook((p + "ffn_gate_inp.weight",), h)
                x += self._moe_ffn(h, p, hook)
                continue
            if hook is not None:
                hook((p + "ffn_up.weight",) if fused else (p + "ffn_gate.weight", p + "ffn_up.weight"), h)
                hook((p + "ffn_down.weight",), m)

            def stage_d(r):
                r0, r1 = r
                f = self._linear(m[r0:r1], p + "ffn_down.weight")
                if gemma:
                    f = rms_norm(f, w[p + "post_ffw_norm.weight"], cfg.rms_eps)
                x[r0:r1] += f

            self.map_jobs(stage_d, ranges)

        def final_norm(r):
            r0, r1 = r
            x[r0:r1] = rms_norm(x[r0:r1], w["output_norm.weight"], cfg.rms_eps)

        self.map_jobs(final_norm, ranges)
        if hook is not None and process_output:
            hook((self.output_name,), x)
        sel = np.ascontiguousarray(x.reshape(B, T, cfg.n_embd)[:, logits_from:logits_to].reshape(-1, cfg.n_embd))
        n_sel = sel.shape[0]
        logits = np.empty((n_sel, w[self.output_name].shape[0]), dtype=np.float32)

        def out_rows(r):
            r0, r1 = r
            lg = self._matmul(sel[r0:r1], self.output_name)
            if cfg.final_softcap:
                c = np.float32(cfg.final_softcap)
                lg = np.tanh(lg / c) * c
            logits[r0:r1] = lg

        self.map_jobs(out_rows, self.row_ranges(n_sel, 1))
        return logits.reshape(B, logits_to - logits_from, -1)

"""gpt-oss (llama.cpp arch ``gpt-oss``, GptOssForCausalLM): the layer of the forward pass, as llama.cpp's graph
``llama_model_openai_moe::graph`` computes it on the CPU.

- attention: Q/K/V and output with biases, NEOX RoPE with YaRN on every layer (the sliding-window layers use the
  same base and scale unless ``rope.freq_base_swa`` says otherwise), scale 1/sqrt(n_rot), and per-head learned
  *sinks*: each query head's softmax has one more logit (``attn_sinks``, not scaled, no value) in its denominator,
  as ggml's flash attention adds it; sliding-window layers by ``attention.sliding_window_pattern`` (default: every
  other layer, the first one sliding) with ``attention.sliding_window``;
- the FFN input is the residual normed by ``post_attention_norm``;
- MoE (build_moe_ffn with LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT): router logits plus bias, the top-k logits
  chosen first, then a softmax over the k chosen; each expert's gate and up products plus their biases, ggml's
  ``swiglu_oai`` (gate clamped above at 7, up clamped to [-7, 7], ``gate * sigmoid(1.702 gate) * (up + 1)``), the
  down product plus its bias, times the weight; the k outputs summed in slot order. The experts' weights are MXFP4
  in released files: read in their stored form and dequantized a slab at a time by gguftool's MXFP4 kernel, their
  activations rounded to Q8_0 blocks (MXFP4's vec_dot_type, see :mod:`.activations`).

imatrix: the dense products report their inputs to the hook (Q/K/V, output, router); the experts' gate/up input
and down input go to ``hook.experts`` per expert, as llama-imatrix collects MUL_MAT_ID inputs.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from .ops import rms_norm, yarn_corr_dims

if TYPE_CHECKING:
    from .config import ModelConfig
    from .forward import Hook, Model, _PassState
    from .metadata import MetadataReader

ARCH = "gpt-oss"
SWIGLU_ALPHA = np.float32(1.702)   # llm_graph_context::build_moe_ffn, LLM_FFN_SWIGLU_OAI_MOE
SWIGLU_LIMIT = np.float32(7.0)


# --- hyperparameters


def configure(md: "MetadataReader", cfg: "ModelConfig") -> None:
    """The gpt-oss keys llama_model_openai_moe::load_arch_hparams reads, into cfg (checked)."""
    a = cfg.arch + "."
    n_expert = md.get_int(a + "expert_count", 0)
    if n_expert <= 0:
        md.fail(f"the model is missing the metadata key {a}expert_count")
    cfg.n_expert = n_expert
    cfg.n_expert_used = md.get_int(a + "expert_used_count", 0)
    if not 0 < cfg.n_expert_used <= n_expert:
        md.invalid(f"{a}expert_used_count = {cfg.n_expert_used} ({n_expert} experts)")
    cfg.n_ff_exp = md.get_int(a + "expert_feed_forward_length", required=True, lo=1)
    cfg.expert_weights_scale = md.get_float(a + "expert_weights_scale", 0.0)
    cfg.n_swa = md.get_int(a + "attention.sliding_window", required=True, lo=1, hi=2**31 - 1)
    pattern = md.meta.get(a + "attention.sliding_window_pattern")
    values = getattr(pattern, "values", pattern)
    if isinstance(values, (list, tuple, np.ndarray)):     # one flag per layer
        if len(values) != cfg.n_layer or not all(isinstance(v, (bool, np.bool_)) for v in values):
            md.bad(a + "attention.sliding_window_pattern", pattern,
                   f"expected {cfg.n_layer} booleans (one per layer) or a period")
        cfg.swa_layers = [bool(v) for v in values]
    else:                                                 # a period n: layer il slides unless il % n == n - 1
        n = md.get_int(a + "attention.sliding_window_pattern", 2)
        cfg.swa_layers = [n == 0 or il % n < n - 1 for il in range(cfg.n_layer)]
    # llama.cpp: the sliding layers' base defaults to the model's, and their scale is the model's (YaRN included)
    cfg.rope_base_swa = md.get_float(a + "rope.freq_base_swa", cfg.rope_base, lo_open=True)
    cfg.rope_freq_scale_swa = cfg.rope_freq_scale
    if cfg.yarn_corr is not None:
        cfg.yarn_corr_swa = yarn_corr_dims(cfg.rope_dims, cfg.rope_orig_ctx, cfg.rope_base_swa)
    cfg.attn_scale = float(np.float32(1.0) / np.sqrt(np.float32(cfg.rope_dims)))   # 1/sqrtf(n_rot)


# --- tensors


def layer_names(cfg: "ModelConfig", il: int) -> list[str]:
    """The weights layer il needs (norms, sinks and biases included: llama.cpp requires every one)."""
    p = f"blk.{il}."
    names = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
             "attn_sinks.weight", "post_attention_norm.weight", "ffn_gate_inp.weight", "ffn_gate_exps.weight",
             "ffn_up_exps.weight", "ffn_down_exps.weight"]
    biases = ["attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias", "ffn_gate_inp.bias",
              "ffn_gate_exps.bias", "ffn_up_exps.bias", "ffn_down_exps.bias"]
    return [p + n for n in names + biases]


def matmul_weights(cfg: "ModelConfig", il: int) -> list[str]:
    """The weights of layer il that multiply activations (what the imatrix hook sees)."""
    p = f"blk.{il}."
    return [p + n for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                            "ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight",
                            "ffn_down_exps.weight")]


def expected_shapes(cfg: "ModelConfig", il: int) -> dict[str, tuple[int, ...]]:
    """numpy shapes of layer il's tensors (llama_model_openai_moe::load_arch_tensors)."""
    h, H, Hkv, D, E, ff = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_expert, cfg.n_ff_exp
    s = {"attn_norm.weight": (h,), "post_attention_norm.weight": (h,),
         "attn_q.weight": (H * D, h), "attn_k.weight": (Hkv * D, h), "attn_v.weight": (Hkv * cfg.head_dim_v, h),
         "attn_output.weight": (h, H * cfg.head_dim_v), "attn_sinks.weight": (H,),
         "attn_q.bias": (H * D,), "attn_k.bias": (Hkv * D,), "attn_v.bias": (Hkv * cfg.head_dim_v,),
         "attn_output.bias": (h,),
         "ffn_gate_inp.weight": (E, h), "ffn_gate_inp.bias": (E,),
         "ffn_gate_exps.weight": (E, ff, h), "ffn_up_exps.weight": (E, ff, h), "ffn_down_exps.weight": (E, h, ff),
         "ffn_gate_exps.bias": (E, ff), "ffn_up_exps.bias": (E, ff), "ffn_down_exps.bias": (E, h)}
    p = f"blk.{il}."
    return {p + n: v for n, v in s.items()}


# --- the layer


def layer(model: "Model", st: "_PassState", il: int, ranges: list[tuple[int, int]], hook: "Hook | None") -> None:
    """Layer il of a gpt-oss model: attention with sinks, then the MoE FFN, each added to st.x."""
    cfg = model.cfg
    p = f"blk.{il}."
    B, T, N = st.B, st.T, st.B * st.T
    H, Hkv, D, Dv = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
    model.workers.map(partial(model._norm_rows, st.x, st.h, model.w[p + "attn_norm.weight"]), ranges)
    names = (p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight")
    if hook is not None:
        hook(names, st.h)
    q, k, v = model._linears(st.h, names)    # + biases
    cos, sin = model._rope_tables(T, il)
    model.workers.map(partial(model._rope_rows, st, (q, k, v), cos, sin, None, None), ranges)
    model._attention(st.q.reshape(B, T, H, D), st.k.reshape(B, T, Hkv, D), st.v.reshape(B, T, Hkv, Dv), il, st.o,
                     sinks=model.w[p + "attn_sinks.weight"])
    a_in = st.o.reshape(N, H * Dv)
    if hook is not None:
        hook((p + "attn_output.weight",), a_in)
    (aa,) = model._linears(a_in, (p + "attn_output.weight",))
    model.workers.map(partial(_attn_residual_rows, model, st, p, aa), ranges)
    if hook is not None:
        hook((p + "ffn_gate_inp.weight",), st.h)
    st.x += moe(model, st.h, p, hook)


def _attn_residual_rows(model: "Model", st: "_PassState", p: str, aa: np.ndarray, rows: tuple[int, int]) -> None:
    """Rows r0:r1: the attention output added to st.x, then post_attention_norm (-> st.h, the FFN input)."""
    r0, r1 = rows
    xx = st.x[r0:r1]
    xx += aa[r0:r1]
    st.h[r0:r1] = rms_norm(xx, model.w[p + "post_attention_norm.weight"], model.cfg.rms_eps)


# --- mixture of experts


def route(logits: np.ndarray, k: int, scale: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """SOFTMAX_WEIGHT gating: the k largest (biased) router logits per row in descending order (ggml_argsort_top_k),
    and the softmax over those k (ggml_soft_max: float exponentials, the sum in double)."""
    sel = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(logits, sel, axis=1)
    e = np.exp(w - w.max(axis=1, keepdims=True)).astype(np.float32)
    inv = (1.0 / e.sum(axis=1, dtype=np.float64)).astype(np.float32)
    weights = e * inv[:, None]
    if scale not in (0.0, 1.0):
        weights = weights * np.float32(scale)
    return sel, weights.astype(np.float32)


def swiglu_oai(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """ggml_compute_forward_swiglu_oai_f32: x = min(g, 7), y = clamp(u, -7, 7), x / (1 + exp(-1.702 x)) * (y + 1)."""
    x = np.minimum(g, SWIGLU_LIMIT)
    y = np.clip(u, -SWIGLU_LIMIT, SWIGLU_LIMIT)
    with np.errstate(over="ignore"):   # exp overflows to inf for x < -52: x / inf = -0, as expf in C
        return (x / (np.float32(1.0) + np.exp(SWIGLU_ALPHA * -x))) * (y + np.float32(1.0))


def moe(model: "Model", h: np.ndarray, p: str, hook: "Hook | None") -> np.ndarray:
    """The experts' weighted sum for the normed rows h; the experts' inputs go to ``hook.experts``."""
    from .forward import ExpertHook

    cfg = model.cfg
    (logits,) = model._linears(h, (p + "ffn_gate_inp.weight",))    # + the router bias
    sel, weights = route(logits, cfg.n_expert_used, cfg.expert_weights_scale)
    collect = hook.experts if isinstance(hook, ExpertHook) else None
    slots = np.zeros((h.shape[0], cfg.n_expert_used, h.shape[1]), dtype=np.float32)
    for res in model.workers.map(partial(_expert, model, h, p, sel, weights), range(cfg.n_expert)):
        if res is None:
            continue
        e, rows, slot, xe, a, y = res
        slots[rows, slot] = y
        if collect is not None:
            collect((p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight"), e, xe, cfg.n_expert)
            collect((p + "ffn_down_exps.weight",), e, a, cfg.n_expert)
    out = slots[:, 0].copy()
    for j in range(1, cfg.n_expert_used):   # the graph adds the slots' views in order
        out += slots[:, j]
    return out


def _expert(model: "Model", h: np.ndarray, p: str, sel: np.ndarray, weights: np.ndarray, e: int):
    """Expert e over the tokens routed to it: (e, their rows, their slots, its input, its down input, weighted
    output), or None when no token picked it."""
    rows, slot = np.nonzero(sel == e)
    if rows.size == 0:
        return None
    xe = h[rows]
    g, u = model._products(xe, (p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight"), e, parallel=False)
    g += model.w[p + "ffn_gate_exps.bias"][e]
    u += model.w[p + "ffn_up_exps.bias"][e]
    a = swiglu_oai(g, u)
    (y,) = model._products(a, (p + "ffn_down_exps.weight",), e, parallel=False)
    y += model.w[p + "ffn_down_exps.bias"][e]
    y *= weights[rows, slot][:, None]
    return e, rows, slot, xe, a, y

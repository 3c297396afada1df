"""DeepSeek-V2/V3 (``deepseek2``) layers: multi-head latent attention and the DeepSeek mixture of experts.

The computation of llama.cpp's deepseek2 graph (src/models/deepseek2.cpp) for a GGUF written by its converter
(attn_k_b / attn_v_b present, so ``hparams.is_mla()``: the absorbed form, always):

- queries: ``attn_q`` (no query compression, DeepSeek-V2-Lite) or ``attn_q_b(rms_norm(attn_q_a(h)))``, per head
  [nope | rope] parts; the rope part rotated (adjacent pairs, YaRN);
- the latent KV: ``attn_kv_a_mqa(h)`` = [kv_lora | rope]; the latent part RMS-normed (``attn_kv_a_norm``), the rope
  part rotated; one shared key per token ``[latent | k_pe]``, the value is the latent part (MQA with one KV head,
  float16 in the KV cache);
- the nope part of each head's query is absorbed into the latent space by ``attn_k_b`` (per head,
  (nope -> kv_lora)), the query is ``[absorbed | q_pe]``; softmax attention with
  ``kq_scale = mscale^2 / sqrt(nope + rope)`` (YaRN's magnitude correction, TAG_DEEPSEEK2_YARN_LOG_MUL_FIX);
- each head's latent output is decompressed by ``attn_v_b`` (kv_lora -> v_head_dim), heads concatenated, then
  ``attn_output``;
- the FFN: ``leading_dense_block_count`` dense SiLU layers, then MoE layers (build_moe_ffn): router logits
  (``ffn_gate_inp``) through softmax or sigmoid (``expert_gating_func``), plus the selection bias ``exp_probs_b``
  for choosing only; group-limited choice (``expert_group_count`` groups scored by the sum of their two best
  experts, ``expert_group_used_count`` kept); top ``expert_used_count``; the unbiased probabilities as weights,
  normalized (``expert_weights_norm``) and scaled (``expert_weights_scale``); plus the shared experts (one dense
  SiLU FFN ``ffn_*_shexp``).

The importance-matrix hooks see what llama-imatrix collects: each dense matmul's input, the experts' inputs per
expert (``hook.experts``), and for the per-head 3-D weights attn_k_b / attn_v_b (a batched MUL_MAT, one count
per token) the inputs of all heads side by side in one row of n_head * n_in columns, as llama-imatrix stores them.

:class:`gguftool.model.forward.Model` calls :func:`layer` for a ``deepseek2`` model; the weights are read with the
model's own product helpers (``_products``, ``_linears``), so quantized weights see their activation conversion.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from .metadata import MetadataReader
from .ops import apply_rope, rms_norm, silu

if TYPE_CHECKING:
    from .config import ModelConfig
    from .forward import Hook, Model, _PassState

GATING_SOFTMAX, GATING_SIGMOID = 1, 2
_MAX_INT = 2**31 - 1


@dataclass
class MLAConfig:
    q_lora: int               # attention.q_lora_rank (0: attn_q, no query compression)
    kv_lora: int              # attention.kv_lora_rank
    nope: int                 # per-head key/query width without rope (key_length_mla - rope)
    rope: int                 # rope.dimension_count
    v_dim: int                # value_length_mla
    n_dense: int              # leading_dense_block_count
    n_shared: int             # expert_shared_count
    gating: int               # expert_gating_func: 1 softmax, 2 sigmoid
    n_groups: int             # expert_group_count (0/1: no group-limited routing)
    n_group_used: int
    weights_norm: bool        # expert_weights_norm


# --- configuration


def mla_config(md: MetadataReader, cfg: "ModelConfig") -> MLAConfig:
    """The deepseek2 hyperparameters (llama_model_deepseek2::load_arch_hparams); also sets cfg's expert fields,
    the RoPE magnitude and the attention scale. Checked for type and range; errors name the key."""
    a = cfg.arch + "."
    kv_lora = md.get_int(a + "attention.kv_lora_rank", required=True, lo=1)
    rope = cfg.rope_dims
    if cfg.head_dim != kv_lora + rope or cfg.head_dim_v != kv_lora:
        md.invalid(f"{a}attention.key_length = {cfg.head_dim} and value_length = {cfg.head_dim_v}, expected "
                   f"kv_lora_rank + rope = {kv_lora + rope} and {kv_lora} (an MLA model written by llama.cpp's "
                   "converter)")
    if cfg.n_head_kv != 1:
        md.invalid(f"{a}attention.head_count_kv = {cfg.n_head_kv}, expected 1 (MLA as MQA)")
    k_mla = md.get_int(a + "attention.key_length_mla", required=True, lo=rope + 1)
    v_dim = md.get_int(a + "attention.value_length_mla", required=True, lo=1)
    # llama.cpp reads q_lora_rank from every deepseek2 model but the "lite" ones (26 or 27 layers)
    q_lora = md.get_int(a + "attention.q_lora_rank", 0)
    n_dense = md.get_int(a + "leading_dense_block_count", 0, hi=cfg.n_layer)
    n_expert = md.get_int(a + "expert_count", 0)
    if n_dense < cfg.n_layer:
        if n_expert <= 0:
            md.fail(f"the model is missing the metadata key {a}expert_count")
        cfg.n_expert = n_expert
        cfg.n_expert_used = md.get_int(a + "expert_used_count", 0)
        if not 0 < cfg.n_expert_used <= n_expert:
            md.invalid(f"{a}expert_used_count = {cfg.n_expert_used} ({n_expert} experts)")
        cfg.n_ff_exp = md.get_int(a + "expert_feed_forward_length", required=True, lo=1)
    gating = md.get_int(a + "expert_gating_func", 0, hi=_MAX_INT)
    if gating == 0:   # GGUFs written before the key existed: softmax (as llama.cpp assumes for DeepSeek-V2)
        gating = GATING_SOFTMAX
    if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
        md.fail(f"unsupported expert gating function {gating} ({a}expert_gating_func; softmax or sigmoid)")
    n_groups = md.get_int(a + "expert_group_count", 0, hi=_MAX_INT)
    n_group_used = md.get_int(a + "expert_group_used_count", 0, hi=_MAX_INT)
    if n_groups > 1:
        if cfg.n_expert % n_groups:
            md.invalid(f"{a}expert_count = {cfg.n_expert} is not a multiple of {a}expert_group_count = {n_groups}")
        if cfg.n_expert // n_groups < 2:   # each group is scored by its two best experts
            md.invalid(f"{a}expert_group_count = {n_groups}: fewer than 2 experts per group")
        if not 0 < n_group_used <= n_groups:
            md.invalid(f"{a}expert_group_used_count = {n_group_used} ({n_groups} groups)")
        if n_group_used * (cfg.n_expert // n_groups) < cfg.n_expert_used:
            md.invalid(f"{a}expert_group_used_count = {n_group_used} groups hold fewer experts than "
                       f"{a}expert_used_count = {cfg.n_expert_used}")
    cfg.expert_weights_scale = md.get_float(a + "expert_weights_scale", 0.0)
    m = MLAConfig(q_lora=q_lora, kv_lora=kv_lora, nope=k_mla - rope, rope=rope, v_dim=v_dim, n_dense=n_dense,
                  n_shared=md.get_int(a + "expert_shared_count", 0), gating=gating, n_groups=n_groups,
                  n_group_used=n_group_used, weights_norm=bool(md.get_bool(a + "expert_weights_norm", False)))
    _yarn_scales(md, cfg, k_mla)
    return m


def _yarn_scales(md: MetadataReader, cfg: "ModelConfig", k_mla: int) -> None:
    """cfg.rope_attn_factor (llama_context's yarn_attn_factor) and cfg.attn_scale (the graph's kq_scale), in float32
    as llama.cpp computes them."""
    f32 = np.float32
    a = cfg.arch + "."
    log_mul = f32(0)
    if md.has(a + "rope.scaling.yarn_log_multiplier"):   # stored as 0.1 * mscale_all_dim
        log_mul = f32(md.get_float(a + "rope.scaling.yarn_log_multiplier", 0.0, lo=-1e30)) / f32(0.1)
    attn_factor = f32(md.get_float(a + "rope.scaling.attn_factor", 1.0) or 1.0)
    fs = f32(cfg.rope_freq_scale)
    if cfg.yarn_corr is not None:   # YaRN (ext_factor 1)
        factor = f32(1) / fs

        def get_mscale(scale, mscale):
            return f32(1) if scale <= 1 else f32(f32(0.1) * f32(mscale) * np.log(scale) + f32(1))

        if log_mul != 0:
            mscale = log_mul if log_mul != 1 else f32(1)
            yarn = get_mscale(factor, mscale) / get_mscale(factor, log_mul)
        else:
            yarn = get_mscale(factor, f32(1))
        yarn = f32(yarn * (f32(1) / (f32(1) + f32(0.1) * np.log(factor))))
        attn_factor = f32(yarn * attn_factor)
    cfg.rope_attn_factor = float(attn_factor)
    # the graph undoes the rope magnitude correction, then applies mscale_all_dim's
    ln_inv = np.log(f32(1) / fs)
    org = f32(attn_factor * (f32(1) + f32(0.1) * ln_inv))
    mscale = f32(org * (f32(1) + f32(0.1) * log_mul * ln_inv))
    cfg.attn_scale = float(f32(f32(mscale * mscale) / np.sqrt(f32(k_mla))))


# --- tensors


def layer_names(cfg: "ModelConfig", il: int) -> list[str]:
    """The weights layer il needs (norms included)."""
    m = cfg.mla
    assert m is not None
    p = f"blk.{il}."
    names = [p + "attn_norm.weight"]
    names += [p + "attn_q.weight"] if not m.q_lora else [p + n for n in ("attn_q_a.weight", "attn_q_a_norm.weight",
                                                                         "attn_q_b.weight")]
    names += [p + n for n in ("attn_kv_a_mqa.weight", "attn_kv_a_norm.weight", "attn_k_b.weight", "attn_v_b.weight",
                              "attn_output.weight", "ffn_norm.weight")]
    if il < m.n_dense:
        names += [p + "ffn_gate.weight", p + "ffn_up.weight", p + "ffn_down.weight"]
    else:
        names += [p + n for n in ("ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight",
                                  "ffn_down_exps.weight")]
        if m.n_shared:
            names += [p + "ffn_gate_shexp.weight", p + "ffn_up_shexp.weight", p + "ffn_down_shexp.weight"]
    return names


def expected_shapes(cfg: "ModelConfig", il: int) -> dict[str, tuple[int, ...]]:
    """numpy shapes of layer il's weights (and of the optional exp_probs_b bias)."""
    m = cfg.mla
    assert m is not None
    H, h, k = cfg.n_head, cfg.n_embd, m.nope + m.rope
    p = f"blk.{il}."
    s = {"attn_norm.weight": (h,), "attn_kv_a_mqa.weight": (m.kv_lora + m.rope, h), "attn_kv_a_norm.weight": (m.kv_lora,),
         "attn_k_b.weight": (H, m.kv_lora, m.nope), "attn_v_b.weight": (H, m.v_dim, m.kv_lora),
         "attn_output.weight": (h, H * m.v_dim), "ffn_norm.weight": (h,)}
    if m.q_lora:
        s.update({"attn_q_a.weight": (m.q_lora, h), "attn_q_a_norm.weight": (m.q_lora,),
                  "attn_q_b.weight": (H * k, m.q_lora)})
    else:
        s["attn_q.weight"] = (H * k, h)
    if il < m.n_dense:
        s.update({"ffn_gate.weight": (cfg.n_ff, h), "ffn_up.weight": (cfg.n_ff, h), "ffn_down.weight": (h, cfg.n_ff)})
    else:
        E, ff, sff = cfg.n_expert, cfg.n_ff_exp, cfg.n_ff_exp * m.n_shared
        s.update({"ffn_gate_inp.weight": (E, h), "ffn_gate_exps.weight": (E, ff, h), "ffn_up_exps.weight": (E, ff, h),
                  "ffn_down_exps.weight": (E, h, ff), "exp_probs_b.bias": (E,)})
        if m.n_shared:
            s.update({"ffn_gate_shexp.weight": (sff, h), "ffn_up_shexp.weight": (sff, h),
                      "ffn_down_shexp.weight": (h, sff)})
    return {p + n: v for n, v in s.items()}


# --- the layer


def layer(model: "Model", st: "_PassState", il: int, ranges: list[tuple[int, int]], hook: "Hook | None") -> None:
    """Layer il of a deepseek2 model: MLA attention, then the dense or MoE FFN, each added to st.x."""
    cfg = model.cfg
    m = cfg.mla
    assert m is not None
    p = f"blk.{il}."
    B, T, N, H = st.B, st.T, st.B * st.T, cfg.n_head
    cos, sin = model._rope_tables(T, il)
    qa = np.empty((N, m.q_lora), dtype=np.float32)          # the normed compressed query (attn_q_b's input)
    q_nope = np.empty((N, H, m.nope), dtype=np.float32)     # attn_k_b's input
    model.workers.map(partial(_qkv_rows, model, st, p, cos, sin, qa, q_nope), ranges)
    if hook is not None:
        hook((p + "attn_q.weight",) if not m.q_lora else (p + "attn_q_a.weight",), st.h)
        hook((p + "attn_kv_a_mqa.weight",), st.h)
        if m.q_lora:
            hook((p + "attn_q_b.weight",), qa)
        hook((p + "attn_k_b.weight",), q_nope.reshape(N, H * m.nope))
    D, Dv = cfg.head_dim, cfg.head_dim_v
    model._attention(st.q.reshape(B, T, H, D), st.k.reshape(B, T, 1, D), st.v.reshape(B, T, 1, Dv), il, st.o)
    latent = st.o.reshape(N, H, Dv)
    if hook is not None:
        hook((p + "attn_v_b.weight",), latent.reshape(N, H * Dv))
    a_in = np.empty((N, H * m.v_dim), dtype=np.float32)
    model.workers.map(partial(_v_b_rows, model, p, latent, a_in), ranges)
    if hook is not None:
        hook((p + "attn_output.weight",), a_in)
    (aa,) = model._linears(a_in, (p + "attn_output.weight",))
    model.workers.map(partial(model._attn_residual_rows, st, p, aa), ranges)   # + residual, ffn_norm -> st.h
    if hook is not None:
        hook((p + "ffn_gate.weight", p + "ffn_up.weight") if il < m.n_dense else (p + "ffn_gate_inp.weight",), st.h)
    if il < m.n_dense:
        g, u = model._linears(st.h, (p + "ffn_gate.weight", p + "ffn_up.weight"))
        act = silu(g) * u
        if hook is not None:
            hook((p + "ffn_down.weight",), act)
        st.x += model._linears(act, (p + "ffn_down.weight",))[0]
        return
    out = moe(model, st.h, p, hook)
    if m.n_shared:
        g, u = model._linears(st.h, (p + "ffn_gate_shexp.weight", p + "ffn_up_shexp.weight"))
        act = silu(g) * u
        if hook is not None:
            hook((p + "ffn_gate_shexp.weight", p + "ffn_up_shexp.weight"), st.h)
            hook((p + "ffn_down_shexp.weight",), act)
        out += model._linears(act, (p + "ffn_down_shexp.weight",))[0]
    st.x += out


def _qkv_rows(model: "Model", st: "_PassState", p: str, cos: np.ndarray, sin: np.ndarray, qa: np.ndarray,
              q_nope: np.ndarray, rows: tuple[int, int]) -> None:
    """Rows r0:r1: attention norm (-> st.h), the query (absorbed nope part | rotated rope part -> st.q), the shared
    key (normed latent | rotated k_pe -> st.k, float16-rounded) and the value (the latent part -> st.v)."""
    cfg = model.cfg
    m = cfg.mla
    assert m is not None
    r0, r1 = rows
    H, n = cfg.n_head, r1 - r0
    hh = rms_norm(st.x[r0:r1], model.w[p + "attn_norm.weight"], cfg.rms_eps)
    st.h[r0:r1] = hh
    if m.q_lora:
        (qa_in,) = model._linears(hh, (p + "attn_q_a.weight",), parallel=False)
        qc = rms_norm(qa_in, model.w[p + "attn_q_a_norm.weight"], cfg.rms_eps)
        qa[r0:r1] = qc
        q = model._linears(qc, (p + "attn_q_b.weight",), parallel=False)[0]
    else:
        q = model._linears(hh, (p + "attn_q.weight",), parallel=False)[0]
    q = q.reshape(n, H, m.nope + m.rope)
    q_nope[r0:r1] = q[:, :, :m.nope]
    kv = model._linears(hh, (p + "attn_kv_a_mqa.weight",), parallel=False)[0]
    c = cos[st.pos[r0:r1]][:, None, :]
    s = sin[st.pos[r0:r1]][:, None, :]
    q_pe = apply_rope(np.ascontiguousarray(q[:, :, m.nope:]), c, s, m.rope, False)
    k_pe = apply_rope(kv[:, None, m.kv_lora:], c, s, m.rope, False)[:, 0]
    latent = rms_norm(kv[:, :m.kv_lora], model.w[p + "attn_kv_a_norm.weight"], cfg.rms_eps)
    qq = st.q[r0:r1]
    for h in range(H):   # attn_k_b: one (nope -> kv_lora) matrix per head
        qq[:, h, :m.kv_lora] = _per_head(model, np.ascontiguousarray(q_nope[r0:r1, h]), p + "attn_k_b.weight", h)
    qq[:, :, m.kv_lora:] = q_pe
    k = np.concatenate([latent, k_pe], axis=1)
    if model.kv_f16:   # llama.cpp's KV cache is float16; the value is a view of the key's latent part
        k = k.astype(np.float16).astype(np.float32)
    st.k[r0:r1, 0] = k
    st.v[r0:r1, 0] = k[:, :m.kv_lora]


def _per_head(model: "Model", x: np.ndarray, name: str, h: int) -> np.ndarray:
    """x @ W[h].T for head h's matrix of a per-head 3-D weight (attn_k_b / attn_v_b), in the calling thread."""
    return model._products(x, (name,), h, parallel=False)[0]


def _v_b_rows(model: "Model", p: str, latent: np.ndarray, out: np.ndarray, rows: tuple[int, int]) -> None:
    """Rows r0:r1: each head's latent attention output decompressed by its attn_v_b matrix (-> out, heads side by
    side)."""
    m = model.cfg.mla
    assert m is not None
    r0, r1 = rows
    o = out[r0:r1].reshape(r1 - r0, -1, m.v_dim)
    for h in range(latent.shape[1]):
        o[:, h] = _per_head(model, np.ascontiguousarray(latent[r0:r1, h]), p + "attn_v_b.weight", h)


# --- mixture of experts


def route(cfg: "ModelConfig", logits: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """build_moe_ffn's expert choice: (selected experts (N, k), their weights (N, k)) from the router logits."""
    m = cfg.mla
    assert m is not None
    if m.gating == GATING_SIGMOID:
        probs = (np.float32(1) / (np.float32(1) + np.exp(-logits))).astype(np.float32)
    else:
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True, dtype=np.float32)
    sel_probs = probs + bias if bias is not None else probs   # the bias steers the choice, not the weights
    N, E = probs.shape
    if m.n_groups > 1 and N:
        G = m.n_groups
        groups = sel_probs.reshape(N, G, E // G)
        top2 = -np.sort(-groups, axis=2)[:, :, :2]
        score = top2[:, :, 0] + top2[:, :, 1]
        keep = np.argsort(-score, axis=1, kind="stable")[:, :m.n_group_used]
        masked = np.full_like(groups, -np.inf)
        rows = np.arange(N)[:, None]
        masked[rows, keep] = groups[rows, keep]
        sel_probs = masked.reshape(N, E)
    sel = np.argsort(-sel_probs, axis=1, kind="stable")[:, :cfg.n_expert_used]     # ggml_argsort_top_k
    weights = np.take_along_axis(probs, sel, axis=1)
    if m.weights_norm:
        total = np.zeros(N, dtype=np.float32)
        for j in range(weights.shape[1]):   # ggml_sum_rows: in order
            total += weights[:, j]
        weights = weights / np.maximum(total, np.float32(6.103515625e-5))[:, None]
    if cfg.expert_weights_scale not in (0.0, 1.0):
        weights = weights * np.float32(cfg.expert_weights_scale)
    return sel, weights.astype(np.float32)


def moe(model: "Model", h: np.ndarray, p: str, hook: "Hook | None") -> np.ndarray:
    """The routed experts' weighted sum for the normed rows h; the experts' inputs go to ``hook.experts``."""
    from .forward import ExpertHook

    cfg = model.cfg
    logits = model._matmul(h, p + "ffn_gate_inp.weight")
    bias = model.w[p + "exp_probs_b.bias"] if p + "exp_probs_b.bias" in model.w else None
    sel, weights = route(cfg, logits, bias)
    collect = hook.experts if isinstance(hook, ExpertHook) else None
    out = np.zeros_like(h)
    for res in model.workers.map(partial(model._expert_ffn, h, p, sel, weights), range(cfg.n_expert)):
        if res is None:
            continue
        e, rows, xe, a, y = res
        out[rows] += y
        if collect is not None:
            collect((p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight"), e, xe, cfg.n_expert)
            collect((p + "ffn_down_exps.weight",), e, a, cfg.n_expert)
    return out

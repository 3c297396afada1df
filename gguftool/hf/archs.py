"""One readable table per supported Hugging Face architecture: metadata, tensor names, transforms.

What llama.cpp's ``convert_hf_to_gguf.py`` (``conversion/base.py`` TextModel, ``llama.py``, ``qwen.py``,
``gemma.py``) writes for each architecture, restated as data:

- ``defaults``: the value transformers' config class gives a key that config.json leaves out. llama.cpp reads
  the config through ``AutoConfig.from_pretrained(...).to_dict()``, so these defaults reach the GGUF (for
  example ``head_dim`` -> ``attention.key_length``); the values are those of transformers 5.x.
- ``tensors``: HF tensor name (``{bid}`` = layer) -> GGUF name, as gguf-py's ``tensor_mapping`` maps them.
- transforms: Q/K permutation (llama), +1 on RMSNorm weights (Gemma), vocabulary trimming (Gemma3), generated
  ``rope_freqs`` (Llama 3 rope scaling).

``hyperparameters(arch, config)`` builds the per-architecture KV list in llama.cpp's order; duplicated keys keep
their first position and their last value (what gguf-py's ``GGUFWriter.add_key_value`` does).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import ConvertError
from ..gguf.constants import GGUFValueType
from ..gguf.values import KV
from .gptoss import GptOssExperts
from .schema import U32_MAX, Bool, Int, ListOf, Num, Obj, Str, checked, show


# --- ordered KV list with gguf-py's overwrite semantics
class KVList:
    """Insertion-ordered KVs; setting an existing key replaces its value but keeps its position."""

    def __init__(self):
        self._kv: dict[str, KV] = {}

    def set(self, key: str, vtype: GGUFValueType, value: Any) -> None:
        self._kv[key] = KV(key, vtype, value)

    def u32(self, key: str, value: int) -> None:
        self.set(key, GGUFValueType.UINT32, int(_present(key, value)))

    def f32(self, key: str, value: float) -> None:
        self.set(key, GGUFValueType.FLOAT32, float(_present(key, value)))

    def string(self, key: str, value: str) -> None:
        self.set(key, GGUFValueType.STRING, str(value))

    def boolean(self, key: str, value: bool) -> None:
        self.set(key, GGUFValueType.BOOL, bool(value))

    def remove(self, key: str) -> None:
        self._kv.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._kv

    def get(self, key: str, default=None):
        kv = self._kv.get(key)
        return default if kv is None else kv.value

    def extend(self, kvs) -> None:
        for kv in kvs:
            self._kv[kv.key] = kv

    def items(self) -> list[KV]:
        return list(self._kv.values())


def _present(key: str, value):
    if value is None:  # a config key the architecture needs was null (the schema has checked the types)
        raise ConvertError(f"{CONFIG}: no value for {key} (the config key it comes from is null)")
    return value


# --- hyperparameters as llama.cpp sees them
def head_dim(hp: dict) -> int:
    """The attention head size: config's head_dim, else hidden_size / num_attention_heads."""
    return hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]


def expert_count(hp: dict):
    """The MoE expert count as llama.cpp's converter finds it (None for a dense model)."""
    return _find(hp, ["num_local_experts", "num_experts", "n_routed_experts"])


def _find(hp: dict, keys, default=None):
    for k in keys:
        if k in hp:
            return hp.get(k)   # llama.cpp's find_hparam: the first key present, even when null
    return default


def _find_required(hp: dict, keys):
    """_find for a value the architecture cannot do without."""
    v = _find(hp, keys)
    if v is None:
        raise ConvertError(f"{CONFIG}: no value for {' / '.join(map(repr, keys))}")
    return v


# --- config.json: the type and range of every key gguftool reads, checked before any is used
CONFIG = "config.json"
_COUNT = Int(min=1, max=U32_MAX)     # written as uint32 metadata
_POSITIVE = Num(gt=0)
_GATING_FUNCS = {"softmax": 1, "sigmoid": 2, "sqrtsoftplus": 4}  # gguf-py ExpertGatingFuncType
_CONFIG_SCHEMA = Obj({
    **{k: _COUNT for k in (
        "hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "num_key_value_heads", "head_dim",
        "intermediate_size", "max_position_embeddings", "n_ctx", "n_positions", "max_length",
        "max_sequence_length", "model_max_length", "prefix_dense_intermediate_size", "dense_intermediate_size",
        "n_inner", "hidden_dim", "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
        "num_experts_per_token", "top_k_experts", "n_group", "topk_group", "moe_intermediate_size",
        "shared_expert_intermediate_size", "original_max_position_embeddings", "sliding_window_pattern",
        "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")},
    **{k: Int(min=0, max=U32_MAX) for k in ("sliding_window", "first_k_dense_replace", "n_shared_experts")},
    "routed_scaling_factor": Num(),
    **{k: _POSITIVE for k in ("rms_norm_eps", "norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon",
                              "rope_theta", "rope_local_base_freq", "attn_logit_softcapping",
                              "final_logit_softcapping")},
    "partial_rotary_factor": Num(gt=0, le=1),
    **{k: Bool() for k in ("is_causal", "use_sliding_window", "tie_word_embeddings", "use_bidirectional_attention",
                           "norm_topk_prob")},
    **{k: Str(tuple(_GATING_FUNCS)) for k in ("score_function", "scoring_func", "score_func", "moe_router_activation",
                                              "moe_router_activation_func", "expert_selection_fn")},
    **{k: Obj() for k in ("text_config", "rope_scaling", "rope_parameters")},
})

# transformers' rope types (ROPE_INIT_FUNCTIONS, plus Phi-3's legacy "su"), with the keys each one needs
_ROPE_KEYS = {
    "factor": _POSITIVE, "rope_theta": _POSITIVE, "original_max_position_embeddings": _COUNT,
    "low_freq_factor": _POSITIVE, "high_freq_factor": _POSITIVE, "beta_fast": Num(), "beta_slow": Num(),
    "extrapolation_factor": Num(), "attention_factor": _POSITIVE, "attn_factor": _POSITIVE,
    "partial_rotary_factor": Num(gt=0, le=1), "long_factor": ListOf(_POSITIVE, 1),
    "short_factor": ListOf(_POSITIVE, 1), "mscale": Num(), "mscale_all_dim": Num(),
}
_ROPE_REQUIRED = {"default": (), "linear": ("factor",), "dynamic": ("factor",), "llama3": ("factor",),
                  "yarn": ("factor", "original_max_position_embeddings"),
                  "longrope": ("long_factor", "short_factor"), "su": ("long_factor", "short_factor")}


def _check_rope(where: str, rp: dict) -> None:
    """One rope parameter set (``where``: the config.json key it came from) checked for its rope type. Its null
    entries are dropped: as for every config key, null means "the default"."""
    for k in [k for k, v in rp.items() if v is None]:
        del rp[k]
    kind = rp.get("rope_type")
    if not isinstance(kind, str) or kind.lower() not in _ROPE_REQUIRED:
        raise ConvertError(f'{CONFIG}: "{where}.rope_type" must be one of {", ".join(_ROPE_REQUIRED)}, '
                           f'got {show(kind)}')
    Obj(_ROPE_KEYS, required=_ROPE_REQUIRED[kind.lower()]).check(CONFIG, where, rp)
    if kind.lower() == "llama3" and not rp.get("high_freq_factor", 4.0) > rp.get("low_freq_factor", 1.0):
        raise ConvertError(f'{CONFIG}: "{where}.high_freq_factor" must be greater than low_freq_factor, got '
                           f'{show(rp.get("high_freq_factor", 4.0))} and {show(rp.get("low_freq_factor", 1.0))}')


class HParams(dict):
    """The normalized config: every value has been checked against the schema; reading a key the model needs
    (``hp[key]``) that config.json leaves out or sets to null is an error naming it, not a KeyError."""

    def __getitem__(self, key: str):
        value = self.get(key)
        if value is None:
            raise ConvertError(f'{CONFIG}: "{key}" is missing')
        return value


def is_raw_config(arch: "Arch", config: dict) -> bool:
    """Whether llama.cpp's converter reads this config.json as it is: its model_type is not one transformers'
    config class for the architecture knows (Kimi-K2's "kimi_k2" on DeepseekV3ForCausalLM, whose configuration
    class is remote code), so ``AutoConfig.from_pretrained(trust_remote_code=False)`` fails and
    ``ModelBase.load_hparams`` falls back to the JSON: no class defaults, no derived head_dim. (A config.json
    without a model_type keeps the class defaults, as for every other architecture here.)"""
    model_type = config.get("model_type")
    return bool(arch.config_model_types) and model_type is not None and model_type not in arch.config_model_types


def normalized_config(arch: "Arch", config: dict) -> dict:
    """config.json as ``AutoConfig(...).to_dict()`` + TextModel.__init__ present it to llama.cpp's converter.

    Fills the config class's defaults, derives ``head_dim`` / ``num_key_value_heads`` as transformers does and
    folds the legacy ``rope_theta`` / ``rope_scaling`` keys into ``rope_parameters``.
    """
    checked(CONFIG, config, _CONFIG_SCHEMA)
    hp = dict(config)
    if isinstance(hp.get("text_config"), dict):
        _CONFIG_SCHEMA.check(CONFIG, "text_config", hp["text_config"])
        hp = {**hp, **hp["text_config"]}
    raw = is_raw_config(arch, hp)
    if not raw:   # AutoConfig's class: its attribute_map and defaults
        for alias, key in arch.aliases.items():
            if alias in hp:
                hp[key] = hp.pop(alias)
        for k, v in arch.defaults.items():
            if hp.get(k) is None and k not in ("head_dim", "num_key_value_heads"):
                hp[k] = v
    for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if hp.get(k) is None:
            raise ConvertError(f'{CONFIG}: "{k}" is missing')
    if hp.get("head_dim") is None and not raw:   # (read as it is, config.json has a head_dim only if it says so)
        d = arch.defaults.get("head_dim")
        if d is not None:
            hp["head_dim"] = d
        elif arch.derive_head_dim:  # transformers' __post_init__: hidden_size // num_attention_heads
            hp["head_dim"] = hp["hidden_size"] // hp["num_attention_heads"]
        else:  # the config class has no head_dim (Qwen2): llama.cpp writes no key/value length
            hp.pop("head_dim", None)
    if hp.get("num_key_value_heads") is None and not raw:
        d = arch.defaults.get("num_key_value_heads")
        hp["num_key_value_heads"] = d if d is not None else hp["num_attention_heads"]
    post = arch.raw_post_config if raw else arch.post_config
    if post is not None:
        post(hp)
    source = "rope_parameters" if isinstance(hp.get("rope_parameters"), dict) and hp["rope_parameters"] \
        else "rope_scaling"
    rope = hp["rope_parameters"] = arch.rope_parameters(hp)
    if "full_attention" in rope or "sliding_attention" in rope:
        for part, rp in rope.items():
            if not isinstance(rp, dict):
                raise ConvertError(f'{CONFIG}: "{source}.{part}" must be an object, got {show(rp)}')
            _check_rope(source if source == "rope_scaling" else f"{source}.{part}", rp)
    else:
        _check_rope(source, rope)
    return HParams(hp)


def _rope_parameters_single(hp: dict) -> dict:
    """transformers 5's standardisation of rope_theta + rope_scaling for single-rope models (llama, qwen)."""
    rp = hp.get("rope_parameters")
    if isinstance(rp, dict) and rp:
        rp = dict(rp)
    else:
        scaling = hp.get("rope_scaling")
        rp = dict(scaling) if isinstance(scaling, dict) else {}
    rp.setdefault("rope_theta", hp.get("rope_theta", 10000.0) if hp.get("rope_theta") is not None else 10000.0)
    if "rope_type" not in rp:
        rp["rope_type"] = rp.get("type", "default")
    for k in ("rope_theta", "rope_scaling", "rope_local_base_freq"):
        hp.pop(k, None)
    return rp


def _rope_parameters_gemma3(hp: dict) -> dict:
    """Gemma3: separate global (full attention) and local (sliding) rope; rope_scaling applies to global."""
    rp = hp.get("rope_parameters")
    if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
        return rp
    scaling = hp.get("rope_scaling")
    full = dict(scaling) if isinstance(scaling, dict) else {}
    if "rope_type" not in full:
        full["rope_type"] = full.get("type", "default")
    full["rope_theta"] = hp.get("rope_theta") if hp.get("rope_theta") is not None else 1_000_000.0
    local_theta = hp.get("rope_local_base_freq")
    local = {"rope_type": "default", "rope_theta": local_theta if local_theta is not None else 10_000.0}
    for k in ("rope_theta", "rope_scaling", "rope_local_base_freq"):
        hp.pop(k, None)
    return {"sliding_attention": local, "full_attention": full}


def _qwen_post(hp: dict) -> None:
    if not hp.get("use_sliding_window", False):
        hp["sliding_window"] = None


def _gemma3_post(hp: dict) -> None:
    if hp.get("use_bidirectional_attention"):
        pass  # to_dict() writes back the value given, so nothing changes for llama.cpp


# --- the KV list of TextModel.set_gguf_parameters (conversion/base.py), then each architecture's additions
def _text_model_params(arch: "Arch", hp: dict, kv: KVList) -> None:
    a = arch.gguf_arch
    kv.u32(f"{a}.block_count", hp["num_hidden_layers"])
    n_ctx = _find(hp, ["max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                       "model_max_length"])
    if n_ctx is not None:
        kv.u32(f"{a}.context_length", n_ctx)
    kv.u32(f"{a}.embedding_length", hp["hidden_size"])
    n_ff = _find(hp, ["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner",
                      "hidden_dim"])
    if n_ff is not None:
        kv.u32(f"{a}.feed_forward_length", n_ff)
    kv.u32(f"{a}.attention.head_count", hp["num_attention_heads"])
    kv.u32(f"{a}.attention.head_count_kv", hp["num_key_value_heads"])
    if hp.get("is_causal") is False:
        kv.boolean(f"{a}.attention.causal", False)

    rope_all = hp["rope_parameters"]
    rope = rope_all.get("full_attention", rope_all)
    rope_type = rope.get("rope_type")
    if rope_type is not None:
        factor = rope.get("factor")
        if rope_type == "linear" and factor is not None:
            kv.string(f"{a}.rope.scaling.type", "linear")
            kv.f32(f"{a}.rope.scaling.factor", factor)
        elif rope_type == "yarn" and factor is not None:
            kv.string(f"{a}.rope.scaling.type", "yarn")
            kv.f32(f"{a}.rope.scaling.factor", factor)
            kv.u32(f"{a}.rope.scaling.original_context_length", rope["original_max_position_embeddings"])
            for src, dst in (("extrapolation_factor", "yarn_ext_factor"), ("beta_fast", "yarn_beta_fast"),
                             ("beta_slow", "yarn_beta_slow")):
                if rope.get(src) is not None:
                    kv.f32(f"{a}.rope.scaling.{dst}", rope[src])
            attn = rope.get("attention_factor", rope.get("attn_factor"))
            if attn is not None:
                kv.f32(f"{a}.rope.scaling.yarn_attn_factor", attn)
        elif rope_type in ("su", "longrope"):
            kv.string(f"{a}.rope.scaling.type", "longrope")
    if rope.get("rope_theta") is not None:
        kv.f32(f"{a}.rope.freq_base", rope["rope_theta"])
    local_theta = rope_all.get("sliding_attention", {}).get("rope_theta")
    if local_theta is not None:
        kv.f32(f"{a}.rope.freq_base_swa", local_theta)
    eps = _find(hp, ["rms_norm_eps", "norm_eps"])
    if eps is not None:
        kv.f32(f"{a}.attention.layer_norm_rms_epsilon", eps)
    eps = _find(hp, ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"])
    if eps is not None:
        kv.f32(f"{a}.attention.layer_norm_epsilon", eps)
    n_expert = expert_count(hp)
    if n_expert is not None:
        kv.u32(f"{a}.expert_count", n_expert)
    n_used = _find(hp, ["num_experts_per_tok", "num_experts_per_token", "top_k_experts"])
    if n_used is not None:
        kv.u32(f"{a}.expert_used_count", n_used)
    if hp.get("n_group") is not None:
        kv.u32(f"{a}.expert_group_count", hp["n_group"])
    if hp.get("topk_group") is not None:
        kv.u32(f"{a}.expert_group_used_count", hp["topk_group"])
    score = _find(hp, ["score_function", "scoring_func", "score_func", "moe_router_activation",
                       "moe_router_activation_func", "expert_selection_fn"])
    if score is not None:
        if score not in _GATING_FUNCS:
            raise ConvertError(f"config.json: unsupported expert score function {score!r}")
        kv.u32(f"{a}.expert_gating_func", _GATING_FUNCS[score])
    if hp.get("head_dim") is not None:
        kv.u32(f"{a}.attention.key_length", hp["head_dim"])
        kv.u32(f"{a}.attention.value_length", hp["head_dim"])
    kv.u32("general.file_type", 0)  # ALL_F32: the reference is `convert_hf_to_gguf.py --outtype f32`


def _llama_params(arch: "Arch", hp: dict, kv: KVList) -> None:
    # LlamaModel.set_gguf_parameters (conversion/llama.py)
    _text_model_params(arch, hp, kv)
    kv.u32(f"{arch.gguf_arch}.vocab_size", hp["vocab_size"])
    kv.u32(f"{arch.gguf_arch}.rope.dimension_count", head_dim(hp))


def _qwen_params(arch: "Arch", hp: dict, kv: KVList) -> None:
    # Qwen2Model / Qwen3Model: the TextModel keys (pooling type only for sentence-transformers folders)
    _text_model_params(arch, hp, kv)


def _qwen_moe_params(arch: "Arch", hp: dict, kv: KVList) -> None:
    # Qwen2MoeModel.set_gguf_parameters (conversion/qwen.py): the expert FFN sizes after the TextModel keys
    _text_model_params(arch, hp, kv)
    if hp.get("moe_intermediate_size") is not None:
        kv.u32(f"{arch.gguf_arch}.expert_feed_forward_length", hp["moe_intermediate_size"])
    if hp.get("shared_expert_intermediate_size") is not None:
        kv.u32(f"{arch.gguf_arch}.expert_shared_feed_forward_length", hp["shared_expert_intermediate_size"])


def _rope_parameters_phi3(hp: dict) -> dict:
    """As for llama, plus what TextModel.__init__ mirrors into the rope parameters (original context length,
    partial rotary factor), which Phi3MiniModel reads from there."""
    orig, partial = hp.get("original_max_position_embeddings"), hp.get("partial_rotary_factor")
    rp = _rope_parameters_single(hp)
    if "original_max_position_embeddings" not in rp and orig is not None:
        rp["original_max_position_embeddings"] = orig
    if "partial_rotary_factor" not in rp and partial is not None:
        rp["partial_rotary_factor"] = partial
    return rp


def phi3_rope_dims(hp: dict) -> int:
    rp = hp["rope_parameters"]
    return int(rp.get("partial_rotary_factor", 1.0) * hp["hidden_size"]) // hp["num_attention_heads"]


def _phi3_params(arch: "Arch", hp: dict, kv: KVList) -> None:
    # Phi3MiniModel.set_gguf_parameters (conversion/phi.py): its own list, not TextModel's
    a, rp = arch.gguf_arch, hp["rope_parameters"]
    if rp.get("original_max_position_embeddings") is None:
        raise ConvertError("config.json: original_max_position_embeddings is missing (Phi-3 needs it)")
    kv.u32(f"{a}.context_length", _find_required(hp, ["n_positions", "max_position_embeddings"]))
    kv.u32(f"{a}.rope.scaling.original_context_length", rp["original_max_position_embeddings"])
    kv.u32(f"{a}.embedding_length", hp["hidden_size"])
    kv.u32(f"{a}.feed_forward_length", hp["intermediate_size"])
    kv.u32(f"{a}.block_count", hp["num_hidden_layers"])
    kv.u32(f"{a}.attention.head_count", hp["num_attention_heads"])
    kv.u32(f"{a}.attention.head_count_kv", hp["num_key_value_heads"])
    kv.f32(f"{a}.attention.layer_norm_rms_epsilon", hp["rms_norm_eps"])
    kv.u32(f"{a}.rope.dimension_count", phi3_rope_dims(hp))
    kv.f32(f"{a}.rope.freq_base", rp["rope_theta"])
    kv.u32("general.file_type", 0)
    kv.u32(f"{a}.attention.sliding_window", hp.get("sliding_window") or 0)


def phi3_rope_factors(hp: dict) -> tuple[list[KV], list[tuple[str, np.ndarray]]]:
    """Phi3MiniModel.generate_extra_tensors: for LongRoPE (or YaRN) scaling, the attention factor key and the
    rope_factors_long / rope_factors_short tensors; nothing without long factors."""
    rp = hp["rope_parameters"]
    long_f, short_f = rp.get("long_factor"), rp.get("short_factor")
    if not long_f:
        return [], []
    orig = rp.get("original_max_position_embeddings")
    if orig is None:
        raise ConvertError(f'{CONFIG}: "original_max_position_embeddings" is missing (Phi-3 rope scaling needs it)')
    scale = _find_required(hp, ["n_positions", "max_position_embeddings"]) / orig
    kind = str(rp.get("rope_type", "")).lower()
    if scale > 1.0 and orig <= 1:   # the attention factor divides by log(orig)
        raise ConvertError(f'{CONFIG}: "original_max_position_embeddings" must be greater than 1 for rope '
                           f'scaling, got {orig}')
    if kind in ("su", "longrope"):
        attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise ConvertError(f"config.json: rope scaling type {kind!r} with long_factor is not supported")
    n = phi3_rope_dims(hp) / 2
    if short_f is None or len(long_f) != len(short_f) or len(long_f) != n:
        raise ConvertError(f"config.json: rope long_factor and short_factor must both have {n:g} values "
                           f"(got {len(long_f)} and {len(short_f) if short_f is not None else 'none'})")
    kv = KVList()
    kv.f32("phi3.rope.scaling.attn_factor", attn)
    return kv.items(), [("rope_factors_long.weight", np.asarray(long_f, dtype=np.float32)),
                        ("rope_factors_short.weight", np.asarray(short_f, dtype=np.float32))]


def _gemma2_params(arch: "Arch", hp: dict, kv: KVList) -> None:
    # Gemma2Model.set_gguf_parameters (conversion/gemma.py): its own list, not TextModel's
    a = arch.gguf_arch
    kv.u32(f"{a}.context_length", hp["max_position_embeddings"])
    kv.u32(f"{a}.embedding_length", hp["hidden_size"])
    kv.u32(f"{a}.block_count", hp["num_hidden_layers"])
    kv.u32(f"{a}.feed_forward_length", hp["intermediate_size"])
    kv.u32(f"{a}.attention.head_count", hp["num_attention_heads"])
    kv.u32(f"{a}.attention.head_count_kv", hp["num_key_value_heads"])
    kv.f32(f"{a}.attention.layer_norm_rms_epsilon", hp["rms_norm_eps"])
    kv.u32(f"{a}.attention.key_length", hp["head_dim"])
    kv.u32(f"{a}.attention.value_length", hp["head_dim"])
    kv.u32("general.file_type", 0)
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
        if hp.get(key) is None:
            raise ConvertError(f"config.json: {key} is null, but Gemma2 needs a value")
    kv.f32(f"{a}.attn_logit_softcapping", hp["attn_logit_softcapping"])
    kv.f32(f"{a}.final_logit_softcapping", hp["final_logit_softcapping"])
    kv.u32(f"{a}.attention.sliding_window", hp["sliding_window"])


def _gemma3_params(arch: "Arch", hp: dict, kv: KVList) -> None:
    # Gemma3Model.set_gguf_parameters (conversion/gemma.py): re-sets some keys (same position, new value)
    a = arch.gguf_arch
    _text_model_params(arch, hp, kv)
    kv.u32(f"{a}.context_length", hp.get("max_position_embeddings", 131072))
    kv.u32(f"{a}.attention.head_count", hp.get("num_attention_heads", 8))
    kv.f32(f"{a}.attention.layer_norm_rms_epsilon", hp.get("rms_norm_eps", 1e-6))
    kv.u32(f"{a}.attention.key_length", hp.get("head_dim", 256))
    kv.u32(f"{a}.attention.value_length", hp.get("head_dim", 256))
    rope = hp["rope_parameters"]
    kv.f32(f"{a}.rope.freq_base", rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    if hp.get("attn_logit_softcapping") is not None:
        raise ConvertError("config.json: attn_logit_softcapping is set, but Gemma3 has none")
    if hp.get("final_logit_softcapping"):
        kv.f32(f"{a}.final_logit_softcapping", hp["final_logit_softcapping"])
    if hp.get("sliding_window_pattern") != 1:
        if hp.get("sliding_window") is None:
            raise ConvertError("config.json: sliding_window is missing")
        kv.u32(f"{a}.attention.sliding_window", hp["sliding_window"])
    kv.u32(f"{a}.attention.head_count_kv", hp.get("num_key_value_heads", 4))


def _deepseek2_post(hp: dict) -> None:
    """DeepseekV2Config / DeepseekV3Config as to_dict() presents them: head_dim is qk_rope_head_dim (so TextModel
    writes a key/value length that DeepseekV2Model then overwrites in place); q_lora_rank keeps an explicit null
    (DeepSeek-V2-Lite: no query compression) and takes the class default only when config.json leaves it out."""
    if "q_lora_rank" not in hp:
        hp["q_lora_rank"] = 1536
    hp["head_dim"] = hp["qk_rope_head_dim"]


def _deepseek2_raw_post(hp: dict) -> None:
    """A DeepSeek config.json read as it is (is_raw_config: Kimi-K2): only DeepseekV2Model's own fallback applies
    (rms_norm_eps 1e-6); a missing q_lora_rank means none, and TextModel writes no key/value length."""
    if "rms_norm_eps" not in hp:
        hp["rms_norm_eps"] = 1e-6


def mla_dims(hp: dict) -> tuple[int, int, int, int]:
    """(kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim) of a DeepSeek-V2/V3 config."""
    return (hp.get("kv_lora_rank") or 512, hp["qk_nope_head_dim"], hp["qk_rope_head_dim"], hp["v_head_dim"])


def dense_lead_layers(hp: dict) -> int:
    """first_k_dense_replace: the leading layers with a dense FFN (all of them for a model without experts)."""
    k = hp.get("first_k_dense_replace")
    if k is None:
        return hp["num_hidden_layers"] if hp.get("n_routed_experts") is None else 0
    return k


def _deepseek2_params(arch: "Arch", hp: dict, kv: KVList) -> None:
    # DeepseekV2Model.set_gguf_parameters (conversion/deepseek.py): MLA is written as MQA (one KV head) whose key
    # is the compressed KV plus the rope part, decompressed per head by attn_k_b / attn_v_b
    a = arch.gguf_arch
    _text_model_params(arch, HParams({**hp, "num_key_value_heads": 1}), kv)
    kv.u32(f"{a}.leading_dense_block_count", dense_lead_layers(hp))
    kv_lora, nope, rope, v_dim = mla_dims(hp)
    kv.u32(f"{a}.vocab_size", hp["vocab_size"])
    if hp.get("q_lora_rank") is not None:
        kv.u32(f"{a}.attention.q_lora_rank", hp["q_lora_rank"])
    kv.u32(f"{a}.attention.kv_lora_rank", kv_lora)
    kv.u32(f"{a}.attention.key_length", kv_lora + rope)
    kv.u32(f"{a}.attention.value_length", kv_lora)
    kv.u32(f"{a}.attention.key_length_mla", nope + rope)
    kv.u32(f"{a}.attention.value_length_mla", v_dim)
    kv.u32(f"{a}.expert_feed_forward_length", _find_required(hp, ["moe_intermediate_size", "intermediate_size"]))
    if hp.get("n_routed_experts") is not None:
        kv.u32(f"{a}.expert_count", hp["n_routed_experts"])
    kv.u32(f"{a}.expert_shared_count", hp.get("n_shared_experts") or 0)
    if hp.get("routed_scaling_factor") is not None:
        kv.f32(f"{a}.expert_weights_scale", hp["routed_scaling_factor"])
    if hp.get("norm_topk_prob"):
        kv.boolean(f"{a}.expert_weights_norm", True)
    kv.u32(f"{a}.rope.dimension_count", rope)
    mscale_all = hp["rope_parameters"].get("mscale_all_dim")
    if mscale_all is not None:
        # stored as 0.1 * mscale_all_dim, which llama.cpp divides back (TAG_DEEPSEEK2_YARN_LOG_MUL_FIX)
        kv.f32(f"{a}.rope.scaling.yarn_log_multiplier", 0.1 * mscale_all)


def _gptoss_params(arch: "Arch", hp: dict, kv: KVList) -> None:
    # GptOssModel.set_gguf_parameters (conversion/gpt_oss.py): the TextModel keys, the sliding window (llama.cpp
    # alternates sliding / full layers itself: the layer_types list is not written), the expert FFN width
    _text_model_params(arch, hp, kv)
    kv.u32(f"{arch.gguf_arch}.attention.sliding_window", hp["sliding_window"])
    kv.u32(f"{arch.gguf_arch}.expert_feed_forward_length", hp["intermediate_size"])


# --- tensor name tables (gguf-py tensor_mapping for each architecture)
_COMMON_TENSORS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{bid}.input_layernorm": "blk.{bid}.attn_norm",
    "model.layers.{bid}.self_attn.q_proj": "blk.{bid}.attn_q",
    "model.layers.{bid}.self_attn.k_proj": "blk.{bid}.attn_k",
    "model.layers.{bid}.self_attn.v_proj": "blk.{bid}.attn_v",
    "model.layers.{bid}.self_attn.o_proj": "blk.{bid}.attn_output",
    "model.layers.{bid}.mlp.gate_proj": "blk.{bid}.ffn_gate",
    "model.layers.{bid}.mlp.up_proj": "blk.{bid}.ffn_up",
    "model.layers.{bid}.mlp.down_proj": "blk.{bid}.ffn_down",
}

LLAMA_TENSORS = {**_COMMON_TENSORS, "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.ffn_norm"}
QWEN2_TENSORS = LLAMA_TENSORS
QWEN3_TENSORS = {**LLAMA_TENSORS,
                 "model.layers.{bid}.self_attn.q_norm": "blk.{bid}.attn_q_norm",
                 "model.layers.{bid}.self_attn.k_norm": "blk.{bid}.attn_k_norm"}
GEMMA2_TENSORS = {**_COMMON_TENSORS,
                  "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.post_attention_norm",
                  "model.layers.{bid}.pre_feedforward_layernorm": "blk.{bid}.ffn_norm",
                  "model.layers.{bid}.post_feedforward_layernorm": "blk.{bid}.post_ffw_norm"}
GEMMA3_TENSORS = {**_COMMON_TENSORS,
                  "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.post_attention_norm",
                  "model.layers.{bid}.pre_feedforward_layernorm": "blk.{bid}.ffn_norm",
                  "model.layers.{bid}.post_feedforward_layernorm": "blk.{bid}.post_ffw_norm",
                  "model.layers.{bid}.self_attn.q_norm": "blk.{bid}.attn_q_norm",
                  "model.layers.{bid}.self_attn.k_norm": "blk.{bid}.attn_k_norm"}

PHI3_TENSORS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{bid}.input_layernorm": "blk.{bid}.attn_norm",
    "model.layers.{bid}.self_attn.qkv_proj": "blk.{bid}.attn_qkv",
    "model.layers.{bid}.self_attn.o_proj": "blk.{bid}.attn_output",
    "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.ffn_norm",
    "model.layers.{bid}.mlp.gate_up_proj": "blk.{bid}.ffn_up",     # gate and up stacked: llama.cpp splits it
    "model.layers.{bid}.mlp.down_proj": "blk.{bid}.ffn_down",
}
GPTOSS_TENSORS = {**_COMMON_TENSORS,
                  "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.post_attention_norm",
                  "model.layers.{bid}.self_attn.sinks": "blk.{bid}.attn_sinks",   # written as attn_sinks.weight
                  "model.layers.{bid}.mlp.router": "blk.{bid}.ffn_gate_inp"}
MIXTRAL_TENSORS = {**LLAMA_TENSORS, "model.layers.{bid}.block_sparse_moe.gate": "blk.{bid}.ffn_gate_inp"}
QWEN3MOE_TENSORS = {**QWEN3_TENSORS, "model.layers.{bid}.mlp.gate": "blk.{bid}.ffn_gate_inp"}


DEEPSEEK2_TENSORS = {
    **{k: v for k, v in LLAMA_TENSORS.items() if ".self_attn." not in k or k.endswith(("q_proj", "o_proj"))},
    "model.layers.{bid}.self_attn.q_a_proj": "blk.{bid}.attn_q_a",
    "model.layers.{bid}.self_attn.q_a_layernorm": "blk.{bid}.attn_q_a_norm",
    "model.layers.{bid}.self_attn.q_b_proj": "blk.{bid}.attn_q_b",
    "model.layers.{bid}.self_attn.kv_a_proj_with_mqa": "blk.{bid}.attn_kv_a_mqa",
    "model.layers.{bid}.self_attn.kv_a_layernorm": "blk.{bid}.attn_kv_a_norm",
    "model.layers.{bid}.self_attn.k_b_proj": "blk.{bid}.attn_k_b",      # the two halves of kv_b_proj
    "model.layers.{bid}.self_attn.v_b_proj": "blk.{bid}.attn_v_b",
    "model.layers.{bid}.mlp.gate": "blk.{bid}.ffn_gate_inp",
    "model.layers.{bid}.mlp.gate.e_score_correction": "blk.{bid}.exp_probs_b",   # DeepSeek-V3 routing bias
    "model.layers.{bid}.mlp.shared_experts.gate_proj": "blk.{bid}.ffn_gate_shexp",
    "model.layers.{bid}.mlp.shared_experts.up_proj": "blk.{bid}.ffn_up_shexp",
    "model.layers.{bid}.mlp.shared_experts.down_proj": "blk.{bid}.ffn_down_shexp",
}


@dataclass(frozen=True)
class ExpertLayout:
    """How a MoE checkpoint stores its experts: a 2-D tensor per expert and projection, which llama.cpp's converter
    stacks into one 3-D tensor per projection (ggml shape (ne0, ne1, n_expert)) once it has seen every expert
    tensor of a layer, and writes at that point, in ``order``."""
    pattern: str          # full HF name, groups bid / xid / proj
    gguf: dict            # proj -> GGUF name ({bid})
    order: tuple          # projections in the order the merged tensors are written
    ff_key: str           # config key of the expert FFN width

    def match(self, hf_name: str):
        return re.fullmatch(self.pattern, hf_name)


QWEN_MOE_EXPERTS = ExpertLayout(
    r"model\.layers\.(?P<bid>\d+)\.mlp\.experts\.(?P<xid>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight",
    {"gate_proj": "blk.{bid}.ffn_gate_exps.weight", "up_proj": "blk.{bid}.ffn_up_exps.weight",
     "down_proj": "blk.{bid}.ffn_down_exps.weight"},
    ("down_proj", "gate_proj", "up_proj"), "moe_intermediate_size")
MIXTRAL_EXPERTS = ExpertLayout(
    r"model\.layers\.(?P<bid>\d+)\.block_sparse_moe\.experts\.(?P<xid>\d+)\.(?P<proj>w1|w2|w3)\.weight",
    {"w1": "blk.{bid}.ffn_gate_exps.weight", "w2": "blk.{bid}.ffn_down_exps.weight",
     "w3": "blk.{bid}.ffn_up_exps.weight"},
    ("w1", "w2", "w3"), "intermediate_size")

# names llama.cpp drops without mapping (prepare_tensors)
SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True)
class Arch:
    name: str                              # our label
    hf_names: tuple[str, ...]              # config.json "architectures"[0]
    gguf_arch: str                         # general.architecture
    defaults: dict                         # transformers config-class defaults (see module docstring)
    tensors: dict                          # HF name -> GGUF name (without .weight/.bias)
    params: Callable[["Arch", dict, KVList], None]
    rope_parameters: Callable[[dict], dict] = _rope_parameters_single
    post_config: Callable[[dict], None] | None = None
    # model_types transformers' config class reads (empty: any); another one (Kimi-K2's "kimi_k2") makes llama.cpp's
    # converter read config.json as it is (is_raw_config), then raw_post_config applies instead of post_config
    config_model_types: tuple[str, ...] = ()
    raw_post_config: Callable[[dict], None] | None = None
    vocab: str = "llama"                   # which set_vocab path (see vocab.py)
    permute_qk: bool = False               # LlamaModel.undo_permute
    norm_shift: float = 0.0                # Gemma: RMSNorm weight stored as w - 1
    trim_vocab_rows: bool = False          # Gemma3: token_embd cut to the tokenizer's size
    skip_lm_head: bool = False
    derive_head_dim: bool = True           # config class computes head_dim when config.json lacks it
    experts: ExpertLayout | None = None    # MoE: how the checkpoint stores its experts
    generated: Callable[[dict], tuple[list[KV], list[tuple[str, np.ndarray]]]] | None = None
    # ^ generate_extra_tensors: (KVs it adds, which land right after general.architecture; computed tensors)
    fused_qkv_ffn: bool = False            # attn_qkv and ffn_up = gate|up stacked (Phi-3)
    aliases: dict = field(default_factory=dict)  # config class attribute_map: config.json key -> to_dict key
    mla: bool = False                      # DeepSeek-V2/V3: kv_b_proj split into attn_k_b (transposed) / attn_v_b;
    #                                        layers past num_hidden_layers (multi-token prediction) and a tied
    #                                        lm_head are dropped; first_k_dense_replace dense layers, then MoE
    fused_experts: Callable[..., GptOssExperts] | None = None  # gpt-oss: fused (and MXFP4) expert tensors

    def map_name(self, hf_name: str) -> str | None:
        """GGUF name for an HF tensor name, or None when the table has no entry."""
        for suffix in (".weight", ".bias"):
            if hf_name.endswith(suffix):
                base = hf_name[: -len(suffix)]
                break
        else:
            base, suffix = hf_name, ""
        gguf = self._lookup().get(base)
        if gguf is not None:
            return gguf + suffix
        # block tensors: find the layer number
        parts = base.split(".")
        for i, p in enumerate(parts):
            if p.isdecimal():
                key = ".".join(parts[:i] + ["{bid}"] + parts[i + 1:])
                g = self.tensors.get(key)
                if g is not None:
                    return g.format(bid=int(p)) + suffix
                break
        return None

    def _lookup(self) -> dict:
        return {k: v for k, v in self.tensors.items() if "{bid}" not in k}


_LLAMA_DEFAULTS = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6, head_dim=None,
                       num_key_value_heads=None, tie_word_embeddings=False)

ARCHS: dict[str, Arch] = {}


def _register(a: Arch) -> Arch:
    for n in a.hf_names:
        ARCHS[n] = a
    return a


LLAMA = _register(Arch(
    name="llama", hf_names=("LlamaForCausalLM", "LLaMAForCausalLM"), gguf_arch="llama",
    defaults=_LLAMA_DEFAULTS, tensors=LLAMA_TENSORS, params=_llama_params,
    vocab="llama", permute_qk=True, generated=lambda hp: _llama3_generated(hp)))

MISTRAL = _register(Arch(
    name="mistral", hf_names=("MistralForCausalLM",), gguf_arch="llama",
    defaults=dict(vocab_size=32000, max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, head_dim=None,
                  num_key_value_heads=8, sliding_window=4096),
    tensors=LLAMA_TENSORS, params=_llama_params, vocab="llama", permute_qk=True,
    generated=lambda hp: _llama3_generated(hp)))

QWEN2 = _register(Arch(
    name="qwen2", hf_names=("Qwen2ForCausalLM",), gguf_arch="qwen2",
    defaults=dict(vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, num_key_value_heads=32,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    tensors=QWEN2_TENSORS, params=_qwen_params, post_config=_qwen_post, vocab="qwen2", derive_head_dim=False))

QWEN3 = _register(Arch(
    name="qwen3", hf_names=("Qwen3ForCausalLM",), gguf_arch="qwen3",
    defaults=dict(vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, num_key_value_heads=32,
                  head_dim=128, use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    tensors=QWEN3_TENSORS, params=_qwen_params, post_config=_qwen_post, vocab="qwen2"))

GEMMA3 = _register(Arch(
    name="gemma3", hf_names=("Gemma3ForCausalLM",), gguf_arch="gemma3",
    defaults=dict(vocab_size=262208, max_position_embeddings=131072, rms_norm_eps=1e-6, num_key_value_heads=4,
                  head_dim=256, sliding_window=4096, final_logit_softcapping=None, attn_logit_softcapping=None),
    tensors=GEMMA3_TENSORS, params=_gemma3_params, rope_parameters=_rope_parameters_gemma3,
    post_config=_gemma3_post, vocab="gemma3", norm_shift=1.0, trim_vocab_rows=True))


GEMMA2 = _register(Arch(
    name="gemma2", hf_names=("Gemma2ForCausalLM",), gguf_arch="gemma2",
    defaults=dict(vocab_size=256000, max_position_embeddings=8192, rms_norm_eps=1e-6, num_key_value_heads=4,
                  head_dim=256, sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    tensors=GEMMA2_TENSORS, params=_gemma2_params, vocab="gemma2", norm_shift=1.0, skip_lm_head=True))

MIXTRAL = _register(Arch(
    name="mixtral", hf_names=("MixtralForCausalLM",), gguf_arch="llama",
    defaults=dict(vocab_size=32000, max_position_embeddings=4096 * 32, rms_norm_eps=1e-5, head_dim=None,
                  num_key_value_heads=8, sliding_window=None, num_local_experts=8, num_experts_per_tok=2),
    tensors=MIXTRAL_TENSORS, params=_llama_params, vocab="llama", permute_qk=True, derive_head_dim=False,
    experts=MIXTRAL_EXPERTS, generated=lambda hp: _llama3_generated(hp)))

QWEN3MOE = _register(Arch(
    name="qwen3moe", hf_names=("Qwen3MoeForCausalLM",), gguf_arch="qwen3moe",
    defaults=dict(vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, num_key_value_heads=4,
                  use_sliding_window=False, sliding_window=None, num_local_experts=128, num_experts_per_tok=8,
                  moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[]),
    tensors=QWEN3MOE_TENSORS, params=_qwen_moe_params, post_config=_qwen_post, vocab="gpt2",
    derive_head_dim=False, experts=QWEN_MOE_EXPERTS, aliases={"num_experts": "num_local_experts"}))


PHI3 = _register(Arch(
    name="phi3", hf_names=("Phi3ForCausalLM",), gguf_arch="phi3",
    defaults=dict(vocab_size=32064, max_position_embeddings=4096, original_max_position_embeddings=4096,
                  rms_norm_eps=1e-5, sliding_window=None, head_dim=None, num_key_value_heads=None),
    tensors=PHI3_TENSORS, params=_phi3_params, rope_parameters=_rope_parameters_phi3, vocab="phi3",
    derive_head_dim=False, generated=phi3_rope_factors, fused_qkv_ffn=True))


_DEEPSEEK_DEFAULTS = dict(  # the defaults DeepseekV2Config and DeepseekV3Config share (transformers 5.x)
    intermediate_size=None, rms_norm_eps=1e-6, tie_word_embeddings=False, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128)
DEEPSEEK2 = _register(Arch(
    name="deepseek2", hf_names=("DeepseekV2ForCausalLM",), gguf_arch="deepseek2",
    defaults=dict(_DEEPSEEK_DEFAULTS, vocab_size=102400, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048, first_k_dense_replace=0,
                  n_routed_experts=64, n_shared_experts=2, routed_scaling_factor=1.0, norm_topk_prob=False,
                  moe_intermediate_size=1407, num_key_value_heads=None),
    tensors=DEEPSEEK2_TENSORS, params=_deepseek2_params, post_config=_deepseek2_post, vocab="deepseek",
    experts=QWEN_MOE_EXPERTS, aliases={"num_experts": "n_routed_experts"}, mla=True,
    config_model_types=("deepseek_v2",), raw_post_config=_deepseek2_raw_post))

DEEPSEEK3 = _register(Arch(
    name="deepseek3", hf_names=("DeepseekV3ForCausalLM",), gguf_arch="deepseek2",
    defaults=dict(_DEEPSEEK_DEFAULTS, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                  num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, max_position_embeddings=4096,
                  first_k_dense_replace=3, n_routed_experts=256, n_shared_experts=1, routed_scaling_factor=2.5,
                  norm_topk_prob=True, moe_intermediate_size=2048, n_group=8, topk_group=4, num_experts_per_tok=8),
    tensors=DEEPSEEK2_TENSORS, params=_deepseek2_params, post_config=_deepseek2_post, vocab="deepseek",
    experts=QWEN_MOE_EXPERTS, aliases={"num_local_experts": "n_routed_experts"}, mla=True,
    config_model_types=("deepseek_v3",), raw_post_config=_deepseek2_raw_post))

GPTOSS = _register(Arch(
    name="gpt-oss", hf_names=("GptOssForCausalLM",), gguf_arch="gpt-oss",
    defaults=dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                  num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128,
                  num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  tie_word_embeddings=False),
    tensors=GPTOSS_TENSORS, params=_gptoss_params, vocab="gpt2", fused_experts=GptOssExperts))


def supported_names() -> list[str]:
    return sorted(ARCHS)


def arch_for_config(config: dict) -> Arch:
    archs = config.get("architectures")
    if archs is None:
        raise ConvertError(f'{CONFIG}: "architectures" is missing; supported: {", ".join(supported_names())}')
    ListOf(Str(), 1).check(CONFIG, "architectures", archs)
    a = ARCHS.get(archs[0])
    if a is None:
        raise ConvertError(f"unsupported architecture {archs[0]!r}; supported: {', '.join(supported_names())}")
    return a


def hyperparameters(arch: Arch, hp: dict) -> list[KV]:
    """The architecture's KVs (set_gguf_parameters), in llama.cpp's order, from a normalized config."""
    kv = KVList()
    arch.params(arch, hp, kv)
    return kv.items()


# --- transforms
def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """LlamaModel.permute: reorder each head's rows from HF's rotate-half layout to llama.cpp's interleaved one.

    Rows of one head are [first half | second half]; llama.cpp wants them as pairs (i, i + half).
    Applied to q_proj with n_head and to k_proj with the key/value head count.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ConvertError(f"cannot permute a tensor of {rows} rows into {n_head} heads")
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def split_kv_b(w: np.ndarray, n_head_kv: int, nope: int, v_dim: int, part: str) -> np.ndarray:
    """DeepseekV2Model.modify_tensors: kv_b_proj (n_head_kv * (nope + v_dim), kv_lora_rank) holds per head the
    decompression of the latent KV into the head's key (nope rows) then value (v_dim rows). llama.cpp stores the
    key half transposed, (n_head, kv_lora_rank, nope) = attn_k_b, so that it absorbs into the query, and the value
    half as it is, (n_head, v_dim, kv_lora_rank) = attn_v_b. A pure reshuffle of elements (any dtype)."""
    rows, kv_lora = w.shape
    if rows != n_head_kv * (nope + v_dim):
        raise ConvertError(f"kv_b_proj has {rows} rows, but config.json implies {n_head_kv} heads x "
                           f"({nope} + {v_dim}) = {n_head_kv * (nope + v_dim)}")
    kv = w.reshape(n_head_kv, nope + v_dim, kv_lora)
    if part == "k":
        return np.ascontiguousarray(kv[:, :nope, :].transpose(0, 2, 1))
    return np.ascontiguousarray(kv[:, nope:, :])


def _llama3_generated(hp: dict) -> tuple[list[KV], list[tuple[str, np.ndarray]]]:
    f = llama3_rope_freqs(hp)
    return [], ([] if f is None else [("rope_freqs.weight", f)])


def llama3_rope_freqs(hp: dict) -> np.ndarray | None:
    """LlamaModel.generate_extra_tensors: per-dimension rope factors for Llama 3 "llama3" rope scaling.

    Computed in float32 step by step as the reference (torch float32 tensors mixed with Python floats) does.
    """
    rope_all = hp["rope_parameters"]
    rope = rope_all.get("full_attention", rope_all)
    if not rope or str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = float(rope.get("rope_theta", 10000.0))
    dim = head_dim(hp)
    f32 = np.float32
    # torch evaluates `scalar / t` as t.reciprocal() * scalar, and mixes Python floats in as float32
    expo = np.arange(0, dim, 2, dtype=np.float32) / f32(dim)
    # torch's float32 pow (SLEEF, 1-ulp) agrees with the correctly rounded double result but for rare ulps
    powers = np.power(np.float64(f32(base)), expo.astype(np.float64)).astype(np.float32)
    freqs = (f32(1) / powers) * f32(1.0)
    factor = rope.get("factor", 8.0)
    low = rope.get("low_freq_factor", 1.0)
    high = rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen = f32(old_ctx / low)
    high_wavelen = f32(old_ctx / high)
    out = []
    for freq in freqs:
        wavelen = f32(f32(1) / freq) * f32(2 * math.pi)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = f32(f32(f32(1) / wavelen) * f32(old_ctx) - f32(low)) / f32(high - low)
            inner = f32(f32(f32(1) - smooth) / f32(factor)) + smooth
            out.append(f32(f32(1) / inner) * f32(1))
    return np.array(out, dtype=np.float32)

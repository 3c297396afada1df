"""Which ggml type each tensor gets for a llama.cpp file type (ftype) such as Q4_K_M: the "quant mixes".

This mirrors llama.cpp's ``src/llama-quant.cpp``:

- ``tensor_allows_quantization``   -> :func:`allows_quantization` (1-D tensors, norms, ... stay as they are)
- ``llama_tensor_get_type``        -> :func:`plan` (the order of the user overrides)
- ``llama_tensor_get_type_impl``   -> the rule tables ``OUTPUT_RULES``, ``CATEGORY_RULES``, ``ADJUSTMENTS``
- ``tensor_type_fallback``         -> :func:`fallback_type` (row length not a multiple of the block size)
- ``init_quantize_state_counters`` -> the ``n_attention_wv`` / ``n_ffn_down`` counts in :func:`plan`
- ``llama_model_loader::weights_map`` order -> :func:`llama_tensor_order` (the order tensors are visited and
  written, which matters because the attn_v / ffn_down layer schedules use running counters)

Every ftype llama-quantize offers is in the tables, the IQ/TQ/MXFP4 mixes included. Two of llama.cpp's branches
take a tensor before the per-category rules and are written out in :func:`_mix_rules`: MXFP4_MOE (expert tensors
MXFP4, the rest Q8_0) and the very-low-bit family (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import PolicyError
from ..gguf.constants import GGMLType
from ..gguf.values import GGUFArray
from ..quants.registry import KERNEL_TYPES

# --- file types (llama.h enum llama_ftype; the value is what general.file_type holds)


@dataclass(frozen=True)
class FileType:
    name: str               # "Q4_K_M"
    id: int                 # LLAMA_FTYPE_* value, written as general.file_type
    default_type: GGMLType  # llama_ftype_get_default_type: the type most tensors get

    @property
    def is_quantized(self) -> bool:
        return is_quantized(self.default_type)


_T = GGMLType
FTYPES: dict[str, FileType] = {f.name: f for f in (
    FileType("F32", 0, _T.F32),
    FileType("F16", 1, _T.F16),
    FileType("Q4_0", 2, _T.Q4_0),
    FileType("Q4_1", 3, _T.Q4_1),
    FileType("Q8_0", 7, _T.Q8_0),
    FileType("Q5_0", 8, _T.Q5_0),
    FileType("Q5_1", 9, _T.Q5_1),
    FileType("Q2_K", 10, _T.Q2_K),
    FileType("Q3_K_S", 11, _T.Q3_K),
    FileType("Q3_K_M", 12, _T.Q3_K),
    FileType("Q3_K_L", 13, _T.Q3_K),
    FileType("Q4_K_S", 14, _T.Q4_K),
    FileType("Q4_K_M", 15, _T.Q4_K),
    FileType("Q5_K_S", 16, _T.Q5_K),
    FileType("Q5_K_M", 17, _T.Q5_K),
    FileType("Q6_K", 18, _T.Q6_K),
    FileType("Q2_K_S", 21, _T.Q2_K),
    FileType("BF16", 32, _T.BF16),
    FileType("IQ2_XXS", 19, _T.IQ2_XXS),
    FileType("IQ2_XS", 20, _T.IQ2_XS),
    FileType("IQ3_XS", 22, _T.IQ3_S),
    FileType("IQ3_XXS", 23, _T.IQ3_XXS),
    FileType("IQ1_S", 24, _T.IQ1_S),
    FileType("IQ4_NL", 25, _T.IQ4_NL),
    FileType("IQ3_S", 26, _T.IQ3_S),
    FileType("IQ3_M", 27, _T.IQ3_S),
    FileType("IQ2_S", 28, _T.IQ2_XS),
    FileType("IQ2_M", 29, _T.IQ2_S),
    FileType("IQ4_XS", 30, _T.IQ4_XS),
    FileType("IQ1_M", 31, _T.IQ1_M),
    FileType("TQ1_0", 36, _T.TQ1_0),
    FileType("TQ2_0", 37, _T.TQ2_0),
    FileType("MXFP4_MOE", 38, _T.MXFP4),
)}

# the very-low-bit ftypes that llama_tensor_get_type_impl handles in a branch of their own
IQ2_FAMILY = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})

# tools/quantize/quantize.cpp QUANT_OPTIONS: these names select another entry's ftype
FTYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# ggml types gguftool can produce (F32 and the kernels of gguftool.quants) - the only valid targets of the
# --output-tensor-type / --token-embedding-type / --tensor-type options
WRITABLE_TYPES = frozenset({_T.F32, *KERNEL_TYPES})


def parse_ftype(name: str | int) -> FileType:
    """'q4_k_m', 'Q4_K' (alias) or the llama_ftype number 15 -> FileType. Raises PolicyError."""
    text = str(name).strip().upper()
    text = FTYPE_ALIASES.get(text, text)
    if text in FTYPES:
        return FTYPES[text]
    if text.isdigit():
        for f in FTYPES.values():
            if f.id == int(text):
                return f
    raise PolicyError(f"unknown quantization type {str(name)!r} (known: {', '.join(sorted(FTYPES))}, "
                      f"aliases {', '.join(sorted(FTYPE_ALIASES))})")


def parse_target_type(name: str, what: str = "type") -> GGMLType:
    """A ggml type name for the override options ('q8_0', 'F16'); must be one gguftool can write."""
    try:
        t = GGMLType.parse(name.strip())
    except ValueError:
        raise PolicyError(f"invalid ggml type {name!r} for {what}") from None
    if t not in WRITABLE_TYPES:
        raise PolicyError(f"ggml type {t.name} for {what} is not supported by gguftool "
                          f"(supported: {', '.join(sorted(x.name for x in WRITABLE_TYPES))})")
    return t


def is_quantized(t: GGMLType) -> bool:
    """ggml_is_quantized: every block type (F32/F16/BF16 and the integer types are not)."""
    return t.block_size > 1


# --- model hyper-parameters the rules look at


@dataclass(frozen=True)
class ModelParams:
    """What llama_tensor_get_type_impl reads from the model's hparams."""
    arch: str
    n_layer: int        # {arch}.block_count (hparams.n_layer_all): n_ffn_down for the layer schedule
    n_head: int = 0     # {arch}.attention.head_count (layer 0 when it is an array)
    n_head_kv: int = 0  # {arch}.attention.head_count_kv, defaults to n_head
    n_expert: int = 0   # {arch}.expert_count
    n_layer_nextn: int = 0  # {arch}.nextn_predict_layers (excluded from n_layer() for the 70B test)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B, decided per architecture in src/models/<arch>.cpp load_arch_hparams."""
        n = self.n_layer - self.n_layer_nextn
        if self.arch == "llama":
            return self.n_expert != 8 and n == 80 and self.n_head != self.n_head_kv
        if self.arch in ("qwen2", "deci", "olmo"):
            return n == 80
        if self.arch == "jais2":
            return n == 68
        return False

    @classmethod
    def from_metadata(cls, get: Callable[[str], object]) -> "ModelParams":
        """Build from a metadata lookup ``get(key) -> value or None`` (e.g. TensorSource.get).

        The keys are llama.cpp's generic per-architecture keys (llama-arch.cpp LLM_KV_*), the same for llama,
        qwen2, qwen3, gemma3 and every other architecture.
        """
        arch = get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise PolicyError("metadata key general.architecture is missing")

        def first(key: str, default: int | None) -> int | None:
            v = get(key)
            if v is None:
                return default
            if isinstance(v, GGUFArray):   # per-layer values: llama.cpp uses layer 0 here
                if len(v.values) == 0:
                    raise PolicyError(f"metadata key {key} is an empty array")
                v = v.values[0]
            # integers only (a string, float or bool is a damaged file, not a count), within llama.cpp's int32
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise PolicyError(f"metadata key {key} is not an integer: {v!r}")
            if not 0 <= int(v) < 2**31:
                raise PolicyError(f"metadata key {key} is out of range: {int(v)}")
            return int(v)

        n_layer = first(f"{arch}.block_count", None)
        if n_layer is None or n_layer <= 0:
            raise PolicyError(f"metadata key {arch}.block_count is missing or not positive")
        n_head = first(f"{arch}.attention.head_count", 0)
        return cls(arch=arch, n_layer=n_layer, n_head=n_head,
                   n_head_kv=first(f"{arch}.attention.head_count_kv", n_head),
                   n_expert=first(f"{arch}.expert_count", 0),
                   n_layer_nextn=first(f"{arch}.nextn_predict_layers", 0))


# --- tensor categories (llama-quant.cpp tensor_get_category: substring tests, in this order)

OUTPUT, TOKEN_EMBD, ATTN_QKV, ATTN_KV_B, ATTN_V, ATTN_K, ATTN_Q, ATTN_OUTPUT = (
    "output", "token_embd", "attn_qkv", "attn_kv_b", "attn_v", "attn_k", "attn_q", "attn_output")
FFN_UP, FFN_GATE, FFN_DOWN, OTHER = "ffn_up", "ffn_gate", "ffn_down", "other"

_CATEGORY_TESTS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    (OUTPUT, lambda n: n == "output.weight"),
    (TOKEN_EMBD, lambda n: n in ("token_embd.weight", "per_layer_token_embd.weight")),
    (ATTN_QKV, lambda n: "attn_qkv.weight" in n),
    (ATTN_KV_B, lambda n: "attn_kv_b.weight" in n),
    (ATTN_V, lambda n: "attn_v.weight" in n),
    (ATTN_K, lambda n: "attn_k.weight" in n),
    (ATTN_Q, lambda n: "attn_q.weight" in n),
    (ATTN_OUTPUT, lambda n: "attn_output.weight" in n),
    (FFN_UP, lambda n: "ffn_up" in n),
    (FFN_GATE, lambda n: "ffn_gate" in n),
    (FFN_DOWN, lambda n: "ffn_down" in n),
)

# attn_v-like tensors share one rule list and one counter (category_is_attn_v). Note that this makes the
# reference's separate attn_qkv branch unreachable: fused QKV tensors follow the attn_v schedule.
ATTN_V_LIKE = frozenset({ATTN_V, ATTN_QKV, ATTN_KV_B})


def tensor_category(name: str) -> str:
    for cat, test in _CATEGORY_TESTS:
        if test(name):
            return cat
    return OTHER


# --- which tensors are quantized at all (tensor_allows_quantization)

# a tensor whose name contains one of these keeps its type
_NEVER_QUANTIZED_SUBSTRINGS = (
    "_norm.weight",                      # norms
    "ffn_gate_inp.weight",               # MoE router
    "ffn_gate_tid2eid.weight",           # DeepSeek-V4 routing table
    "altup", "laurel",                   # gemma3n, tiny
    "per_layer_model_proj",              # gemma3n
    "ssm_conv1d", "shortconv.conv.weight",
    "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",  # RWKV
    "attn_rel_b.weight",                 # T5 relative position bias
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",  # multimodal / audio
)
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")  # BERT (LLM_TN POS_EMBD, TOKEN_TYPES)
_GLM5_NEXT_SUBSTRINGS = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
    "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight",
)


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 don't count (a (576, 1) tensor is 1-D)."""
    for i in range(len(shape) - 1, 0, -1):
        if shape[i] > 1:
            return i + 1
    return 1


def allows_quantization(name: str, shape: Sequence[int], arch: str = "", quantize_output_tensor: bool = True,
                        only_copy: bool = False) -> bool:
    """tensor_allows_quantization: only 2-D/3-D '*weight' tensors that are not norms, routers, tiny tables..."""
    if only_copy or n_dims(shape) < 2:
        return False
    if not name.endswith("weight"):
        return False
    if not quantize_output_tensor and name == "output.weight":
        return False
    if any(s in name for s in _NEVER_QUANTIZED_SUBSTRINGS) or name in _NEVER_QUANTIZED_NAMES:
        return False
    if arch == "glm5-next" and any(s in name for s in _GLM5_NEXT_SUBSTRINGS):
        return False
    return True


# --- the rule tables (llama_tensor_get_type_impl)


@dataclass
class RuleContext:
    """Everything a rule may look at for one tensor."""
    ftype: str               # FileType.name
    default: GGMLType        # the ftype's default type
    model: ModelParams
    name: str
    ne0: int                 # row length
    has_imatrix: bool
    i_layer: int = 0         # ffn_down: layer index (counter, or parsed from the name for MoE models)
    n_layer: int = 0
    i_attn_v: int = 0        # attn_v-like: how many were seen before this one
    n_attn_v: int = 0        # attn_v-like: how many the model has
    cur: GGMLType | None = None  # the type chosen so far (the ADJUSTMENTS look at it)


@dataclass(frozen=True)
class Rule:
    """'For these ftypes, when the condition holds, the tensor becomes this type.' First match wins."""
    ftypes: frozenset[str] | None            # None: any ftype
    then: GGMLType | Callable[[RuleContext], GGMLType | None]  # None from a callable: keep the type
    when: Callable[[RuleContext], bool] = lambda c: True
    why: str = ""


def _f(*names: str) -> frozenset[str]:
    return frozenset(names)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The first and last eighth of the layers, and every third layer in between, get more bits."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _falcon(c: RuleContext) -> bool:
    return c.model.arch == "falcon"


def _first_eighth(c: RuleContext) -> bool:
    return c.i_layer < c.n_layer // 8


def _more_bits(c: RuleContext) -> bool:
    return use_more_bits(c.i_layer, c.n_layer)


# output.weight, and token_embd.weight when the model has no output.weight (tied embeddings)
OUTPUT_RULES: tuple[Rule, ...] = (
    Rule(_f("MXFP4_MOE"), _T.Q8_0),
    Rule(None, _T.Q8_0, lambda c: _falcon(c) or c.ne0 % c.default.block_size != 0,
         "falcon, or rows that don't fit the default type's block"),
    Rule(IQ2_FAMILY | {"IQ3_XXS"}, _T.Q5_K),
    Rule(None, _T.Q6_K, lambda c: c.default != _T.Q8_0, "output gets Q6_K unless the mix is Q8_0"),
)

# token_embd.weight when the model has output.weight (no --token-embedding-type)
TOKEN_EMBD_RULES: tuple[Rule, ...] = (
    Rule(_f("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"), _T.Q2_K),
    Rule(_f("IQ2_S", "IQ2_M", "IQ3_XXS"), _T.IQ3_S),
    Rule(_f("TQ1_0", "TQ2_0"), _T.Q4_K),
)


def _iq3_xs_middle(c: RuleContext) -> bool:
    return c.n_layer // 8 <= c.i_layer < 7 * c.n_layer // 8

CATEGORY_RULES: dict[str, tuple[Rule, ...]] = {
    # attn_v, attn_qkv, attn_kv_b; c.i_attn_v counts them in file order
    ATTN_V: (
        Rule(_f("Q2_K"), lambda c: _T.Q4_K if c.model.n_gqa >= 4 else _T.Q3_K),
        Rule(_f("Q2_K_S"), _T.Q4_K, lambda c: c.model.n_gqa >= 4),
        Rule(_f("IQ3_XXS"), lambda c: _T.Q4_K if c.model.n_gqa >= 4 else _T.IQ3_S if not c.has_imatrix
             else _T.IQ3_XXS),
        Rule(_f("IQ3_XS", "IQ3_S"), _T.Q4_K, lambda c: c.model.n_gqa >= 4),
        Rule(_f("IQ3_M"), _T.Q4_K),
        Rule(_f("Q3_K_M"), lambda c: _T.Q5_K if c.i_attn_v < 2 else _T.Q4_K),
        Rule(_f("Q3_K_L"), _T.Q5_K),
        Rule(_f("IQ4_NL", "IQ4_XS"), _T.Q5_K, lambda c: c.model.n_gqa >= 4),
        Rule(_f("Q4_K_M", "Q5_K_M"), _T.Q6_K, lambda c: use_more_bits(c.i_attn_v, c.n_attn_v)),
        Rule(_f("Q4_K_S"), _T.Q5_K, lambda c: c.i_attn_v < 4),
    ),
    ATTN_K: (
        Rule(None, _T.Q8_0, lambda c: c.model.n_expert == 8, "8-expert models: cheap, so Q8_0"),
        Rule(_f("IQ3_XS"), _T.IQ3_XXS),
        Rule(_f("IQ3_XXS"), _T.IQ2_S),
    ),
    ATTN_Q: (
        Rule(_f("IQ3_XS"), _T.IQ3_XXS),
        Rule(_f("IQ3_XXS"), _T.IQ2_S),
    ),
    FFN_GATE: (
        Rule(_f("IQ3_XS"), _T.IQ3_XXS, _iq3_xs_middle),
    ),
    FFN_UP: (
        Rule(_f("IQ3_XS"), _T.IQ3_XXS, _iq3_xs_middle),
    ),
    FFN_DOWN: (
        Rule(_f("Q2_K"), _T.Q3_K),
        Rule(_f("Q2_K_S"), lambda c: _T.Q4_K if _first_eighth(c) else None),
        Rule(_f("IQ3_XXS"), lambda c: _T.Q4_K if _first_eighth(c) else _T.Q3_K, lambda c: not c.has_imatrix),
        Rule(_f("Q3_K_M"), lambda c: _T.Q5_K if c.i_layer < c.n_layer // 16
             else _T.Q4_K if not _falcon(c) or _more_bits(c) else _T.Q3_K),
        Rule(_f("IQ3_M"), _T.Q4_K, lambda c: _first_eighth(c) or (c.model.n_expert == 8 and _more_bits(c))),
        Rule(_f("Q3_K_L"), lambda c: _T.Q4_K if _falcon(c) else _T.Q5_K),
        Rule(_f("Q4_K_M"), lambda c: (_T.Q6_K if c.i_layer < c.n_layer // 16 else
                                      _T.Q5_K if _more_bits(c) else _T.Q4_K), _falcon),
        Rule(_f("Q4_K_M"), lambda c: _T.Q6_K if _more_bits(c) else None),
        Rule(_f("IQ4_NL", "IQ4_XS"), _T.Q5_K, lambda c: _first_eighth(c) and not c.has_imatrix),
        Rule(_f("Q5_K_M"), _T.Q6_K, _more_bits),
        Rule(_f("Q4_K_S"), _T.Q5_K, lambda c: not _falcon(c) and _first_eighth(c)),
        Rule(_f("Q4_0"), _T.Q4_1, lambda c: c.has_imatrix and _first_eighth(c),
             "guard the first ffn_down layers, only with an imatrix (keeps imatrix-free output unchanged)"),
        Rule(_f("Q5_0"), _T.Q5_1, lambda c: c.has_imatrix and _first_eighth(c)),
    ),
    ATTN_OUTPUT: (
        Rule(_f("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M",
                "IQ4_XS"), _T.Q5_K, lambda c: not _falcon(c) and c.model.n_expert == 8),
        Rule(_f("Q2_K"), _T.Q3_K, lambda c: not _falcon(c) and c.model.n_expert != 8),
        Rule(_f("IQ3_XXS"), _T.IQ3_S, lambda c: not _falcon(c) and c.model.n_expert != 8),
        Rule(_f("Q3_K_M", "IQ3_M"), _T.Q4_K, lambda c: not _falcon(c) and c.model.n_expert != 8),
        Rule(_f("Q3_K_L"), _T.Q5_K, lambda c: not _falcon(c) and c.model.n_expert != 8),
        Rule(_f("Q3_K_L"), _T.Q4_K, _falcon),
    ),
}
CATEGORY_RULES[ATTN_QKV] = CATEGORY_RULES[ATTN_KV_B] = CATEGORY_RULES[ATTN_V]

# applied after the attn_v-like rules, in this order, whatever rule matched
ADJUSTMENTS: dict[str, tuple[Rule, ...]] = {
    ATTN_V: (
        # 70B: 8 heads share attn_v, so it is 8x smaller than attn_q and more bits cost little
        Rule(None, _T.Q5_K, lambda c: c.model.is_70b and c.cur in (_T.Q3_K, _T.Q4_K)),
        Rule(None, _T.Q8_0, lambda c: c.model.n_expert == 8),
    ),
}
ADJUSTMENTS[ATTN_QKV] = ADJUSTMENTS[ATTN_KV_B] = ADJUSTMENTS[ATTN_V]


def _apply(rules: Iterable[Rule], c: RuleContext, cur: GGMLType, first_only: bool = True) -> GGMLType:
    for rule in rules:
        if rule.ftypes is not None and c.ftype not in rule.ftypes:
            continue
        c.cur = cur  # adjustments look at the type chosen so far
        if not rule.when(c):
            continue
        new = rule.then(c) if callable(rule.then) else rule.then
        if new is not None:
            cur = new
        if first_only:
            break
    return cur


# --- row-length fallback (tensor_type_fallback)

# 256-block type -> the 32-block type used when a row length is not a multiple of 256
FALLBACKS: dict[GGMLType, GGMLType] = {
    _T.Q2_K: _T.Q4_0, _T.Q3_K: _T.Q4_0, _T.Q4_K: _T.Q5_0, _T.Q5_K: _T.Q5_1, _T.Q6_K: _T.Q8_0,
    _T.TQ1_0: _T.Q4_0, _T.TQ2_0: _T.Q4_0, _T.Q2_0: _T.Q4_0,
    _T.IQ1_S: _T.IQ4_NL, _T.IQ1_M: _T.IQ4_NL, _T.IQ2_XXS: _T.IQ4_NL, _T.IQ2_XS: _T.IQ4_NL,
    _T.IQ2_S: _T.IQ4_NL, _T.IQ3_XXS: _T.IQ4_NL, _T.IQ3_S: _T.IQ4_NL, _T.IQ4_XS: _T.IQ4_NL,
}


def fallback_type(t: GGMLType, ne0: int) -> GGMLType:
    """The type to use when rows of ne0 values don't fit t's blocks (F16 when the 32-block one doesn't fit)."""
    if ne0 % t.block_size == 0:
        return t
    if t in FALLBACKS:
        new = FALLBACKS[t]
    elif t.block_size <= 32:
        new = t
    else:
        raise PolicyError(f"no tensor type fallback is defined for type {t.name}")
    return new if ne0 % new.block_size == 0 else _T.F16


# --- tensor order (llama_model_loader::weights_map with weight_name_comparer)

_BLK = re.compile(r"blk\.(-?\d+)")


def _layer_of(name: str) -> int | None:
    """sscanf(name, "blk.%d.", &il): the layer number of 'blk.N....', None when the name has none."""
    m = _BLK.match(name)
    if m is None:
        return None
    v = int(m.group(1))
    # %d stores a 32-bit int
    return ((v + 2**31) % 2**32) - 2**31


def llama_tensor_order(names: Iterable[str]) -> list[str]:
    """Tensors in llama-quantize's order: non-layer tensors first, then by layer number, then by name
    (byte-wise, as std::string compares)."""
    def key(n: str):
        il = _layer_of(n)
        return (-1 if il is None else il, n.encode("utf-8"))
    return sorted(names, key=key)


# --- options and the plan


@dataclass
class QuantOptions:
    """llama_model_quantize_params, as far as the type choice is concerned."""
    ftype: FileType
    pure: bool = False                             # --pure: every quantizable tensor gets the default type
    leave_output_tensor: bool = False              # --leave-output-tensor
    output_tensor_type: GGMLType | None = None     # --output-tensor-type
    token_embedding_type: GGMLType | None = None   # --token-embedding-type
    tensor_types: list[tuple[str, GGMLType]] = field(default_factory=list)  # --tensor-type REGEX=TYPE, in order
    has_imatrix: bool = False

    def __post_init__(self):
        self._patterns = []
        for pattern, t in self.tensor_types:
            # quantize.cpp lower-cases the name part; llama-quant.cpp uses std::regex_search on the tensor name
            try:
                self._patterns.append((re.compile(pattern.lower()), t))
            except re.error as e:
                raise PolicyError(f"invalid --tensor-type pattern {pattern!r}: {e}") from None

    def manual_type(self, name: str) -> GGMLType | None:
        for rx, t in self._patterns:
            if rx.search(name):
                return t
        return None


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    src_type: GGMLType
    new_type: GGMLType
    allows_quantization: bool
    requires_imatrix: bool = False
    fallback: bool = False       # the row length forced a different type than the rules chose
    how: str = ""                # "kept", "default", "rule", "manual", "output-type", "token-embd-type", "pure"

    @property
    def converts(self) -> bool:
        """The tensor data changes (otherwise its bytes are copied as they are)."""
        return self.new_type != self.src_type

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def src_nbytes(self) -> int:
        return self.src_type.nbytes(self.n_elements)

    @property
    def new_nbytes(self) -> int:
        return self.new_type.nbytes(self.n_elements)


def requires_imatrix(name: str, new_type: GGMLType, ftype: FileType) -> bool:
    """tensor_requires_imatrix: the very-low-bit types, and Q2_K inside a Q2_K_S file."""
    if tensor_category(name) in (OUTPUT, TOKEN_EMBD):
        return False
    if new_type in (_T.IQ3_XXS, _T.IQ2_XXS, _T.IQ2_XS, _T.IQ2_S, _T.IQ1_M, _T.IQ1_S):
        return True
    return new_type == _T.Q2_K and ftype.name == "Q2_K_S"


@dataclass
class _Counters:
    n_attn_v: int = 0
    i_attn_v: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    n_fallback: int = 0


def _moe_layer(name: str, n_layer: int) -> int:
    il = _layer_of(name)
    if il is None:
        raise PolicyError(f"failed to determine the layer of tensor {name}")
    if il < 0 or il >= n_layer:
        raise PolicyError(f"bad layer {il} for tensor {name}: must be in [0, {n_layer})")
    return il


def plan(tensors: Sequence[tuple[str, Sequence[int], GGMLType]], model: ModelParams,
         opts: QuantOptions) -> list[TensorPlan]:
    """The target type of every tensor, in the order given (use :func:`llama_tensor_order` for llama's).

    ``tensors`` are (name, shape in ggml order, stored type). Mirrors llama_tensor_get_type: tensors that may
    not be quantized keep their type; then --token-embedding-type / --output-tensor-type; then (for a
    quantized ftype) the first matching --tensor-type pattern, else the mix rules (unless --pure); then the
    row-length fallback.
    """
    names = [t[0] for t in tensors]
    cnt = _Counters(n_attn_v=sum(tensor_category(n) in ATTN_V_LIKE for n in names))
    tied = "output.weight" not in names
    ft = opts.ftype
    out: list[TensorPlan] = []
    for name, shape, src_type in tensors:
        shape = tuple(int(d) for d in shape)
        src_type = GGMLType(src_type)
        allowed = allows_quantization(name, shape, model.arch, not opts.leave_output_tensor)
        new, how, fell = src_type, "kept", False
        if allowed:
            new, how, fell = _choose(name, shape, model, opts, tied, cnt)
        out.append(TensorPlan(name, shape, src_type, new, allowed,
                              requires_imatrix=requires_imatrix(name, new, ft), fallback=fell, how=how))
    return out


def _choose(name: str, shape: tuple[int, ...], model: ModelParams, opts: QuantOptions, tied: bool,
            cnt: _Counters) -> tuple[GGMLType, str, bool]:
    cat = tensor_category(name)
    ne0 = shape[0]
    ft = opts.ftype
    if opts.token_embedding_type is not None and cat == TOKEN_EMBD:
        # per_layer_token_embd may instead be named by an explicit --tensor-type
        if not (name == "per_layer_token_embd.weight" and opts.manual_type(name) is not None):
            return _checked(opts.token_embedding_type, name, ne0), "token-embd-type", False
    if opts.output_tensor_type is not None and cat == OUTPUT:
        return _checked(opts.output_tensor_type, name, ne0), "output-type", False

    new = ft.default_type
    if not is_quantized(new):
        return new, "default", False

    manual = opts.manual_type(name)
    how = "default"
    if manual is not None:
        new, how = manual, "manual"
    elif opts.pure:
        how = "pure"
    else:
        chosen = _mix_rules(name, cat, ne0, model, opts, tied, cnt, shape)
        if chosen != new:
            how = "rule"
        new = chosen
    fixed = fallback_type(new, ne0)
    if fixed != new:
        cnt.n_fallback += 1
        return fixed, how, True
    return new, how, False


def _checked(t: GGMLType, name: str, ne0: int) -> GGMLType:
    # llama.cpp applies no fallback to these explicit types and would fail later; say so now
    if ne0 % t.block_size:
        raise PolicyError(f"tensor {name}: row length {ne0} is not a multiple of {t.block_size} "
                          f"required by type {t.name}")
    return t


def _iq2_family(cat: str, model: ModelParams, ftype: str, cnt: _Counters, new: GGMLType) -> GGMLType:
    """llama_tensor_get_type_impl's branch for IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S and IQ2_M (after output and
    token_embd): attn_v-like, attn_k (8 experts), ffn_down (a running count, even in MoE models) and attn_output;
    every other tensor keeps the default type, and no 70B / 8-expert adjustment follows."""
    s_or_m = ftype in ("IQ2_S", "IQ2_M")
    if cat in ATTN_V_LIKE:
        cnt.i_attn_v += 1
        if model.n_gqa >= 4 or model.n_expert >= 4:
            return _T.Q4_K
        return _T.IQ3_S if s_or_m else _T.Q2_K
    if model.n_expert == 8 and cat == ATTN_K:
        return _T.Q4_K
    if cat == FFN_DOWN:
        first = cnt.i_ffn_down < model.n_layer // 8
        cnt.i_ffn_down += 1
        if first:
            return _T.IQ3_S if s_or_m else _T.Q2_K
        return new
    if cat == ATTN_OUTPUT:
        if model.n_expert == 8:
            return _T.Q5_K
        if ftype in ("IQ1_S", "IQ1_M"):
            return _T.IQ2_XXS
        if s_or_m:
            return _T.IQ3_S
    return new


def _mix_rules(name: str, cat: str, ne0: int, model: ModelParams, opts: QuantOptions, tied: bool,
               cnt: _Counters, shape: tuple[int, ...] = ()) -> GGMLType:
    """llama_tensor_get_type_impl for one tensor; advances the counters as the reference does."""
    ft = opts.ftype
    c = RuleContext(ftype=ft.name, default=ft.default_type, model=model, name=name, ne0=ne0,
                    has_imatrix=opts.has_imatrix)
    new = ft.default_type

    if cat == OUTPUT or (tied and cat == TOKEN_EMBD):
        if opts.output_tensor_type is not None:
            return opts.output_tensor_type
        return _apply(OUTPUT_RULES, c, new)
    if ft.name == "MXFP4_MOE":
        # expert tensors (3-D) MXFP4, everything else Q8_0; bailingmoe3's 3-D MLA projections are not experts
        experts = len(shape) > 2 and shape[2] > 1
        if model.arch == "bailingmoe3" and cat not in (FFN_UP, FFN_GATE, FFN_DOWN):
            experts = False
        return _T.MXFP4 if experts else _T.Q8_0
    if cat == TOKEN_EMBD:
        if opts.token_embedding_type is not None:
            return opts.token_embedding_type
        return _apply(TOKEN_EMBD_RULES, c, new)
    if ft.name in IQ2_FAMILY:
        return _iq2_family(cat, model, ft.name, cnt, new)

    if cat in ATTN_V_LIKE:
        c.i_attn_v, c.n_attn_v = cnt.i_attn_v, cnt.n_attn_v
        new = _apply(CATEGORY_RULES[cat], c, new)
        new = _apply(ADJUSTMENTS[cat], c, new, first_only=False)
        cnt.i_attn_v += 1
        return new

    # the ffn layer schedules: a running counter, except in MoE models where the name says the layer
    counter = {FFN_DOWN: "i_ffn_down", FFN_GATE: "i_ffn_gate", FFN_UP: "i_ffn_up"}.get(cat)
    if counter is not None:
        n_expert = max(1, model.n_expert)
        c.n_layer = model.n_layer
        c.i_layer = _moe_layer(name, model.n_layer) if n_expert > 1 else getattr(cnt, counter)
        setattr(cnt, counter, getattr(cnt, counter) + 1)

    return _apply(CATEGORY_RULES.get(cat, ()), c, new)


def count_fallbacks(plans: Iterable[TensorPlan]) -> int:
    return sum(p.fallback for p in plans)

"""A Hugging Face checkpoint presented as a ``TensorSource``: what ``convert_hf_to_gguf.py`` would write.

``open_hf_source(path)`` returns the KV list and the tensors that llama.cpp's converter writes with
``--outtype f32`` (or ``bf16`` for a BF16 checkpoint), in its order, under its GGUF names. Nothing is read
but headers until a tensor's ``read_f32`` / ``read_raw`` is called; each call maps the tensor's bytes, applies
the architecture's transform (Q/K permutation, Gemma norm shift, vocabulary trim) and returns a new array.

KV order (ModelBase.prepare_metadata + TextModel.prepare_metadata): general.architecture, general.type,
general.* descriptive keys (gguf.Metadata), the architecture's hyperparameters (set_gguf_parameters),
general.quantization_version, then the tokenizer (set_vocab).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConvertError
from ..gguf.constants import GGMLType
from ..gguf.values import KV
from ..pipeline.policy import FTYPES
from ..pipeline.source import SourceRecipe, SourceTensor, TensorSource
from . import archs as A
from .checkpoint import SUPPORTED_DTYPES, Checkpoint, SafetensorsTensor, widen_compute, widen_f32
from .prequant import Prequant, ScaledWeight, find_prequantized
from .gptoss import MXFP4_FTYPE, is_mxfp4
from .vocab import VocabInfo, gemma3_vocab_rows, tokenizer_files, vocab_kvs

GGML_QUANT_VERSION = 2
_OUT_TYPE = {"f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16}


# --- tensors
class HFTensor(SourceTensor):
    """One checkpoint tensor as the converter writes it (transform applied when read).

    Of SourceTensor's slab-reading interface it has its own read_rows and keeps the defaults for the rest: no
    background reads (concurrent_reads: a shard is mapped on first use, by whichever thread gets there) and no
    raw_location (what it reads is converted from the checkpoint's bytes, not stored as they are).

    ``scaled``: the tensor is a pre-quantized weight (FP8 ...) and its scale; it is dequantized to float32 (one slab
    of rows at a time when no transform moves rows) before any transform, as llama.cpp's converter does."""

    def __init__(self, name: str, st: SafetensorsTensor, out_type: GGMLType,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None, rows: int | None = None,
                 scaled: ScaledWeight | None = None, out_shape: tuple[int, ...] | None = None):
        self.name = name
        self.st = st
        self.type = out_type
        self.transform = transform
        self.rows = rows  # keep only the first `rows` rows (Gemma3 vocabulary trim)
        self.scaled = scaled
        hf_shape = list(out_shape if out_shape is not None else st.shape)  # out_shape: the transform reshapes
        if rows is not None:
            hf_shape[0] = rows
        self.hf_shape = tuple(hf_shape)
        self.shape = tuple(reversed(hf_shape)) if hf_shape else (1,)

    def _values(self) -> np.ndarray:
        """The transformed values in the dtype llama.cpp transforms them in (F16 and F32 stay, other dtypes and
        dequantized weights are float32)."""
        if self.scaled is not None:
            a = self.scaled.full()
            if self.rows is not None:
                a = a[: self.rows]
        else:
            a = self.st.array()
            if self.rows is not None:
                a = a[: self.rows]
            a = widen_compute(self.st.dtype, a)
        if self.transform is not None:
            a = self.transform(a)
        return a

    def read_f32(self) -> np.ndarray:
        a = self._values()
        ne0 = self.shape[0]
        return np.ascontiguousarray(a, dtype=np.float32).reshape(-1, ne0)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 (rows = ggml rows = the HF first dimension of a 2-D tensor).

        Only those rows are read from the memory map, unless the transform moves rows between each other
        (the Q/K permutation, on small tensors), in which case the whole tensor is transformed first.
        """
        if len(self.hf_shape) != 2 or self.transform is not None:
            return self.read_f32()[start:stop]
        if self.scaled is not None:
            return self.scaled.rows(start, stop)
        return np.ascontiguousarray(widen_f32(self.st.dtype, self.st.array()[start:stop]), dtype=np.float32)

    def read_raw(self) -> np.ndarray:
        if self.type == GGMLType.F32:
            return self.read_f32().reshape(-1).view(np.uint8)
        if self.type == GGMLType.BF16:
            if self.st.dtype != "BF16" or self.scaled is not None:
                raise ConvertError(f"{self.name}: BF16 output needs a BF16 checkpoint tensor")
            a = self.st.array()  # raw words: every transform applied to BF16 weights is a pure permutation
            if self.rows is not None:
                a = a[: self.rows]
            if self.transform is not None:
                a = self.transform(a)
            return np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        if self.type == GGMLType.F16:
            return np.ascontiguousarray(self._values(), dtype=np.float16).reshape(-1).view(np.uint8)
        raise ConvertError(f"{self.name}: no raw form for {self.type.name}")  # pragma: no cover


class ExpertsTensor(SourceTensor):
    """A MoE projection: the per-expert 2-D checkpoint tensors stacked into one (ne0, ne1, n_expert) tensor, as
    llama.cpp's converter merges them (torch.stack along a new first dimension)."""

    def __init__(self, name: str, parts: list[HFTensor]):
        self.name = name
        self.parts = parts
        self.type = parts[0].type
        ne0, ne1 = parts[0].shape
        self.shape = (ne0, ne1, len(parts))

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the (n_expert * ne1, ne0) float32 view (expert e owns rows e*ne1 ...)."""
        ne1 = self.shape[1]
        out = []
        r = start
        while r < stop:
            e, lo = divmod(r, ne1)
            hi = min(ne1, stop - e * ne1)
            out.append(self.parts[e].read_rows(lo, hi))
            r = e * ne1 + hi
        if not out:
            return np.empty((0, self.shape[0]), np.float32)
        return out[0] if len(out) == 1 else np.concatenate(out)

    def read_f32(self) -> np.ndarray:
        return self.read_rows(0, self.shape[1] * self.shape[2])

    def read_raw(self) -> np.ndarray:
        return np.concatenate([p.read_raw() for p in self.parts])


class GeneratedTensor(SourceTensor):
    """A tensor the converter computes (rope_freqs)."""

    def __init__(self, name: str, data: np.ndarray):
        self.name = name
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.type = GGMLType.F32
        self.shape = tuple(reversed(self.data.shape))

    def read_f32(self) -> np.ndarray:
        return self.data.reshape(-1, self.shape[0]).copy()

    def read_raw(self) -> np.ndarray:
        return self.data.reshape(-1).view(np.uint8).copy()


# --- the source
@dataclass
class HFSource(TensorSource):
    checkpoint: Checkpoint | None = None
    arch: A.Arch | None = None
    hparams: dict = field(default_factory=dict)
    vocab: VocabInfo | None = None
    outtype: str = "f32"
    name: str = ""
    prequant: Prequant = field(default_factory=Prequant)    # FP8 ... weights and their scales, if any
    opened_as: "HFRecipe | None" = None                     # open_hf_source's arguments (for recipe())

    def recipe(self) -> "HFRecipe | None":
        return self.opened_as

    def prequant_report(self) -> list[tuple[str, str]]:
        """(GGUF tensor name, what it is dequantized from) for every tensor made from a pre-quantized weight."""
        out = []
        for t in self.tensors:
            parts = t.parts if isinstance(t, ExpertsTensor) else [t] if isinstance(t, HFTensor) else []
            sw = parts[0].scaled if parts else None
            if sw is None:
                continue
            what = (f"{sw.weight.dtype} {list(sw.weight.shape)} x {sw.scale.name.rsplit('.', 1)[-1]} "
                    f"{sw.scale.dtype} {list(sw.scale.shape)} ({sw.kind()})")
            out.append((t.name, what + (f", {len(parts)} experts" if len(parts) > 1 else "")))
        return out

    def auto_type(self) -> str:
        """What ``--type auto`` means for this checkpoint: BF16 for a BF16 checkpoint, else F16; for a
        pre-quantized one, llama.cpp's --outtype auto heuristic (the first 2-D BF16 or F16 tensor, FP8 weights and
        scales skipped, else F16)."""
        if not self.prequant.active:
            return "BF16" if self.outtype == "bf16" else "F16"
        assert self.checkpoint is not None
        for t in self.checkpoint.tensors.values():
            if len(t.shape) >= 2 and t.dtype in ("BF16", "F16"):
                return t.dtype
        return "F16"

    def input_files(self) -> list[str]:
        """config.json, the safetensors shards (and their index) and the tokenizer files of the folder."""
        if self.checkpoint is None:
            return []
        return [str(p) for p in self.checkpoint.input_files() + tokenizer_files(self.checkpoint.directory)]

    def close(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.close()


_MULTIMODAL = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.",
               "sound_projection.", "speech_embeddings.")
_MULTIMODAL_IN = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.",
                  "projector.", "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed",
                  "patch_embedding", "patch_merger.", "patch_merge_mlp.", "model.connector.")


def _filtered_name(name: str) -> str | None:
    """TextModel / LlamaModel filter_tensors: drop multimodal tensors, strip language_model./text_model."""
    if name.startswith(_MULTIMODAL) or any(s in name for s in _MULTIMODAL_IN):
        return None
    if name.endswith("e_score_correction_bias"):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    return name.replace("language_model.", "").replace("text_model.", "")


def _default_name(directory: Path) -> str:
    return directory.resolve().name


def metadata_kvs(arch: A.Arch, name: str, tensors: list[SourceTensor], early: list[KV] = ()) -> list[KV]:
    """general.architecture, the keys generate_extra_tensors adds (``early``: llama.cpp's converter runs it
    before writing any other metadata), then the descriptive general.* keys. llama.cpp derives more of those
    (basename, finetune, license, organization ...) from the model card and folder name; gguftool writes the
    name and size label only."""
    kv = A.KVList()
    kv.string("general.architecture", arch.gguf_arch)
    kv.extend(early)
    kv.string("general.type", "model")
    kv.string("general.name", name)
    label = size_label_of(tensors)
    if label:
        kv.string("general.size_label", label)
    return kv.items()


def size_label_of(tensors: list[SourceTensor]) -> str:
    """gguf-py's size_label from GGUFWriter.get_total_parameter_count: the parameter count, or for a MoE model
    "{experts}x{shared + one expert's parameters}"."""
    shared = expert = expert_sum = n_expert_tensors = 0
    for t in tensors:
        if "_exps." in t.name and len(t.shape) >= 3:
            n = t.shape[2]
            expert += t.n_elements // n
            expert_sum += n
            n_expert_tensors += 1
        else:
            shared += t.n_elements
    if n_expert_tensors:
        return f"{expert_sum // n_expert_tensors}x{size_label(shared + expert)}"
    return size_label(shared)


def size_label(n: int) -> str:
    """gguf-py's model_weight_count_rounded_notation (at least 2 significant digits): '135M', '1.4M' ..."""
    if n <= 0:
        return ""
    if n > 1e12:
        v, suffix = n * 1e-12, "T"
    elif n > 1e9:
        v, suffix = n * 1e-9, "B"
    elif n > 1e6:
        v, suffix = n * 1e-6, "M"
    else:
        v, suffix = n * 1e-3, "K"
    fix = max(2 - len(str(round(v)).lstrip("0")), 0)
    return f"{v:.{fix}f}{suffix}"


def _mla_shapes(hp: dict) -> list[tuple[str, tuple]]:
    """DeepSeek-V2/V3 (HF shapes of the GGUF-named tensors; kv_b_proj is checked by split_kv_b)."""
    h, nh = hp["hidden_size"], hp["num_attention_heads"]
    kv_lora, nope, rope, v_dim = A.mla_dims(hp)
    q_lora = hp.get("q_lora_rank")
    rules = [(r"blk\.\d+\.attn_q\.weight", (nh * (nope + rope), h)),
             (r"blk\.\d+\.attn_kv_a_mqa\.weight", (kv_lora + rope, h)),
             (r"blk\.\d+\.attn_kv_a_norm\.weight", (kv_lora,)),
             (r"blk\.\d+\.attn_output\.weight", (h, nh * v_dim))]
    if q_lora is not None:
        rules += [(r"blk\.\d+\.attn_q_a\.weight", (q_lora, h)), (r"blk\.\d+\.attn_q_a_norm\.weight", (q_lora,)),
                  (r"blk\.\d+\.attn_q_b\.weight", (nh * (nope + rope), q_lora))]
    ff = hp.get("intermediate_size")
    if isinstance(ff, int):
        rules += [(r"blk\.\d+\.ffn_(gate|up)\.weight", (ff, h)), (r"blk\.\d+\.ffn_down\.weight", (h, ff))]
    shared = (hp.get("n_shared_experts") or 0) * (hp.get("moe_intermediate_size") or 0)
    if shared:
        rules += [(r"blk\.\d+\.ffn_(gate|up)_shexp\.weight", (shared, h)),
                  (r"blk\.\d+\.ffn_down_shexp\.weight", (h, shared))]
    n_expert = A.expert_count(hp)
    if isinstance(n_expert, int):
        rules.append((r"blk\.\d+\.exp_probs_b\.bias", (n_expert,)))
    return rules


def _expected_shapes(arch: A.Arch, hp: dict, vocab_rows: int | None) -> list[tuple[re.Pattern, tuple]]:
    if arch.mla:
        h, n_expert = hp["hidden_size"], A.expert_count(hp)
        rules = _mla_shapes(hp) + [
            (r"token_embd\.weight", (hp["vocab_size"], h)), (r"output\.weight", (hp["vocab_size"], h)),
            (r"output_norm\.weight", (h,)), (r"blk\.\d+\.(attn_norm|ffn_norm)\.weight", (h,))]
        if isinstance(n_expert, int):
            rules.append((r"blk\.\d+\.ffn_gate_inp\.weight", (n_expert, h)))
        return [(re.compile(p + "$"), s) for p, s in rules]
    h, hd = hp["hidden_size"], A.head_dim(hp)
    nh, nkv = hp["num_attention_heads"], hp["num_key_value_heads"]
    ff = hp.get("intermediate_size")
    vocab = vocab_rows if vocab_rows is not None else hp["vocab_size"]
    rules = [
        (r"token_embd\.weight", (vocab, h)), (r"output\.weight", (vocab, h)), (r"output_norm\.weight", (h,)),
        (r"blk\.\d+\.attn_q\.weight", (nh * hd, h)), (r"blk\.\d+\.attn_k\.weight", (nkv * hd, h)),
        (r"blk\.\d+\.attn_v\.weight", (nkv * hd, h)), (r"blk\.\d+\.attn_output\.weight", (h, nh * hd)),
        (r"blk\.\d+\.attn_q\.bias", (nh * hd,)), (r"blk\.\d+\.attn_k\.bias", (nkv * hd,)),
        (r"blk\.\d+\.attn_v\.bias", (nkv * hd,)),
        (r"blk\.\d+\.(attn_norm|ffn_norm|post_attention_norm|post_ffw_norm)\.weight", (h,)),
        (r"blk\.\d+\.attn_[qk]_norm\.weight", (hd,)),
    ]
    if arch.fused_qkv_ffn:
        rules.append((r"blk\.\d+\.attn_qkv\.weight", ((nh + 2 * nkv) * hd, h)))
    if isinstance(ff, int):
        rules += [(r"blk\.\d+\.ffn_gate\.weight", (ff, h)), (r"blk\.\d+\.ffn_down\.weight", (h, ff)),
                  (r"blk\.\d+\.ffn_up\.weight", (2 * ff if arch.fused_qkv_ffn else ff, h))]
    n_expert = A.expert_count(hp)
    if isinstance(n_expert, int):
        rules.append((r"blk\.\d+\.ffn_gate_inp\.weight", (n_expert, h)))
    return [(re.compile(p + "$"), s) for p, s in rules]


def _stored_type(gname: str, st: SafetensorsTensor, n_dims: int, out_type: GGMLType, hf_name: str) -> GGMLType:
    """The type llama.cpp's converter stores a tensor as: F32 for 1-D tensors, norms, biases and the MoE router
    (ffn_gate_inp), else the output type."""
    if n_dims <= 1 or gname.endswith(("_norm.weight", "ffn_gate_inp.weight")) or not gname.endswith(".weight"):
        return GGMLType.F32
    if out_type == GGMLType.BF16 and st.dtype != "BF16":   # (a pre-quantized checkpoint's outtype is f32)
        raise ConvertError(f"outtype bf16 needs a BF16 checkpoint; tensor {hf_name!r} is {st.dtype}")
    return out_type


def _check_expert(hf_name: str, st: SafetensorsTensor, bid: int, xid: int, proj: str, n_layers: int,
                  n_expert: int | None, layout: A.ExpertLayout, hp: dict) -> None:
    if not isinstance(n_expert, int) or n_expert <= 0:
        raise ConvertError(f"tensor {hf_name!r} is an expert, but config.json gives no expert count")
    if bid >= n_layers:
        raise ConvertError(f"tensor {hf_name!r}: layer {bid} but config.json num_hidden_layers is {n_layers}")
    if xid >= n_expert:
        raise ConvertError(f"tensor {hf_name!r}: expert {xid} but config.json has {n_expert} experts")
    h, ff = hp["hidden_size"], hp.get(layout.ff_key)
    want = (h, ff) if layout.gguf[proj].endswith("ffn_down_exps.weight") else (ff, h)
    if tuple(st.shape) != want:
        raise ConvertError(f"tensor {hf_name!r} has shape {list(st.shape)} but config.json implies {list(want)}")


def _required_mla(hp: dict, n_layers: int) -> list[str]:
    attn = ["attn_q"] if hp.get("q_lora_rank") is None else ["attn_q_a", "attn_q_a_norm", "attn_q_b"]
    per_layer = ["attn_norm", *attn, "attn_kv_a_mqa", "attn_kv_a_norm", "attn_k_b", "attn_v_b", "attn_output",
                 "ffn_norm"]
    moe = ["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
    if hp.get("n_shared_experts"):
        moe += ["ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"]
    names = ["token_embd.weight", "output_norm.weight"]
    n_dense = A.dense_lead_layers(hp)
    for b in range(n_layers):
        ffn = ["ffn_gate", "ffn_up", "ffn_down"] if b < n_dense else moe
        names += [f"blk.{b}.{p}.weight" for p in per_layer + ffn]
    return names


def _required(arch: A.Arch, n_layers: int, hp: dict) -> list[str]:
    if arch.mla:
        return _required_mla(hp, n_layers)
    attn = ["attn_qkv"] if arch.fused_qkv_ffn else ["attn_q", "attn_k", "attn_v"]
    if arch.fused_qkv_ffn:
        ffn = ["ffn_up", "ffn_down"]
    elif arch.experts is not None or arch.fused_experts is not None:
        ffn = ["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
    else:
        ffn = ["ffn_gate", "ffn_up", "ffn_down"]
    per_layer = ["attn_norm", *attn, "attn_output", *ffn, "ffn_norm"]
    if arch.gguf_arch in ("gemma2", "gemma3"):
        per_layer += ["post_attention_norm", "post_ffw_norm"]
    if arch.fused_experts is not None:   # gpt-oss: attention sinks, post_attention_norm instead of ffn_norm
        per_layer = [p for p in per_layer if p != "ffn_norm"] + ["post_attention_norm", "attn_sinks"]
    names = ["token_embd.weight", "output_norm.weight"]
    for b in range(n_layers):
        names += [f"blk.{b}.{p}.weight" for p in per_layer]
    return names


class HFRecipe(SourceRecipe):
    """A checkpoint opened again (by its absolute path) with the same open_hf_source arguments."""

    def __init__(self, path: str, outtype: str, name: str | None, vocab_only: bool):
        self.args = (path, outtype, name, vocab_only)

    def open(self) -> HFSource:
        return open_hf_source(*self.args)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFRecipe) and other.args == self.args

    def __hash__(self) -> int:
        return hash(("hf",) + self.args)


def open_hf_source(path: str | os.PathLike, outtype: str = "auto", name: str | None = None,
                   vocab_only: bool = False) -> HFSource:
    """Open a checkpoint (folder or .safetensors file) as the converter's output would look.

    ``outtype``: "f32", "f16", "bf16", or "auto" (bf16 for a BF16 checkpoint, else f32: what gguftool's
    reference conversion uses before quantizing).
    """
    ck = Checkpoint.open(path)
    try:
        src = _build(ck, outtype, name, vocab_only)
    except BaseException:
        ck.close()
        raise
    src.opened_as = HFRecipe(os.path.abspath(os.fspath(path)), outtype, name, vocab_only)
    return src


def _index(ck: Checkpoint, arch: A.Arch, hp: dict, pq: Prequant, out_type: GGMLType) -> list[tuple[str, str, object]]:
    """Pass 1, headers only: every checkpoint tensor the converter writes as (GGUF name, HF name, its
    SafetensorsTensor or, for a MoE projection, {(proj, expert): SafetensorsTensor}, or for gpt-oss's fused
    experts the SourceTensor itself), in llama.cpp's order.

    Checks the sizes config.json claims (layers, vocabulary, widths, experts) against the tensors actually present
    before anything proportional to those sizes is built, so a lying config.json costs nothing.
    """
    n_layers = hp["num_hidden_layers"]
    shapes = _expected_shapes(arch, hp, None)
    entries: list[tuple[str, str, object]] = []
    seen: dict[str, str] = {}
    layers: set[int] = set()
    layout = arch.experts
    n_expert = A.expert_count(hp) if layout else None
    pending: dict[int, dict[tuple[str, int], SafetensorsTensor]] = {}   # MoE layer -> its expert tensors so far
    fused = arch.fused_experts(hp, out_type) if arch.fused_experts is not None else None
    for hf_name, st in ck.tensors.items():
        fname = _filtered_name(hf_name)
        if fname is None or fname.endswith(A.SKIPPED_SUFFIXES) or (arch.skip_lm_head and fname == "lm_head.weight"):
            continue
        if pq.skipped(hf_name):   # a scale (applied to its weight) or an unused activation scale
            continue
        if arch.mla:   # DeepseekV2Model.modify_tensors drops a tied lm_head and the multi-token-prediction layers
            if fname in ("lm_head.weight", "model.lm_head.weight") and hp.get("tie_word_embeddings"):
                continue
            m = re.match(r"model\.layers\.(\d+)", fname)
            if m and int(m.group(1)) >= n_layers:
                continue
        if fused is not None:
            got = fused.take(fname, st)
            if got is not None:
                bid = int(fname.split(".")[2])
                if bid >= n_layers:
                    raise ConvertError(f"tensor {hf_name!r}: layer {bid} but config.json num_hidden_layers is "
                                       f"{n_layers}")
                layers.add(bid)
                for gname, t in got:
                    entries.append((gname, hf_name, t))
                    seen[gname] = hf_name
                continue
            fname = fused.rename(fname)
        if st.dtype not in SUPPORTED_DTYPES:
            raise ConvertError(f"{st.file.path}: tensor {hf_name!r} has dtype {st.dtype}, which gguftool cannot "
                               f"convert (supported: {', '.join(sorted(SUPPORTED_DTYPES))})")
        m = layout.match(fname) if layout else None
        if m is not None:
            bid, xid, proj = int(m["bid"]), int(m["xid"]), m["proj"]
            _check_expert(hf_name, st, bid, xid, proj, n_layers, n_expert, layout, hp)
            layers.add(bid)
            group = pending.setdefault(bid, {})
            group[(proj, xid)] = st
            if len(group) == 3 * n_expert:   # as llama.cpp: merged once the layer's last expert tensor is read
                for p in layout.order:
                    gname = layout.gguf[p].format(bid=bid)
                    entries.append((gname, hf_name, {x: group[(p, x)] for x in range(n_expert)}))
                    seen[gname] = hf_name
                del pending[bid]
            continue
        if arch.mla and fname.endswith("self_attn.kv_b_proj.weight"):   # split into attn_k_b and attn_v_b
            bid = int(fname.split(".")[2])
            layers.add(bid)
            kv_lora, nope, _, v_dim = A.mla_dims(hp)
            kv_b_shape = [hp["num_key_value_heads"] * (nope + v_dim), kv_lora]
            if list(st.shape) != kv_b_shape:
                raise ConvertError(f"tensor {hf_name!r} has shape {list(st.shape)} but config.json implies "
                                   f"{kv_b_shape}")
            for part in ("k_b_proj", "v_b_proj"):
                gname = arch.map_name(fname.replace("kv_b_proj", part))
                assert gname is not None
                seen[gname] = hf_name
                entries.append((gname, hf_name, st))
            continue
        gname = arch.map_name(fname)
        if gname is None:
            raise ConvertError(f"tensor {hf_name!r} has no GGUF name for architecture {arch.hf_names[0]}")
        bid = next((int(p) for p in fname.split(".") if p.isdecimal()), None)
        if bid is not None and bid >= n_layers:
            raise ConvertError(f"tensor {hf_name!r}: layer {bid} but config.json num_hidden_layers is {n_layers}")
        if bid is not None:
            layers.add(bid)
        if gname in seen:
            raise ConvertError(f"tensors {seen[gname]!r} and {hf_name!r} both map to {gname}")
        seen[gname] = hf_name
        for pat, want in shapes:
            if pat.match(gname):
                if tuple(st.shape) != tuple(want):
                    raise ConvertError(f"tensor {hf_name!r} has shape {list(st.shape)} but config.json implies "
                                       f"{list(want)}")
                break
        entries.append((gname, hf_name, st))
    if fused is not None:   # gpt-oss's repacked MXFP4 experts: generate_extra_tensors writes them first
        front = fused.finish()
        seen.update((gname, "") for gname, _ in front)
        entries = [(gname, "", t) for gname, t in front] + entries
    for bid, group in sorted(pending.items()):
        raise ConvertError(f"layer {bid} has {len(group)} of its {3 * n_expert} expert tensors "
                           f"({n_expert} experts x 3 projections)")

    # every layer below n_layers holds tensors, so the names listed are bounded by the tensors present
    missing = [n for n in _required(arch, min(n_layers, len(layers) + 1), hp) if n not in seen]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConvertError(f"checkpoint is missing tensor(s) {', '.join(missing[:3])}{more} "
                           f"for {n_layers} layers of {arch.hf_names[0]}")
    return entries


def _build(ck: Checkpoint, outtype: str, name: str | None, vocab_only: bool) -> HFSource:
    arch = A.arch_for_config(ck.config)
    hp = A.normalized_config(arch, ck.config)
    # gpt-oss's MXFP4 experts are repacked, not dequantized (hf.gptoss): no scale convention applies to them
    pq = Prequant(None) if arch.fused_experts is not None and is_mxfp4(ck.config) else find_prequantized(ck)
    if outtype == "auto":   # dequantized FP8 weights are exact in float32 only
        outtype = "bf16" if ck.dominant_dtype() == "BF16" and not pq.active else "f32"
    if outtype not in _OUT_TYPE:
        raise ConvertError(f"unknown outtype {outtype!r}")
    out_type = _OUT_TYPE[outtype]
    entries = _index(ck, arch, hp, pq, out_type)

    voc_kvs, vinfo = vocab_kvs(arch.vocab, ck.directory, hp)
    vocab_rows = gemma3_vocab_rows(ck.directory, hp) if arch.trim_vocab_rows else None
    nh, nkv = hp["num_attention_heads"], hp["num_key_value_heads"]

    tensors: list[SourceTensor] = []
    early_kvs, generated = arch.generated(hp) if arch.generated is not None else ([], [])
    tensors.extend(GeneratedTensor(n, a) for n, a in generated)
    for gname, hf_name, st in entries:
        if isinstance(st, SourceTensor):   # built by the architecture's fused_experts (gpt-oss)
            tensors.append(st)
            continue
        if isinstance(st, dict):   # a MoE projection: one tensor per expert, stacked
            parts = [HFTensor(gname, t, _stored_type(gname, t, 2, out_type, hf_name), scaled=pq.scaled.get(t.name))
                     for t in st.values()]
            tensors.append(ExpertsTensor(gname, parts))
            continue
        fname = _filtered_name(hf_name)
        transform = None
        if arch.permute_qk and fname.endswith(("q_proj.weight", "q_proj.bias")):
            transform = (lambda a, h=nh: A.permute_qk(a, h, h))
        elif arch.permute_qk and fname.endswith(("k_proj.weight", "k_proj.bias")):
            transform = (lambda a, h=nh, k=nkv: A.permute_qk(a, h, k))
        elif arch.norm_shift and fname.endswith("norm.weight"):
            transform = (lambda a, s=arch.norm_shift: a + a.dtype.type(s))
        out_shape = None
        if arch.mla and gname.endswith(("attn_k_b.weight", "attn_v_b.weight")):
            part = "k" if gname.endswith("attn_k_b.weight") else "v"
            kv_lora, nope, _, v_dim = A.mla_dims(hp)
            # the checkpoint's kv_b_proj is split with its own head count (the config's, before the MQA rewrite)
            transform = (lambda a, n=nkv, d=(nope, v_dim), p=part: A.split_kv_b(a, n, d[0], d[1], p))
            out_shape = (nkv, kv_lora, nope) if part == "k" else (nkv, v_dim, kv_lora)
        rows = None
        if arch.trim_vocab_rows and "embed_tokens.weight" in fname and vocab_rows is not None:
            rows = min(vocab_rows, st.shape[0])
        n_dims = len(out_shape) if out_shape is not None else len(st.shape)
        tensors.append(HFTensor(gname, st, _stored_type(gname, st, n_dims, out_type, hf_name), transform,
                                rows, pq.scaled.get(hf_name), out_shape))

    label = name or _default_name(ck.directory)
    kv = A.KVList()
    kv.extend(metadata_kvs(arch, label, tensors, early_kvs))
    kv.extend(A.hyperparameters(arch, hp))
    # llama_ftype, as llama.cpp writes it; an MXFP4 checkpoint (gpt-oss) is labelled MXFP4_MOE whatever the outtype
    ftype = MXFP4_FTYPE if arch.fused_experts is not None and is_mxfp4(ck.config) else outtype.upper()
    kv.u32("general.file_type", FTYPES[ftype].id)
    kv.u32("general.quantization_version", GGML_QUANT_VERSION)
    kv.extend(voc_kvs)
    src = HFSource(kvs=kv.items(), tensors=[] if vocab_only else tensors, checkpoint=ck, arch=arch, hparams=hp,
                   vocab=vinfo, outtype=outtype, name=label, prequant=pq)
    return src

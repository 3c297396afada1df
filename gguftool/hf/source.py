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
from ..pipeline.source import SourceTensor, TensorSource
from . import archs as A
from .checkpoint import SUPPORTED_DTYPES, Checkpoint, SafetensorsTensor
from .gptoss import MXFP4_FTYPE, is_mxfp4
from .vocab import VocabInfo, gemma3_vocab_rows, tokenizer_files, vocab_kvs

GGML_QUANT_VERSION = 2
_OUT_TYPE = {"f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16}


# --- tensors
class HFTensor(SourceTensor):
    """One checkpoint tensor as the converter writes it (transform applied when read).

    Of SourceTensor's slab-reading interface it has its own read_rows and keeps the defaults for the rest: no
    background reads (concurrent_reads: a shard is mapped on first use, by whichever thread gets there) and no
    raw_location (what it reads is converted from the checkpoint's bytes, not stored as they are)."""

    def __init__(self, name: str, st: SafetensorsTensor, out_type: GGMLType,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None, rows: int | None = None):
        self.name = name
        self.st = st
        self.type = out_type
        self.transform = transform
        self.rows = rows  # keep only the first `rows` rows (Gemma3 vocabulary trim)
        hf_shape = list(st.shape)
        if rows is not None:
            hf_shape[0] = rows
        self.hf_shape = tuple(hf_shape)
        self.shape = tuple(reversed(hf_shape)) if hf_shape else (1,)

    def _values(self) -> np.ndarray:
        """The transformed values in the dtype llama.cpp transforms them in (F16 stays F16, BF16 -> F32)."""
        a = self.st.array()
        if self.rows is not None:
            a = a[: self.rows]
        if self.st.dtype == "BF16":
            from .checkpoint import bf16_to_f32
            a = bf16_to_f32(a)
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
        a = self.st.array()[start:stop]
        if self.st.dtype == "BF16":
            from .checkpoint import bf16_to_f32
            return bf16_to_f32(a)
        return np.ascontiguousarray(a, dtype=np.float32)

    def read_raw(self) -> np.ndarray:
        if self.type == GGMLType.F32:
            return self.read_f32().reshape(-1).view(np.uint8)
        if self.type == GGMLType.BF16:
            if self.st.dtype != "BF16":
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


def _expected_shapes(arch: A.Arch, hp: dict, vocab_rows: int | None) -> list[tuple[re.Pattern, tuple]]:
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
    if out_type == GGMLType.BF16 and st.dtype != "BF16":
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


def _required(arch: A.Arch, n_layers: int) -> list[str]:
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


def open_hf_source(path: str | os.PathLike, outtype: str = "auto", name: str | None = None,
                   vocab_only: bool = False) -> HFSource:
    """Open a checkpoint (folder or .safetensors file) as the converter's output would look.

    ``outtype``: "f32", "f16", "bf16", or "auto" (bf16 for a BF16 checkpoint, else f32: what gguftool's
    reference conversion uses before quantizing).
    """
    ck = Checkpoint.open(path)
    try:
        return _build(ck, outtype, name, vocab_only)
    except BaseException:
        ck.close()
        raise


def _index(ck: Checkpoint, arch: A.Arch, hp: dict, out_type: GGMLType) -> list[tuple[str, str, object]]:
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
    missing = [n for n in _required(arch, min(n_layers, len(layers) + 1)) if n not in seen]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConvertError(f"checkpoint is missing tensor(s) {', '.join(missing[:3])}{more} "
                           f"for {n_layers} layers of {arch.hf_names[0]}")
    return entries


def _build(ck: Checkpoint, outtype: str, name: str | None, vocab_only: bool) -> HFSource:
    arch = A.arch_for_config(ck.config)
    hp = A.normalized_config(arch, ck.config)
    if outtype == "auto":
        outtype = "bf16" if ck.dominant_dtype() == "BF16" else "f32"
    if outtype not in _OUT_TYPE:
        raise ConvertError(f"unknown outtype {outtype!r}")
    out_type = _OUT_TYPE[outtype]
    entries = _index(ck, arch, hp, out_type)

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
            parts = [HFTensor(gname, t, _stored_type(gname, t, 2, out_type, hf_name)) for t in st.values()]
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
        rows = None
        if arch.trim_vocab_rows and "embed_tokens.weight" in fname and vocab_rows is not None:
            rows = min(vocab_rows, st.shape[0])
        tensors.append(HFTensor(gname, st, _stored_type(gname, st, len(st.shape), out_type, hf_name), transform,
                                rows))

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
                   vocab=vinfo, outtype=outtype, name=label)
    return src

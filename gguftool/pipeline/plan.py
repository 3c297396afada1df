"""Planning a quantize (or convert) run: every decision taken, and every request checked, before a byte is written.

:func:`make_plan` turns a :class:`QuantizeConfig` (llama-quantize's options) and a ``TensorSource`` into a
:class:`Plan`: each tensor's output type (``policy``), the output metadata and the output file(s). A bad request
raises here, so it never leaves a partial file; :mod:`.execute` then streams the data. What lands in the file
mirrors llama.cpp's ``llama_model_quantize_impl`` (src/llama-quant.cpp):

- tensors in llama's order (non-layer tensors first, then by layer, each group sorted by name), but for
  ``gguftool convert`` to a type llama.cpp's converter writes itself (:data:`CONVERTER_FTYPES`) in its order;
- KV pairs of the input in order, then ``general.quantization_version`` and ``general.file_type`` moved to
  the end (llama.cpp's gguf_set_val_* removes a key and appends it), ``split.*`` keys removed, then the
  --override-kv pairs and the ``quantize.imatrix.*`` keys the same way;
- a tensor whose type does not change is copied byte for byte; others are converted to float32 (dequantized
  if needed) and quantized with the imatrix weights of their name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import policy as P
from ..errors import ImatrixError, PolicyError
from ..gguf.constants import (GGML_QUANTIZATION_VERSION, KEY_FILE_TYPE, KEY_QUANTIZATION_VERSION, GGMLType,
                             GGUFValueType)
from ..gguf.values import KV, kv_bool, kv_f32, kv_str, kv_u32
from ..importance.files import Imatrix
from .source import SourceTensor, TensorSource

__all__ = ["QuantizeConfig", "Plan", "make_plan", "output_kvs", "imatrix_kvs", "parse_kv_override", "split_by_limit",
           "output_files", "shape3"]

# The file types llama.cpp's convert_hf_to_gguf.py writes itself (--outtype f32/f16/bf16/q8_0). ``gguftool convert``
# to one of them keeps that script's tensor order (order="convert"), which the Hugging Face source reproduces:
# generate_extra_tensors (rope_freqs) first, then the safetensors files in sorted name order, the tensors of each
# file in sorted name order (gguf-py's SafetensorsLocal), each as modify_tensors yields it (merged MoE experts once
# a layer's last expert tensor is read); gguf-py's writer keeps that order. Other types go through llama-quantize,
# whose order is llama's.
CONVERTER_FTYPES = frozenset({"F32", "F16", "BF16", "Q8_0"})

_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
KEY_IMATRIX_FILE = "quantize.imatrix.file"
KEY_IMATRIX_DATASET = "quantize.imatrix.dataset"
KEY_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KEY_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"


# --- request


@dataclass
class QuantizeConfig:
    """Everything a quantize request says (llama-quantize's options)."""
    ftype: P.FileType
    pure: bool = False
    leave_output_tensor: bool = False
    output_tensor_type: GGMLType | None = None
    token_embedding_type: GGMLType | None = None
    tensor_types: list[tuple[str, GGMLType]] = field(default_factory=list)   # --tensor-type REGEX=TYPE
    imatrix: Imatrix | None = None
    imatrix_path: str | None = None        # as given on the command line (goes into quantize.imatrix.file)
    include_weights: list[str] = field(default_factory=list)
    exclude_weights: list[str] = field(default_factory=list)
    allow_requantize: bool = False
    kv_overrides: list[KV] = field(default_factory=list)
    order: str = "llama"                   # "llama": llama-quantize's tensor order; "source": as given;
                                           # "convert": as given for CONVERTER_FTYPES, else llama's (see there)
    keep_split: bool = False               # --keep-split: one output file per input split, tensors in file order
    split_max_bytes: int | None = None     # --split-max-size: split the output as gguf-split does
    split_max_tensors: int | None = None   # --split-max-tensors
    set_quant_kvs: bool = True             # write general.quantization_version / general.file_type


@dataclass
class Plan:
    tensors: list[P.TensorPlan]            # in output order
    sources: dict[str, SourceTensor]
    kvs: list[KV]                          # output metadata in order
    model: P.ModelParams | None
    imatrix: dict[str, np.ndarray] | None  # name -> per-column weights (after include/exclude)
    warnings: list[str] = field(default_factory=list)
    n_fallback: int = 0
    split_of: list[int] | None = None      # --keep-split: the output file of each tensor (None: one file)

    @property
    def src_bytes(self) -> int:
        return sum(t.src_nbytes for t in self.tensors)

    @property
    def out_bytes(self) -> int:
        return sum(t.new_nbytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def out_bpw(self) -> float:
        return self.out_bytes * 8.0 / self.n_elements if self.n_elements else 0.0

    @property
    def src_bpw(self) -> float:
        return self.src_bytes * 8.0 / self.n_elements if self.n_elements else 0.0


# --- metadata


def parse_kv_override(text: str) -> KV:
    """KEY=TYPE:VALUE with TYPE int, float, bool or str (common.cpp string_parse_kv_override).

    Written as llama_model_quantize writes overrides: int -> UINT32 of |value|, float -> FLOAT32, bool -> BOOL,
    str -> STRING (at most 127 bytes).
    """
    key, sep, rest = text.partition("=")
    if not sep or not key or len(key) >= 128:
        raise PolicyError(f"malformed KV override {text!r}: expected KEY=TYPE:VALUE")
    kind, sep, value = rest.partition(":")
    if not sep or kind not in ("int", "float", "bool", "str"):
        raise PolicyError(f"invalid type for KV override {text!r}: TYPE must be int, float, bool or str")
    try:
        if kind == "int":
            v = abs(int(value, 0))
            if v >= 2 ** 32:
                raise PolicyError(f"KV override {text!r}: {value} does not fit the UINT32 llama.cpp writes")
            return kv_u32(key, v)
        if kind == "float":
            return kv_f32(key, float(value))
    except ValueError:
        raise PolicyError(f"invalid {kind} value in KV override {text!r}") from None
    if kind == "bool":
        if value not in ("true", "false"):
            raise PolicyError(f"invalid boolean value for KV override {text!r} (true or false)")
        return kv_bool(key, value == "true")
    if len(value.encode("utf-8", "surrogateescape")) > 127:
        raise PolicyError(f"malformed KV override {text!r}: value cannot exceed 127 bytes")
    return kv_str(key, value)


def _trunc127(s: str) -> str:
    # quantize.cpp strncpy's into char[128]
    return s.encode("utf-8", "surrogateescape")[:127].decode("utf-8", "surrogateescape")


def imatrix_kvs(path: str, im: Imatrix, n_entries: int) -> list[KV]:
    """The quantize.imatrix.* keys llama-quantize adds (as KV overrides, in this order)."""
    out = [kv_str(KEY_IMATRIX_FILE, _trunc127(path))]
    if im.datasets:
        out.append(kv_str(KEY_IMATRIX_DATASET, _trunc127(im.datasets[0])))
    out.append(kv_u32(KEY_IMATRIX_N_ENTRIES, n_entries))
    if im.chunk_count > 0:
        out.append(kv_u32(KEY_IMATRIX_N_CHUNKS, im.chunk_count))
    return out


def output_kvs(src_kvs: Sequence[KV], ftype: P.FileType | None, overrides: Sequence[KV] = ()) -> list[KV]:
    """The output metadata, in llama-quantize's order (see the module docstring)."""
    kvs = list(src_kvs)

    def set_kv(kv: KV) -> None:
        kvs[:] = [k for k in kvs if k.key != kv.key]
        kvs.append(kv)

    if ftype is not None:
        set_kv(kv_u32(KEY_QUANTIZATION_VERSION, GGML_QUANTIZATION_VERSION))
        set_kv(kv_u32(KEY_FILE_TYPE, ftype.id))
    kvs[:] = [k for k in kvs if k.key not in _SPLIT_KEYS]
    for kv in overrides:
        set_kv(kv)
    return kvs


# --- planning


def shape3(shape: Sequence[int]) -> tuple[int, int, int]:
    """(ne0, ne1, ne2) of a shape, missing dimensions as 1."""
    s = list(shape) + [1, 1, 1]
    return s[0], s[1], s[2]


def make_plan(source: TensorSource, cfg: QuantizeConfig, dry_run: bool = False) -> Plan:
    """Decide every tensor's type and check the request against the source; raises GGUFError subclasses.

    dry_run: a missing imatrix that the mix needs is a warning instead of an error (as llama-quantize
    --dry-run reports it)."""
    warnings: list[str] = []
    by_name: dict[str, SourceTensor] = {}
    for t in source.tensors:
        if t.name in by_name:
            raise PolicyError(f"duplicate tensor name {t.name!r} in the source")
        by_name[t.name] = t
    if cfg.keep_split:   # llama-quantize: sorted by (split, offset in the split's data section)
        found = {n: t.split_position() for n, t in by_name.items()}
        positions = {n: p for n, p in found.items() if p is not None}
        if len(positions) != len(found):
            raise PolicyError("--keep-split needs a GGUF input (it keeps the input's split files)")
        names = sorted(by_name, key=lambda n: positions[n])
    elif cfg.order == "llama" or (cfg.order == "convert" and cfg.ftype.name not in CONVERTER_FTYPES):
        names = P.llama_tensor_order(by_name)
    else:
        names = list(by_name)

    # imatrix: include/exclude, then the weights llama-quantize computes
    weights = None
    extra_kvs: list[KV] = []
    if cfg.imatrix is not None:
        im = cfg.imatrix
        if not im.is_legacy and not im.has_metadata:
            raise ImatrixError(f"{cfg.imatrix_path or 'imatrix'}: missing imatrix metadata (imatrix.datasets, "
                               f"imatrix.chunk_count, imatrix.chunk_size)")
        im = im.filtered(cfg.include_weights, cfg.exclude_weights)
        weights = im.weights()
        for name, w in weights.items():
            bad = np.flatnonzero(~np.isfinite(w))
            if bad.size:
                raise ImatrixError(f"imatrix entry {name} contains a non-finite value ({w[bad[0]]!r} at "
                                   f"column {int(bad[0])})")
        if weights:
            extra_kvs = imatrix_kvs(cfg.imatrix_path or "", im, len(weights))
        else:
            warnings.append("no imatrix entries left after --include-weights/--exclude-weights: "
                            "quantizing without an imatrix")
            weights = None

    opts = P.QuantOptions(cfg.ftype, pure=cfg.pure, leave_output_tensor=cfg.leave_output_tensor,
                          output_tensor_type=cfg.output_tensor_type,
                          token_embedding_type=cfg.token_embedding_type,
                          tensor_types=list(cfg.tensor_types), has_imatrix=weights is not None)
    model = P.ModelParams.from_metadata(source.get)
    plans = P.plan([(n, by_name[n].shape, by_name[n].type) for n in names], model, opts)

    requantized: dict[str, int] = {}
    missing: list[str] = []
    if not dry_run and weights is None:
        # llama.cpp checks every tensor's need of an importance matrix before anything else about it
        for tp in plans:
            if tp.requires_imatrix and tp.allows_quantization:
                raise PolicyError(f"this quantization requires an imatrix (tensor {tp.name} -> {tp.new_type.name} "
                                  f"in a {cfg.ftype.name} file); give one with --imatrix")
    for tp in plans:
        if dry_run and tp.requires_imatrix and weights is None:
            if not any("will require an imatrix" in w for w in warnings):
                warnings.append(f"actually quantizing to {cfg.ftype.name} will require an imatrix "
                                f"(tensor {tp.name} -> {tp.new_type.name})")
            continue
        _check_tensor(tp, cfg, weights, warnings, requantized, missing)
    if missing:
        warnings.append(f"no imatrix weights for {len(missing)} tensors ({', '.join(missing[:3])}"
                        f"{', ...' if len(missing) > 3 else ''}): quantized without")
    if requantized:
        kinds = ", ".join(f"{n} x{c}" for n, c in sorted(requantized.items()))
        warnings.append(f"requantizing {sum(requantized.values())} already-quantized tensors ({kinds}): "
                        f"quality will be lower than quantizing from F32/F16/BF16")

    kvs = output_kvs(source.kvs, cfg.ftype if cfg.set_quant_kvs else None,
                     list(cfg.kv_overrides) + extra_kvs)
    split_of = [positions[tp.name][0] for tp in plans] if cfg.keep_split else None
    if cfg.split_max_bytes or cfg.split_max_tensors:
        if cfg.keep_split:
            raise PolicyError("--keep-split cannot be combined with --split-max-size / --split-max-tensors")
        split_of = split_by_limit(plans, cfg.split_max_bytes, cfg.split_max_tensors)
    return Plan(plans, by_name, kvs, model, weights, warnings, P.count_fallbacks(plans), split_of)


def split_by_limit(plans: Sequence[P.TensorPlan], max_bytes: int | None, max_tensors: int | None) -> list[int]:
    """The output file of each tensor when the output is split as llama.cpp's gguf-split splits a file: a new
    file starts when the tensor data (each tensor padded to 32 bytes) would pass ``max_bytes``, or every
    ``max_tensors`` tensors."""
    out: list[int] = []
    split, size, count = 0, 0, 0
    for i, tp in enumerate(plans):
        n = -(-tp.new_nbytes // 32) * 32
        if max_bytes:
            if size + n > max_bytes:
                if count == 0:
                    raise PolicyError(f"tensor {tp.name} ({n:,} bytes) is larger than --split-max-size "
                                      f"({max_bytes:,} bytes)")
                split, size, count = split + 1, 0, 0
            size += n
        elif i > 0 and i % max_tensors == 0:
            split += 1
        out.append(split)
        count += 1
    return out


def output_files(plan: Plan, out_path: str) -> list[tuple[str, list[KV], list[P.TensorPlan]]]:
    """(path, metadata, tensors) of each file the plan writes: one, or (--keep-split, --split-max-*) one per split,
    named as llama-quantize and gguf-split name them (OUT without .gguf, then -00001-of-0000N.gguf) and each given
    the split.* keys when there is more than one (the first file also has all the metadata)."""
    if plan.split_of is None:
        return [(out_path, plan.kvs, plan.tensors)]
    from ..gguf.source import split_path

    n = max(plan.split_of, default=0) + 1
    prefix = out_path[:-len(".gguf")] if out_path.endswith(".gguf") else out_path
    files = []
    for i in range(n):
        kvs = list(plan.kvs) if i == 0 else []
        if n > 1:
            kvs += [KV(_SPLIT_KEYS[0], GGUFValueType.UINT16, i), KV(_SPLIT_KEYS[1], GGUFValueType.UINT16, n),
                    KV(_SPLIT_KEYS[2], GGUFValueType.INT32, len(plan.tensors))]
        files.append((split_path(prefix, i, n), kvs, [tp for tp, s in zip(plan.tensors, plan.split_of) if s == i]))
    return files


def _check_tensor(tp: P.TensorPlan, cfg: QuantizeConfig, weights, warnings: list[str],
                  requantized: dict[str, int], missing: list[str]) -> None:
    from ..quants import SUPPORTED_TYPES, can_dequantize

    name = tp.name
    if tp.requires_imatrix and tp.allows_quantization and weights is None:
        raise PolicyError(f"this quantization requires an imatrix (tensor {name} -> {tp.new_type.name} in a "
                          f"{cfg.ftype.name} file); give one with --imatrix")
    if not tp.converts:
        return
    if tp.requires_imatrix and name not in weights:
        raise ImatrixError(f"missing importance matrix for tensor {name} in a very low-bit quantization "
                           f"({tp.new_type.name})")
    if tp.new_type not in SUPPORTED_TYPES:
        raise PolicyError(f"tensor {name}: gguftool cannot quantize to {tp.new_type.name}")
    if P.is_quantized(tp.src_type):
        if not cfg.allow_requantize:
            raise PolicyError(f"tensor {name} is already quantized ({tp.src_type.name}); requantizing is "
                              f"disabled (use --allow-requantize)")
        requantized[tp.src_type.name] = requantized.get(tp.src_type.name, 0) + 1
    if not can_dequantize(tp.src_type) and tp.src_type not in (GGMLType.F16, GGMLType.BF16):
        raise PolicyError(f"tensor {name}: cannot read {tp.src_type.name} data to convert it")
    if weights is not None and name in weights:
        ne0, _, ne2 = shape3(tp.shape)
        if weights[name].size != ne0 * ne2:
            msg = (f"imatrix size {weights[name].size} is different from tensor size {ne0 * ne2} for {name}")
            if name in ("token_embd.weight", "per_layer_token_embd.weight"):
                warnings.append(msg + " (ignored for the token embeddings)")
            else:
                raise ImatrixError(msg)
    elif weights is not None and P.is_quantized(tp.new_type) and tp.new_type != GGMLType.Q8_0:
        missing.append(name)

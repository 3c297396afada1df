"""Pre-quantized checkpoints: FP8 (and int8) weights stored with scale tensors, dequantized as llama.cpp does.

Which formats, as llama.cpp's converter reads them (``conversion/base.py`` ``ModelBase.dequant_model``; the
scale conventions are named by config.json's ``quantization_config.quant_method``):

- ``fp8`` (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8 ...): ``X_scale_inv`` scales ``X`` (despite the name it
  multiplies), in blocks of ``weight_block_size`` (128 x 128; edge blocks may be partial) or, without a block size,
  per tensor / per row by broadcasting; Mistral's ``X.qscale_weight`` scales ``X.weight`` the same way.
  ``.activation_scale``, ``_activation_scale`` and ``.qscale_act`` are dropped.
- ``compressed-tensors`` (``float-quantized``, ``int-quantized``, ``naive-quantized``; one config group):
  ``X.weight_scale`` scales ``X.weight`` per channel (``[rows, 1]``), per block (``block_structure``) or per
  tensor. llama.cpp's converter stops at an ``input_scale`` and at the ``tensor`` strategy (an assertion);
  gguftool drops the first (an activation scale, unused by the weights) and dequantizes the second by the same
  rule (a scalar broadcast), see the ``scheme_for`` notes.
- ``modelopt`` (NVIDIA ModelOpt FP8; also from ``hf_quant_config.json``): ``X.weight_scale`` (per tensor)
  scales ``X.weight``; ``.input_scale``, ``.k_scale``, ``.v_scale`` are dropped.

The arithmetic is the converter's ``dequant_simple``: the weight widened to float32 (every FP8 code exactly, by a
256-entry table checked against torch's conversion), the scale widened to float32, the block scales repeated
over their block and cut to the weight's shape, then one float32 multiply ``weight * scale`` per element. Scale
tensors are never written. A tensor is dequantized one slab of rows at a time (``ScaledWeight.rows``), so the
memory needed is that of the rows being converted, as for a BF16 checkpoint.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConvertError
from .checkpoint import Checkpoint, SafetensorsTensor, widen_f32


# --- FP8 codes (decoding tables live in checkpoint.py, where every dtype is read)

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_DTYPES = ("F32", "BF16", "F16")
WEIGHT_DTYPES = ("F8_E4M3", "F8_E5M2", "I8", "BF16", "F16", "F32")


# --- which convention a checkpoint uses


@dataclass(frozen=True)
class QuantScheme:
    """How one checkpoint stores its quantized weights (from config.json's quantization_config)."""

    method: str                                  # quant_method ("fp8", "compressed-tensors", "modelopt")
    block: tuple[int, ...] | None                # weight_block_size / block_structure; None: broadcast
    rules: tuple[tuple[str, str], ...]           # (scale name suffix, the suffix its weight has instead)
    dropped: tuple[str, ...]                     # suffixes of tensors not written (activation scales)
    weight_optional: bool = False                # modelopt: a scale without its weight is dropped
    notes: tuple[str, ...] = ()                  # what gguftool does differently from llama.cpp's converter

    def describe(self) -> str:
        block = ("weight_block_size " + "x".join(map(str, self.block)) if self.block
                 else "no block size (scales broadcast)")
        return f"quant_method {self.method}, {block}"


_SCALE_SUFFIXES = ("_scale_inv", ".weight_scale", ".qscale_weight")
_UNSUPPORTED = {
    "gptq": "dequantize it to BF16 first (e.g. with GPTQModel) or convert a BF16 release",
    "awq": "convert the BF16 release of the model instead",
    "bitnet": "convert the BF16 release of the model instead",
    "bitsandbytes": "convert the BF16 release of the model instead",
    "mxfp4": "gguftool reads MXFP4 checkpoints of gpt-oss (GptOssForCausalLM) only",
}


def _positive_ints(value, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or not value or len(value) > 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 20 for v in value)):
        raise ConvertError(f"config.json {where} is {json.dumps(value)[:60]}, expected null or a list of 1 to 3 "
                           f"positive integers such as [128, 128]")
    return tuple(value)


def _modelopt_config(directory: Path) -> dict | None:
    """hf_quant_config.json's "quantization" object, as llama.cpp's prepare_tensors reads it, or None."""
    p = directory / "hf_quant_config.json"
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{p}: expected a JSON object")
    q = data.get("quantization") or {}
    producer = data.get("producer") or {}
    if not isinstance(q, dict) or not isinstance(producer, dict):
        raise ConvertError(f"{p}: 'quantization' and 'producer' must be objects")
    return {"quant_method": q.get("quant_method", str(producer.get("name") or "").lower()),
            "quant_algo": q.get("quant_algo")}


def scheme_for(config: dict, directory: Path) -> QuantScheme | None:
    """The checkpoint's quantization convention, or None for a plain (BF16/F16/F32) checkpoint."""
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ConvertError(f"config.json quantization_config is {json.dumps(qc)[:60]}, expected an object")
    qc = dict(qc or {})
    if not qc.get("quant_method"):
        extra = _modelopt_config(directory)
        if extra is not None:
            qc = {**qc, **{k: v for k, v in extra.items() if v is not None}}
    method = qc.get("quant_method")
    if method is None:
        return None
    if not isinstance(method, str):
        raise ConvertError(f"config.json quantization_config.quant_method is {method!r}, expected a string")
    algo = qc.get("quant_algo")
    if method == "fp8":
        block = _positive_ints(qc.get("weight_block_size"), "quantization_config.weight_block_size")
        return QuantScheme("fp8", block, (("_scale_inv", ""), (".qscale_weight", ".weight")),
                           (".activation_scale", "_activation_scale", ".qscale_act"))
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "modelopt":
        if isinstance(algo, str) and "FP4" in algo.upper():
            raise ConvertError(f"quantization {method} {algo}: NVFP4 checkpoints are not supported by gguftool; "
                               f"convert the BF16 or FP8 release of the model instead")
        return QuantScheme("modelopt", None, ((".weight_scale", ".weight"),),
                           (".input_scale", ".k_scale", ".v_scale"), weight_optional=True)
    hint = _UNSUPPORTED.get(method, "gguftool converts fp8, compressed-tensors (float/int-quantized) and "
                                    "modelopt FP8 checkpoints")
    raise ConvertError(f"config.json quantization_config.quant_method {method!r} is not supported: {hint}")


def _compressed_tensors(qc: dict) -> QuantScheme:
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if fmt not in ("float-quantized", "int-quantized", "naive-quantized"):
        raise ConvertError(f"compressed-tensors format {fmt!r} is not supported (gguftool reads float-quantized, "
                           f"int-quantized and naive-quantized weights); convert the BF16 release instead")
    if not isinstance(groups, dict) or len(groups) != 1:
        n = len(groups) if isinstance(groups, dict) else 0
        raise ConvertError(f"compressed-tensors quantization_config.config_groups has {n} groups; gguftool (as "
                           f"llama.cpp's converter) needs exactly one")
    group = next(iter(groups.values()))
    weights = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(weights, dict):
        raise ConvertError("compressed-tensors quantization_config.config_groups: the group has no 'weights' object")
    strategy = weights.get("strategy")
    if strategy not in ("channel", "block", "tensor"):
        raise ConvertError(f"compressed-tensors weight strategy {strategy!r} is not supported (channel, block or "
                           f"tensor)")
    if weights.get("group_size") is not None:
        raise ConvertError(f"compressed-tensors group_size {weights.get('group_size')!r} is not supported")
    block = _positive_ints(weights.get("block_structure"), "compressed-tensors weights.block_structure")
    notes = []
    if strategy == "tensor":
        notes.append("strategy 'tensor' dequantized by broadcasting the scalar scale (llama.cpp's converter "
                     "refuses this strategy)")
    return QuantScheme("compressed-tensors", block, ((".weight_scale", ".weight"),), (".input_scale",),
                       notes=tuple(notes))


# --- one scaled weight


@dataclass(frozen=True)
class ScaledWeight:
    """A stored weight and the scale tensor that multiplies it (dequant_simple of llama.cpp's converter)."""

    weight: SafetensorsTensor
    scale: SafetensorsTensor
    block: tuple[int, ...] | None

    def kind(self) -> str:
        if self.block:
            return "x".join(map(str, self.block)) + " blocks"
        n = self.scale.n_elements
        return "per tensor" if n == 1 else "per row" if n == self.weight.shape[0] else "broadcast"

    def check(self) -> None:
        """The scale's shape against the weight's: the blocks must cover the weight exactly (the last one may be
        partial), a broadcast scale must broadcast to the weight's shape."""
        w, s = self.weight.shape, self.scale.shape
        bad = f"scale {self.scale.name!r} {list(s)} does not fit weight {self.weight.name!r} {list(w)}"
        if self.scale.dtype not in SCALE_DTYPES:
            raise ConvertError(f"scale {self.scale.name!r} has dtype {self.scale.dtype}; gguftool reads "
                               f"{', '.join(SCALE_DTYPES)} scales")
        if self.weight.dtype not in WEIGHT_DTYPES:
            raise ConvertError(f"weight {self.weight.name!r} has dtype {self.weight.dtype}, which gguftool cannot "
                               f"dequantize (scaled weights: {', '.join(WEIGHT_DTYPES)})")
        if self.block:
            nb = len(self.block)
            want = tuple(w[:len(w) - nb]) + tuple(-(-d // b) for d, b in zip(w[len(w) - nb:], self.block))
            if len(w) < nb or tuple(s) != want:
                raise ConvertError(f"{bad}: {'x'.join(map(str, self.block))} blocks need a scale of shape "
                                   f"{list(want)}")
            return
        aligned = tuple(s) + (1,) * max(0, len(w) - len(s))
        try:
            ok = np.broadcast_shapes(tuple(w), aligned) == tuple(w)
        except ValueError:
            ok = False
        if not ok:
            raise ConvertError(f"{bad}: it must broadcast to the weight (one value, one per row or per block)")

    def _scale(self) -> np.ndarray:
        return widen_f32(self.scale.dtype, self.scale.array())

    def full(self) -> np.ndarray:
        """The whole dequantized weight, float32, in its stored shape."""
        if len(self.weight.shape) == 2:
            return self.rows(0, self.weight.shape[0])
        w = widen_f32(self.weight.dtype, self.weight.array())
        s = self._scale()
        if self.block:
            off = s.ndim - len(self.block)
            for i, b in enumerate(self.block):
                s = np.repeat(s, b, axis=off + i)
            s = s[tuple(slice(0, d) for d in w.shape)]
        while s.ndim < w.ndim:
            s = s[..., None]
        w = np.array(w, dtype=np.float32, copy=True)
        w *= s
        return w

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D weight, dequantized: a new float32 array (stop - start, columns)."""
        w = np.array(widen_f32(self.weight.dtype, self.weight.array()[start:stop]), dtype=np.float32, copy=True)
        s = self._scale()
        if self.block:
            b0, b1 = self.block if len(self.block) == 2 else (1, self.block[0])
            cols = w.shape[1]
            for i in range(start // b0, (stop - 1) // b0 + 1 if stop > start else start // b0):
                lo, hi = max(start, i * b0) - start, min(stop, (i + 1) * b0) - start
                w[lo:hi] *= np.repeat(s[i], b1)[:cols]
            return w
        if s.ndim < 2:
            s = s.reshape(s.shape + (1,) * (2 - s.ndim))
        if s.shape[0] != 1:
            s = s[start:stop]
        w *= s
        return w


# --- what a checkpoint holds


@dataclass
class Prequant:
    """The pre-quantized tensors of a checkpoint: which weights are scaled by which scale, what is dropped."""

    scheme: QuantScheme | None = None
    scaled: dict[str, ScaledWeight] = field(default_factory=dict)   # weight name -> weight + scale
    scales: set[str] = field(default_factory=set)                   # scale tensors (not written)
    dropped: set[str] = field(default_factory=set)                  # activation scales etc. (not written)
    widened: dict[str, str] = field(default_factory=dict)           # FP8/I8 tensors without a scale -> dtype

    @property
    def active(self) -> bool:
        return bool(self.scaled or self.widened)

    def skipped(self, name: str) -> bool:
        """True for a tensor the converter does not write (a scale, an activation scale)."""
        return name in self.scales or name in self.dropped

    def summary(self) -> list[str]:
        """Lines for --dry-run: the convention, then per dtype and scale kind how many weights."""
        if not self.active and self.scheme is None:
            return []
        lines = [f"pre-quantized: {self.scheme.describe()}" if self.scheme else "pre-quantized: no "
                 "quantization_config"]
        groups: dict[tuple, int] = {}
        for sw in self.scaled.values():
            key = (sw.weight.dtype, sw.scale.name.rsplit(".", 1)[-1], sw.scale.dtype, sw.kind())
            groups[key] = groups.get(key, 0) + 1
        for (wd, sname, sd, kind), n in sorted(groups.items()):
            lines.append(f"  {n} {wd} weight(s) x {sname} ({sd}, {kind}) -> dequantized to float32")
        if not self.active:
            lines.append("  no quantized weight found: the tensors are read as they are")
        if self.widened:
            lines.append(f"  {len(self.widened)} {'/'.join(sorted(set(self.widened.values())))} "
                         f"tensor(s) without a scale -> widened to float32")
        if self.dropped:
            ct = self.scheme is not None and self.scheme.method == "compressed-tensors"
            lines.append(f"  {len(self.dropped)} activation scale tensor(s) dropped "
                         f"({', '.join(sorted({_suffix(n, self.scheme) for n in self.dropped}))})"
                         + ("; llama.cpp's converter stops at these" if ct else ""))
        for note in self.scheme.notes if self.scheme else ():
            lines.append(f"  note: {note}")
        return lines


def _suffix(name: str, scheme: QuantScheme | None) -> str:
    return next((s for s in scheme.dropped if name.endswith(s)), name) if scheme else name


def find_prequantized(ck: Checkpoint) -> Prequant:
    """Pair every scale tensor of the checkpoint with its weight (headers only) and check their shapes."""
    scheme = scheme_for(ck.config, ck.directory)
    pq = Prequant(scheme)
    names = ck.tensors
    if scheme is None:
        for name, st in names.items():
            if name.endswith(_SCALE_SUFFIXES) and st.dtype in SCALE_DTYPES and (
                    name.rsplit("_scale", 1)[0] in names or name.replace("qscale_weight", "weight") in names):
                raise ConvertError(f"tensor {name!r} is the scale of a pre-quantized weight, but config.json has no "
                                   f"quantization_config saying how to apply it (quant_method fp8 with "
                                   f"weight_block_size, compressed-tensors or modelopt)")
    else:
        for name in names:
            if name.endswith(scheme.dropped):
                pq.dropped.add(name)
                continue
            rule = next(((s, r) for s, r in scheme.rules if name.endswith(s)), None)
            if rule is None:
                continue
            weight = name[: len(name) - len(rule[0])] + rule[1]
            if weight not in names:
                if scheme.weight_optional:
                    pq.dropped.add(name)
                    continue
                raise ConvertError(f"scale tensor {name!r} has no weight {weight!r} in the checkpoint")
            sw = ScaledWeight(names[weight], names[name], scheme.block)
            sw.check()
            pq.scaled[weight] = sw
            pq.scales.add(name)
    for name, st in names.items():
        if st.dtype in FP8_DTYPES + ("I8",) and name not in pq.scaled and not pq.skipped(name):
            pq.widened[name] = st.dtype
    return pq


def dequantized_bytes(pq: Prequant) -> int:
    """How many float32 bytes the scaled weights make (for the summary)."""
    return sum(4 * math.prod(sw.weight.shape) for sw in pq.scaled.values())

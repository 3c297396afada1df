"""gpt-oss (GptOssForCausalLM) expert tensors as llama.cpp's converter writes them (``conversion/gpt_oss.py``).

The released checkpoints store the experts of layer N as fused tensors ``model.layers.N.mlp.experts.*``:

- MXFP4 (``quantization_config.quant_method == "mxfp4"``): ``{gate_up_proj,down_proj}_{blocks,scales}``. The
  converter does not dequantize them: ``generate_extra_tensors`` repacks each blocks/scales pair into ggml MXFP4
  (see mxfp4_repack.py) before any other tensor is written, so these tensors come first in the file, in
  checkpoint order (per layer down, then gate, then up). ``gate_up_proj`` interleaves its rows: even rows are
  the gate projection, odd rows the up projection (``[:, ::2]`` / ``[:, 1::2]``).
- BF16 re-uploads: ``gate_up_proj`` [n_expert, hidden, 2*ffn] and ``down_proj`` [n_expert, ffn, hidden], stored
  input-major: transposed, then split as above, written at their place in the checkpoint order in the output type.
- ``gate_up_proj_bias`` [n_expert, 2*ffn] (split the same way, gate then up) and ``down_proj_bias``: F32.

:class:`GptOssExperts` takes the checkpoint's tensors one at a time (``source._index``) and returns the GGUF
tensors each one produces; :meth:`GptOssExperts.finish` gives the MXFP4 ones that go first.
"""
from __future__ import annotations

import re

import numpy as np

from ..errors import ConvertError
from ..gguf.constants import GGMLType
from ..pipeline.source import SourceTensor
from .checkpoint import SUPPORTED_DTYPES, SafetensorsTensor, bf16_to_f32
from .mxfp4_repack import QK, repack

_EXPERT = re.compile(r"model\.layers\.(?P<bid>\d+)\.mlp\.experts\.(?P<proj>gate_up_proj|down_proj)"
                     r"(?P<kind>_blocks|_scales|_bias|)")
MXFP4_FTYPE = "MXFP4_MOE"   # general.file_type of a converted MXFP4 checkpoint (the converter's ftype switch)


def is_mxfp4(config: dict) -> bool:
    q = config.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


def _u8(st: SafetensorsTensor) -> np.ndarray:
    buf = st.file.buffer()
    if st.offset + st.nbytes > len(buf):
        raise ConvertError(f"{st.file.path}: the file is too short for tensor {st.name!r} (truncated?)")
    return np.frombuffer(buf, np.uint8, count=st.nbytes, offset=st.offset).reshape(st.shape)


class MXFP4ExpertsTensor(SourceTensor):
    """One expert projection repacked from the checkpoint's MXFP4 blocks/scales (rows ``start::step`` of them)."""

    type = GGMLType.MXFP4

    def __init__(self, name: str, blocks: SafetensorsTensor, scales: SafetensorsTensor, start: int, step: int):
        self.name = name
        self.blocks, self.scales, self.start, self.step = blocks, scales, start, step
        n_expert, rows, n_block, _ = blocks.shape
        self.shape = (n_block * QK, len(range(start, rows, step)), n_expert)

    def read_raw(self) -> np.ndarray:
        b = _u8(self.blocks)[:, self.start::self.step]
        s = _u8(self.scales)[:, self.start::self.step]
        return repack(b, s).reshape(-1)

    def read_f32(self) -> np.ndarray:
        from ..quants import dequantize
        return dequantize(self.read_raw(), GGMLType.MXFP4, self.shape[0])


class SlicedTensor(SourceTensor):
    """A float checkpoint tensor transposed (last two axes) and/or cut to rows ``start::step`` of its
    second-to-last axis (the last axis for a 2-D bias), as the converter splits gate_up_proj."""

    def __init__(self, name: str, st: SafetensorsTensor, out_type: GGMLType, transpose: bool, start: int, step: int):
        self.name, self.st, self.type = name, st, out_type
        self.transpose, self.start, self.step = transpose, start, step
        shape = list(st.shape)
        if transpose:
            shape[-1], shape[-2] = shape[-2], shape[-1]
        axis = -1 if len(shape) == 2 else -2
        shape[axis] = len(range(start, shape[axis], step))
        self.hf_shape = tuple(shape)
        self.shape = tuple(reversed(shape))

    def _cut(self, a: np.ndarray) -> np.ndarray:
        if self.transpose:
            a = a.swapaxes(-1, -2)
        return a[..., self.start::self.step] if a.ndim == 2 else a[..., self.start::self.step, :]

    def read_f32(self) -> np.ndarray:
        a = self.st.array()
        a = bf16_to_f32(a) if self.st.dtype == "BF16" else a
        return np.ascontiguousarray(self._cut(a), dtype=np.float32).reshape(-1, self.shape[0])

    def read_raw(self) -> np.ndarray:
        if self.type == GGMLType.F32:
            return self.read_f32().reshape(-1).view(np.uint8)
        if self.type == GGMLType.BF16:
            if self.st.dtype != "BF16":
                raise ConvertError(f"{self.name}: BF16 output needs a BF16 checkpoint tensor")
            return np.ascontiguousarray(self._cut(self.st.array())).reshape(-1).view(np.uint8)
        if self.type == GGMLType.F16:
            return self.read_f32().astype(np.float16).reshape(-1).view(np.uint8)
        raise ConvertError(f"{self.name}: no raw form for {self.type.name}")  # pragma: no cover


class GptOssExperts:
    """Collects a gpt-oss checkpoint's fused expert tensors (see the module docstring)."""

    def __init__(self, hp: dict, out_type: GGMLType):
        self.hp, self.out_type = hp, out_type
        self.n_expert = hp.get("num_local_experts")
        self.pending: dict[tuple[int, str], dict[str, SafetensorsTensor]] = {}
        self.front: list[tuple[str, SourceTensor]] = []

    @staticmethod
    def rename(hf_name: str) -> str:
        """GptOssModel.filter_tensors: the attention sinks get a ".weight" suffix (then map to attn_sinks)."""
        return hf_name + ".weight" if "sinks" in hf_name else hf_name

    def _dims(self, proj: str) -> tuple[int, int]:
        """(rows, columns) of the projection as the GGUF stores it per expert."""
        h, ff = self.hp["hidden_size"], self.hp["intermediate_size"]
        return (2 * ff, h) if proj == "gate_up_proj" else (h, ff)

    def _check(self, hf_name: str, st: SafetensorsTensor, want: tuple[int, ...], dtypes) -> None:
        if st.dtype not in dtypes:
            raise ConvertError(f"tensor {hf_name!r} has dtype {st.dtype}, expected {' or '.join(sorted(dtypes))}")
        if tuple(st.shape) != want:
            raise ConvertError(f"tensor {hf_name!r} has shape {list(st.shape)} but config.json implies {list(want)}")

    def take(self, hf_name: str, st: SafetensorsTensor) -> list[tuple[str, SourceTensor]] | None:
        """The GGUF tensors ``hf_name`` yields at its place in the file; None if it is not an expert tensor."""
        m = _EXPERT.fullmatch(hf_name)
        if m is None:
            return None
        bid, proj, kind = int(m["bid"]), m["proj"], m["kind"]
        if not isinstance(self.n_expert, int):
            raise ConvertError(f"tensor {hf_name!r} is an expert, but config.json gives no num_local_experts")
        rows, cols = self._dims(proj)
        e = self.n_expert
        fl = set(SUPPORTED_DTYPES)
        names = ([f"blk.{bid}.ffn_down_exps"] if proj == "down_proj"
                 else [f"blk.{bid}.ffn_gate_exps", f"blk.{bid}.ffn_up_exps"])
        splits = [(0, 1)] if proj == "down_proj" else [(0, 2), (1, 2)]
        if kind == "_bias":
            self._check(hf_name, st, (e, rows), fl)
            return [(n + ".bias", SlicedTensor(n + ".bias", st, GGMLType.F32, False, a, b))
                    for n, (a, b) in zip(names, splits)]
        if kind == "":
            self._check(hf_name, st, (e, cols, rows), fl)
            if self.out_type == GGMLType.BF16 and st.dtype != "BF16":
                raise ConvertError(f"outtype bf16 needs a BF16 checkpoint; tensor {hf_name!r} is {st.dtype}")
            return [(n + ".weight", SlicedTensor(n + ".weight", st, self.out_type, True, a, b))
                    for n, (a, b) in zip(names, splits)]
        if cols % QK:
            raise ConvertError(f"tensor {hf_name!r}: MXFP4 rows of {cols} values are not whole blocks of {QK}")
        want = (e, rows, cols // QK, 16) if kind == "_blocks" else (e, rows, cols // QK)
        self._check(hf_name, st, want, {"U8"})
        group = self.pending.setdefault((bid, proj), {})
        group[kind] = st
        if len(group) == 2:   # the pair is repacked when its second half is read (the converter: at the scales)
            del self.pending[(bid, proj)]
            for n, (a, b) in zip(names, splits):
                self.front.append((n + ".weight", MXFP4ExpertsTensor(n + ".weight", group["_blocks"],
                                                                     group["_scales"], a, b)))
        return []

    def finish(self) -> list[tuple[str, SourceTensor]]:
        """The repacked MXFP4 tensors, which the converter writes before all others."""
        for (bid, proj), group in sorted(self.pending.items()):
            have = next(iter(group))
            missing = "_scales" if have == "_blocks" else "_blocks"
            raise ConvertError(f"tensor 'model.layers.{bid}.mlp.experts.{proj}{have}' has no matching "
                               f"'{proj}{missing}' in the checkpoint")
        return self.front

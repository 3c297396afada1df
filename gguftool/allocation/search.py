"""The target-size job: stock mixes sized, sensitivities measured (or read from the cache file), the mix solved,
checked against the stock mix on the whole model, and turned into per-tensor overrides for the pipeline.

:func:`allocate` returns an :class:`Allocation`: the type of every quantizable tensor (as ``--tensor-type`` entries
the policy applies), the metadata keys that record the target and the method, and the figures ``--dry-run``
prints (per tensor: type, bytes, predicted KLD contribution; the stock mix's beside them).

The method's own measure decides between the solved mix and the stock mix of the nearest size (the largest stock
mix that fits the target): with calibration text, the mean KL-divergence of the whole model with every tensor
quantized (both mixes measured on the same chunks); without, the predicted sum. The stock mix wins ties.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..gguf.constants import GGMLType
from ..gguf.reader import TensorInfo
from ..gguf.values import KV, kv_f32, kv_str
from ..gguf.writer import build_header
from ..pipeline import policy as P
from ..pipeline.plan import Plan
from .candidates import TensorSlot, bpw, candidate_types
from .measure import (AllocationError, KLDProbe, Sensitivities, fingerprint_imatrix, fingerprint_tensors, measure,
                      quantized_makers)
from .solve import fit, padded, solve

__all__ = ["Target", "Allocation", "allocate", "parse_size", "STOCK_FTYPES", "AllocationError",
           "KEY_TARGET_SIZE", "KEY_TARGET_BPW", "KEY_TARGET_METHOD", "KEY_TARGET_REFERENCE"]

KEY_TARGET_SIZE = "quantize.target.size"          # the requested file size in bytes (string: may exceed u32)
KEY_TARGET_BPW = "quantize.target.bpw"
KEY_TARGET_METHOD = "quantize.target.method"
KEY_TARGET_REFERENCE = "quantize.target.reference"  # the stock mix compared with (and its measured KLD)

METHOD_MEASURED = ("gguftool per-tensor allocation: KLD of the model with one {probe} quantized (calibration "
                   "text) x imatrix-weighted weight error per type, knapsack within the target, checked on the "
                   "whole model against the stock mix")
METHOD_WEIGHTS = ("gguftool per-tensor allocation: imatrix-weighted weight error per type (no calibration text), "
                  "knapsack within the target, compared with the stock mix")

# the stock mixes the target is compared with (quantized ones; Q2_K_S needs an imatrix, which the target requires)
STOCK_FTYPES = ("Q2_K_S", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0",
                "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")

Progress = Callable[[str, int, int], None]

MIN_BPW_FRACTION = 0.6   # candidates below this fraction of the budget's mean bits per weight are left out


def parse_size(text: str | int) -> int:
    """A file size: bytes, or a number with K, M, G or T (decimal units, as --split-max-size), e.g. 1.2G."""
    if isinstance(text, int):
        if text <= 0:
            raise AllocationError(f"--target-size {text}: expected a positive size")
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)B?\s*", str(text).upper())
    if m is None:
        raise AllocationError(f"--target-size {text!r}: expected a size such as 1.2G, 500M or 123456789")
    v = float(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)]
    if v < 1:
        raise AllocationError(f"--target-size {text!r}: expected a positive size")
    return int(v)


@dataclass(frozen=True)
class Target:
    """What ``--target-size`` / ``--target-bpw`` ask for, and how to measure."""
    size: int | None = None               # file bytes (header + padded tensor data)
    bpw: float | None = None              # tensor data bits per weight (all tensors, as the plan's bpw)
    calib: str | None = None              # calibration text for measured sensitivities
    sensitivities: str | None = None      # cache file: read when it fits, written otherwise
    calib_ctx: int = 128
    calib_chunks: int = 2
    reference: str | None = None          # the stock mix to compare with (None: the nearest size)
    probe: str = "layer"                  # "tensor": one forward pass per tensor; "layer": per layer (cheaper)

    def __post_init__(self):
        if (self.size is None) == (self.bpw is None):
            raise AllocationError("give exactly one of --target-size and --target-bpw")
        if self.bpw is not None and not (0 < self.bpw <= 32 and math.isfinite(self.bpw)):
            raise AllocationError(f"--target-bpw {self.bpw}: expected bits per weight in (0, 32]")
        if self.calib_ctx < 8:
            raise AllocationError(f"--calib-ctx {self.calib_ctx}: must be at least 8")
        if self.calib_chunks < 1:
            raise AllocationError(f"--calib-chunks {self.calib_chunks}: must be at least 1")
        if self.probe not in ("tensor", "layer"):
            raise AllocationError(f"--probe {self.probe!r}: expected tensor or layer")


@dataclass
class TensorRow:
    name: str
    shape: tuple[int, ...]
    type: GGMLType
    nbytes: int
    predicted: float
    stock_type: GGMLType
    stock_nbytes: int
    stock_predicted: float


@dataclass
class Allocation:
    ftype: P.FileType                       # the stock mix the file is based on (general.file_type)
    types: dict[str, GGMLType]              # quantizable tensor -> type
    rows: list[TensorRow]
    kvs: list[KV]                           # metadata recording the target and the method
    target_bytes: int | None
    target_bpw: float | None
    file_bytes: int                         # predicted size of the written file
    data_bytes: int                         # tensor data (unpadded), as plan.out_bytes
    n_elements: int
    stock_file_bytes: int                   # the stock mix's file (without the target keys)
    predicted: float
    stock_predicted: float
    measured: float | None = None           # full-mix KLD on the calibration chunks
    stock_measured: float | None = None
    chose_stock: bool = False
    sensitivities: Sensitivities | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def bpw(self) -> float:
        return self.data_bytes * 8.0 / self.n_elements if self.n_elements else 0.0

    def tensor_types(self) -> list[tuple[str, GGMLType]]:
        """The allocation as --tensor-type entries (exact names)."""
        return [(f"^{re.escape(n)}$", t) for n, t in self.types.items()]


# --- sizes


def file_size(plan: Plan, alignment: int = 32) -> int:
    """Bytes of the file a (single-file) plan writes: header with its metadata and tensor infos, then every
    tensor's data padded to the alignment."""
    infos = [TensorInfo(t.name, t.shape[:P.n_dims(t.shape)], t.new_type, 0, t.new_nbytes, t.n_elements)
             for t in plan.tensors]
    header, _ = build_header(plan.kvs, infos, alignment=alignment)
    return len(header) + sum(padded(t.new_nbytes, alignment) for t in plan.tensors)


def _alignment(plan: Plan) -> int:
    for kv in plan.kvs:
        if kv.key == "general.alignment":
            return int(kv.value)
    return 32


# --- the job


def allocate(source, make_plan: Callable[[P.FileType, list[KV], list[tuple[str, GGMLType]]], Plan],
             target: Target, imatrix: dict[str, np.ndarray] | None, *, threads: int | None = None,
             progress: Progress | None = None) -> Allocation:
    """Solve the allocation for ``target``. ``make_plan(ftype, extra_kvs, tensor_types)`` plans the source with a
    stock mix (and overrides): the same planning the written file goes through."""
    t0 = time.time()
    if imatrix is None:
        raise AllocationError("--target-size / --target-bpw need an importance matrix (--imatrix)")
    # 1. the stock mixes and their sizes
    stock_plans = {}
    for name in STOCK_FTYPES:
        ft = P.FTYPES[name]
        try:
            plan = make_plan(ft, [], [])
        except Exception:    # a mix this model cannot take (e.g. a required imatrix entry missing)
            continue
        stock_plans[name] = plan
    if not stock_plans:
        raise AllocationError("no stock mix can be planned for this model")

    def stock_measure(plan: Plan) -> float:
        return file_size(plan) if target.size is not None else plan.out_bpw

    goal = float(target.size) if target.size is not None else float(target.bpw)  # type: ignore[arg-type]
    if target.reference is not None:
        ref = P.parse_ftype(target.reference).name
        if ref not in stock_plans:
            raise AllocationError(f"the reference mix {ref} cannot be planned for this model")
        if stock_measure(stock_plans[ref]) > goal:
            raise AllocationError(f"the reference mix {ref} ({_fmt_goal(target, stock_measure(stock_plans[ref]))}) is "
                                  f"larger than the target ({_fmt_goal(target, goal)})")
    else:
        fitting = [n for n, p in stock_plans.items() if stock_measure(p) <= goal]
        ref = (max(fitting, key=lambda n: (stock_measure(stock_plans[n]), -STOCK_FTYPES.index(n))) if fitting
               else min(stock_plans, key=lambda n: stock_measure(stock_plans[n])))
    have_stock = stock_measure(stock_plans[ref]) <= goal
    ftype = P.FTYPES[ref]
    stock = stock_plans[ref]

    # 2. the tensors to decide
    slots: list[TensorSlot] = []
    for tp in stock.tensors:
        if tp.allows_quantization and P.is_quantized(tp.new_type):
            has_w = tp.name in imatrix
            slots.append(TensorSlot(tp.name, tp.shape, tp.new_type,
                                    candidate_types(tp.name, tp.shape, tp.new_type, ftype, has_w)))
    if not slots:
        raise AllocationError("the model has no tensor to quantize")
    stock_types = {s.name: s.stock for s in slots}

    # 3. the metadata recorded in the file (its size enters the budget)
    kvs = [kv_str(KEY_TARGET_METHOD, METHOD_MEASURED.format(probe=target.probe) if target.calib else METHOD_WEIGHTS),
           kv_str(KEY_TARGET_REFERENCE, ref)]
    if target.size is not None:
        kvs.insert(0, kv_str(KEY_TARGET_SIZE, str(target.size)))
    else:
        kvs.insert(0, kv_f32(KEY_TARGET_BPW, float(target.bpw)))   # type: ignore[arg-type]
    sized = make_plan(ftype, kvs, [])
    align = _alignment(sized)
    slot_names = {s.name for s in slots}
    fixed = [t for t in sized.tensors if t.name not in slot_names]
    if target.size is not None:
        header = file_size(sized) - sum(padded(t.new_nbytes, align) for t in sized.tensors)
        budget = target.size - header - sum(padded(t.new_nbytes, align) for t in fixed)
        solve_align = align
    else:
        assert target.bpw is not None
        budget = int(math.floor(target.bpw * sized.n_elements / 8.0)) - sum(t.new_nbytes for t in fixed)
        solve_align = 1
    # types far below the budget's mean bits per weight are never chosen at it: not measured (the IQ1/IQ2 kernels
    # are the slowest to run, and irrelevant at a Q4_K_M-sized target)
    n_slot = sum(s.n_elements for s in slots)
    floor = MIN_BPW_FRACTION * max(budget, 0) * 8.0 / n_slot if n_slot else 0.0
    pruned = [TensorSlot(s.name, s.shape, s.stock, tuple(t for t in s.candidates if bpw(t) >= floor or t == s.stock))
              for s in slots]
    if sum(padded(min(s.nbytes(t) for t in s.candidates), solve_align) for s in pruned) <= budget:
        slots = pruned

    # 4. sensitivities
    sources = {t.name: t for t in source.tensors}

    def read(name: str) -> np.ndarray:
        return np.ascontiguousarray(sources[name].read_f32(), dtype=np.float32)

    def first_row(name: str) -> np.ndarray:
        return sources[name].read_rows(0, 1)

    model_fp = fingerprint_tensors(slots, first_row)
    imatrix_fp = fingerprint_imatrix({s.name: imatrix[s.name] for s in slots if s.name in imatrix})
    probe = None
    calib_fp = None
    if target.calib is not None:
        tokens, first, calib_fp = _calib_tokens(source, target)
        if progress:
            progress("base logits", 0, 1)
        probe = KLDProbe(source, tokens, first, threads or os.cpu_count() or 1, calib_fp)
        if progress:
            progress("base logits", 1, 1)
    known = None
    notes = []
    if target.sensitivities is not None and os.path.exists(target.sensitivities):
        known = Sensitivities.load(target.sensitivities)
        if not (known.model == model_fp and known.imatrix == imatrix_fp):
            notes.append(f"{target.sensitivities} was measured for another model or imatrix: measuring again")
            known = None
        elif known.calib != calib_fp:   # the weight errors stand; the probes are measured again
            notes.append(f"{target.sensitivities} was measured with other calibration: probing again")
    sens = measure(slots, read, imatrix, probe, model_fp=model_fp, imatrix_fp=imatrix_fp, threads=threads,
                   progress=progress, known=known, mode=target.probe)
    if target.sensitivities is not None:
        sens.save(target.sensitivities)

    def cost(name: str, t: GGMLType) -> float:
        return sens.predicted(name, t)

    # 5. solve, with the stock mix as a candidate solution
    choice = solve(slots, cost, budget, [stock_types] if have_stock else [], solve_align)
    if choice is None:
        smallest = sum(padded(s.nbytes(s.candidates[0]), solve_align) for s in slots)
        raise AllocationError(f"the target {_fmt_goal(target, goal)} is too small: the smallest candidates alone "
                              f"need {smallest - budget:,} more bytes")
    stock_fit = fit(slots, stock_types, cost, budget, solve_align) if have_stock else None
    types = choice.types
    measured = stock_measured = None
    chose_stock = stock_fit is not None and types == stock_fit
    if probe is not None and stock_fit is not None and not chose_stock:
        # 6. the method's own measure: both mixes, every tensor quantized, on the calibration chunks
        mixes = [types, stock_fit]
        results = []
        for i, mix in enumerate(mixes):
            results.append(probe.kld_lazy(quantized_makers(slots, mix, read, probe, imatrix, threads)))
            if progress:
                progress("full-mix check", i + 1, len(mixes))
        measured, stock_measured = results
        if stock_measured <= measured:
            types, chose_stock = stock_fit, True
            notes.append(f"the stock mix {ref} measured better on the whole model ({stock_measured:.5g} vs "
                         f"{measured:.5g}): it is kept")
    elif probe is not None and stock_fit is not None:
        measured = stock_measured = probe.kld_lazy(quantized_makers(slots, types, read, probe, imatrix, threads))

    rows = []
    for s in slots:
        t, st = types[s.name], s.stock
        rows.append(TensorRow(s.name, s.shape, t, s.nbytes(t), cost(s.name, t), st, s.nbytes(st), cost(s.name, st)))
    final = make_plan(ftype, kvs, [(f"^{re.escape(n)}$", t) for n, t in types.items()])
    return Allocation(ftype, types, rows, kvs, target.size, target.bpw, file_size(final), final.out_bytes,
                      final.n_elements, file_size(stock), sum(r.predicted for r in rows),
                      sum(r.stock_predicted for r in rows), measured, stock_measured, chose_stock, sens,
                      time.time() - t0, notes)


def _fmt_goal(target: Target, v: float) -> str:
    return f"{int(v):,} bytes" if target.size is not None else f"{v:.4f} bpw"


def _calib_tokens(source, target: Target) -> tuple[np.ndarray, int, str]:
    """The calibration chunks: ``calib_chunks`` chunks of ``calib_ctx`` tokens spread over the text (BOS first
    where the model adds one), the first scored position, and the calibration fingerprint."""
    from ..model.chunks import read_text
    from ..model.tokenizer import Tokenizer

    assert target.calib is not None
    text = read_text(target.calib, AllocationError, "calibration")
    tok = Tokenizer.from_metadata(source)
    ids = np.asarray(tok.tokenize(text, add_special=True, parse_special=False), dtype=np.int64)
    n_ctx, n = target.calib_ctx, target.calib_chunks
    avail = len(ids) // n_ctx
    if avail < n:
        raise AllocationError(f"{target.calib}: the calibration text tokenizes to {len(ids)} tokens; "
                              f"{n} chunks of {n_ctx} need {n * n_ctx}")
    starts = np.linspace(0, avail - 1, n).round().astype(np.int64) * n_ctx
    chunks = np.stack([ids[s:s + n_ctx] for s in starts]).copy()
    if tok.add_bos:
        chunks[:, 0] = tok.bos_id
    h = hashlib.sha256(chunks.tobytes())
    h.update(f"{n_ctx}:{n}:{target.probe}".encode())
    return chunks, n_ctx // 4, h.hexdigest()[:32]

"""What each type costs each tensor, measured.

Two measurements, combined into a predicted KL-divergence ``D[t, q] = s_t * E[t, q]`` per tensor t and type q:

- ``E[t, q]``, the weight error: the tensor (a sample of its rows) quantized to q with its imatrix weights by
  gguftool's own kernels (the bytes llama.cpp would write), then ``sum_j w_j (x_ij - x^_ij)^2 / sum_j w_j x_ij^2``
  over the sampled rows i and columns j (w: the imatrix weights; 1 where the tensor has none). For a linear layer
  this is the expected relative error of its output, ``E|dW x|^2 / E|W x|^2``, under a diagonal imatrix.
- ``s_t``, the sensitivity: with calibration text, the model's KL-divergence from the unquantized model when only
  tensor t is quantized (to a probe type, all rows), divided by that tensor's E at the probe type. A small
  perturbation changes the KL-divergence in proportion to its squared size, so ``s_t * E[t, q]`` predicts every
  other type's effect from one forward pass per tensor. Without calibration text s_t = 1 (every tensor's relative
  output error weighs the same).

:class:`Sensitivities` holds both and is saved as JSON (``--sensitivities FILE``) to be reused for other targets;
it records fingerprints of the model's tensors, the imatrix and the calibration so that a stale file is not used.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import GGUFError
from ..gguf.constants import GGMLType
from .candidates import TensorSlot, bpw

__all__ = ["Sensitivities", "weight_error", "sample_rows", "CalibSet", "KLDProbe", "fingerprint_tensors",
           "fingerprint_imatrix", "FORMAT", "quantized_makers"]

FORMAT = "gguftool-sensitivities/1"
MAX_SAMPLE_ROWS = 512          # rows of a tensor the weight-error table quantizes
PROBE_BPW = 4.5                # the probe type is the candidate closest to this many bits per weight

ProgressFn = Callable[[str, int, int], None]   # (phase, done, total)


class AllocationError(GGUFError):
    """A target-size request that cannot be met or a sensitivities file that does not fit."""


# --- weight error


def sample_rows(n_rows: int, limit: int = MAX_SAMPLE_ROWS) -> np.ndarray:
    """Evenly spaced row indices (all rows when there are at most ``limit``)."""
    if n_rows <= limit:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, limit).round().astype(np.int64))


def weight_error(x: np.ndarray, t: GGMLType, w: np.ndarray | None, threads: int | None = None,
                 return_dequantized: bool = False):
    """Relative imatrix-weighted squared error of rows x (rows, ne0) quantized to t (see the module docstring);
    with ``return_dequantized`` also the dequantized rows and the raw bytes."""
    from ..quants import dequantize, quantize

    q = quantize(x, t, imatrix=w, threads=threads)
    y = dequantize(q, t, x.shape[1], threads=threads)
    d = (y.astype(np.float64) - x) ** 2
    x2 = x.astype(np.float64) ** 2
    if w is not None:
        w64 = w.astype(np.float64)
        num, den = float(d.sum(axis=0) @ w64), float(x2.sum(axis=0) @ w64)
    else:
        num, den = float(d.sum()), float(x2.sum())
    e = num / den if den > 0 else 0.0
    if return_dequantized:
        return e, y, q
    return e


def tensor_weights(imatrix: Mapping[str, np.ndarray] | None, name: str, shape: tuple[int, ...],
                   expert: int = 0) -> np.ndarray | None:
    """The imatrix weights of one expert's (or a 2-D tensor's) columns, None when there are none."""
    w = imatrix.get(name) if imatrix is not None else None
    if w is None:
        return None
    ne0 = shape[0]
    ne2 = shape[2] if len(shape) > 2 else 1
    if w.size != ne0 * ne2:
        return None
    return np.ascontiguousarray(w[expert * ne0:(expert + 1) * ne0], dtype=np.float32)


# --- fingerprints (a sensitivities file is reused only for the same model, imatrix and calibration)


def fingerprint_tensors(slots: Sequence[TensorSlot], read_sample: Callable[[str], np.ndarray]) -> str:
    h = hashlib.sha256()
    for s in slots:
        h.update(f"{s.name}:{s.shape}\n".encode())
        h.update(np.ascontiguousarray(read_sample(s.name), dtype=np.float32).tobytes())
    return h.hexdigest()[:32]


def fingerprint_imatrix(imatrix: Mapping[str, np.ndarray] | None) -> str:
    h = hashlib.sha256()
    table = imatrix or {}
    for name in sorted(table):
        h.update(name.encode())
        h.update(np.ascontiguousarray(table[name], dtype=np.float32).tobytes())
    return h.hexdigest()[:32]


# --- calibration: the base model's output on a few chunks of text


@dataclass
class CalibSet:
    """Token chunks (B, n_ctx), the scored positions and the unquantized model's probabilities there."""
    tokens: np.ndarray          # (B, n_ctx) int64, BOS first where the model adds one
    first: int                  # first scored position
    log_p: np.ndarray           # (B * n_scored, n_vocab) float32 base log-probabilities
    p: np.ndarray               # the same as probabilities
    fingerprint: str

    @property
    def n_scored(self) -> int:
        return self.log_p.shape[0]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.reshape(-1, logits.shape[-1]).astype(np.float32)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)


def mean_kld(calib: CalibSet, logits: np.ndarray) -> float:
    """Mean over the scored tokens of KL(base || model), in nats."""
    lq = _log_softmax(logits)
    kl = (calib.p * (calib.log_p - lq)).sum(axis=1, dtype=np.float64)
    return float(np.maximum(kl, 0.0).mean())


class KLDProbe:
    """The model's forward pass with some weights replaced by quantized ones, scored against the base output.

    One Model over an overlay of the source's weights: ``kld(overrides)`` swaps in dequantized tensors (numpy
    order), runs the calibration chunks and returns the mean KL-divergence from the base; ``kld_lazy(makers)``
    does the same with tensors made on demand (one layer's at a time: a whole-model mix never holds a second copy
    of the model). The base pass records the residual stream at every layer's input, so a pass whose changed
    weights all lie in layers >= L starts at layer L (the earlier layers would compute the same as the base)."""

    def __init__(self, source, tokens: np.ndarray, first: int, threads: int, fingerprint: str):
        from ..model.forward import Model
        from ..model.weights import WeightStore

        self._base = Model.from_source(source, n_threads=threads, as_stored=False)
        self._store: WeightStore = self._base.w     # type: ignore[assignment]
        self.overlay = _Overlay(self._store)
        self.model = Model(self._base.cfg, self.overlay, n_threads=threads)
        self.tokens = tokens
        self.first = first
        self.passes = 0
        self.layers_run = 0                  # layers evaluated by the probes (the cost measure)
        self._residuals: list[np.ndarray] = []
        logits = self.model.forward(self.tokens, logits_from=self.first, logits_to=self.tokens.shape[1],
                                    record=self._residuals)
        log_p = _log_softmax(logits)
        self.calib = CalibSet(tokens, first, log_p, np.exp(log_p), fingerprint)

    @property
    def n_layer(self) -> int:
        return int(self._base.cfg.n_layer)

    def _forward(self, names) -> np.ndarray:
        layers = [_layer(n) for n in names]
        start = 0 if not layers or min(layers) < 0 else min(layers)
        resume = None if start == 0 else (start, self._residuals[start])
        self.layers_run += self.n_layer - start
        return self.model.forward(self.tokens, logits_from=self.first, logits_to=self.tokens.shape[1],
                                  resume=resume)

    def weight_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._store.shape(name))

    def kld(self, overrides: Mapping[str, np.ndarray]) -> float:
        self.passes += 1
        self.overlay.overrides = dict(overrides)
        try:
            return mean_kld(self.calib, self._forward(list(overrides)))
        finally:
            self.overlay.overrides = {}

    def kld_lazy(self, makers: Mapping[str, Callable[[], np.ndarray]]) -> float:
        """As kld, each replaced tensor made by its maker when the pass first reads it and kept only while the pass
        is in its layer (tensors outside the layers, such as token_embd, for the whole pass)."""
        self.passes += 1
        self.overlay.makers = dict(makers)
        try:
            return mean_kld(self.calib, self._forward(list(makers)))
        finally:
            self.overlay.makers = {}
            self.overlay.clear()


class _Overlay(Mapping):
    """name -> array: the override where there is one (given, or made on demand by a maker), else the base
    store's (what the forward pass reads)."""

    def __init__(self, base: Mapping[str, np.ndarray]):
        self.base = base
        self.overrides: dict[str, np.ndarray] = {}
        self.makers: dict[str, Callable[[], np.ndarray]] = {}
        self._made: dict[str, np.ndarray] = {}
        self._made_layer = -2
        self._lock = threading.Lock()

    def clear(self) -> None:
        self._made = {}
        self._made_layer = -2

    def _make(self, name: str) -> np.ndarray:
        with self._lock:          # the forward pass reads weights from its worker threads
            a = self._made.get(name)
            if a is None:
                il = _layer(name)
                if il >= 0 and il != self._made_layer:   # a new layer: drop the previous layer's tensors
                    self._made = {k: v for k, v in self._made.items() if _layer(k) < 0}
                    self._made_layer = il
                a = self._made[name] = self.makers[name]()
            return a

    def __getitem__(self, name: str) -> np.ndarray:
        a = self.overrides.get(name)
        if a is not None:
            return a
        if name in self.makers:
            return self._make(name)
        return self.base[name]

    def __contains__(self, name) -> bool:
        return name in self.base

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


# --- the table


@dataclass
class TensorSensitivity:
    errors: dict[str, float]                 # type name -> E on the sampled rows
    probe: str | None = None                 # the type the probe quantized the whole tensor to
    probe_error: float | None = None         # E of the whole tensor at the probe type
    probe_kld: float | None = None           # measured mean KLD with only this tensor quantized
    sensitivity: float = 1.0                 # s_t: predicted KLD per unit of E

    def predicted(self, t: GGMLType) -> float:
        return self.sensitivity * self.errors[t.name]


@dataclass
class Sensitivities:
    """E and s per tensor, the fingerprints they belong to, and how they were measured."""
    tensors: dict[str, TensorSensitivity]
    model: str
    imatrix: str
    calib: str | None                        # None: no calibration text (s_t = 1)
    measured: bool = False
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def predicted(self, name: str, t: GGMLType) -> float:
        return self.tensors[name].predicted(t)

    # --- file
    def save(self, path: str) -> None:
        data = {"format": FORMAT, "model": self.model, "imatrix": self.imatrix, "calib": self.calib,
                "measured": self.measured, "seconds": self.seconds, "info": self.info,
                "tensors": {n: vars(s) for n, s in self.tensors.items()}}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Sensitivities":
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise AllocationError(f"{path}: cannot read the sensitivities file: {e}") from None
        try:
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            tensors = {}
            for n, s in data["tensors"].items():
                errors = {str(k): float(v) for k, v in s["errors"].items()}
                if not all(math.isfinite(v) and v >= 0 for v in errors.values()):
                    raise ValueError(f"tensor {n}: bad error value")
                sens = float(s["sensitivity"])
                if not math.isfinite(sens) or sens < 0:
                    raise ValueError(f"tensor {n}: bad sensitivity {sens}")
                tensors[str(n)] = TensorSensitivity(
                    errors, s.get("probe"), _opt_float(s.get("probe_error")), _opt_float(s.get("probe_kld")), sens)
            return cls(tensors, str(data["model"]), str(data["imatrix"]),
                       None if data.get("calib") is None else str(data["calib"]), bool(data.get("measured")),
                       float(data.get("seconds", 0.0)), dict(data.get("info") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise AllocationError(f"{path}: damaged sensitivities file ({e})") from None

    def matches(self, model: str, imatrix: str, calib: str | None) -> bool:
        return self.model == model and self.imatrix == imatrix and self.calib == calib


def _opt_float(v) -> float | None:
    return None if v is None else float(v)


# --- measuring


def probe_type(slot: TensorSlot, errors: Mapping[str, float]) -> GGMLType:
    """The candidate closest to PROBE_BPW bits with a non-zero error (on-grid weights may have none for some)."""
    cands = [t for t in slot.candidates if errors.get(t.name, 0.0) > 0]
    if not cands:
        return slot.candidates[0]
    return min(cands, key=lambda t: (abs(bpw(t) - PROBE_BPW), bpw(t)))


def measure(slots: Sequence[TensorSlot], read: Callable[[str], np.ndarray],
            imatrix: Mapping[str, np.ndarray] | None, probe: KLDProbe | None, *, model_fp: str, imatrix_fp: str,
            threads: int | None = None, progress: ProgressFn | None = None,
            known: Sensitivities | None = None, mode: str = "tensor") -> Sensitivities:
    """The weight-error table for every slot and candidate, and (with a probe) the measured sensitivities.

    ``read(name)`` returns the tensor's float32 rows (n_rows, ne0). ``known``: an earlier table for the same
    model, imatrix and calibration whose entries are reused (new candidate types are measured). ``mode``: how the
    probes are grouped (see _probe_all)."""
    t0, c0 = time.time(), _cpu()
    out: dict[str, TensorSensitivity] = {}
    total = len(slots)
    done = 0
    for slot in slots:
        x = read(slot.name)
        ne2 = slot.shape[2] if len(slot.shape) > 2 else 1
        rows_per_expert = x.shape[0] // ne2
        prev = known.tensors.get(slot.name) if known is not None else None
        errors = dict(prev.errors) if prev is not None else {}
        for t in slot.candidates:
            if t.name in errors:
                continue
            num = 0.0
            for e in range(ne2):   # experts: each with its own imatrix columns
                xe = x[e * rows_per_expert:(e + 1) * rows_per_expert]
                rows = xe[sample_rows(xe.shape[0], max(1, MAX_SAMPLE_ROWS // ne2))]
                num += weight_error(np.ascontiguousarray(rows), t,
                                    tensor_weights(imatrix, slot.name, slot.shape, e), threads)
            errors[t.name] = num / ne2
        out[slot.name] = TensorSensitivity(errors)
        done += 1
        if progress:
            progress("weight error", done, total)
    sens = Sensitivities(out, model_fp, imatrix_fp, probe.calib.fingerprint if probe else None,
                         measured=probe is not None)
    if probe is None:
        sens.seconds = time.time() - t0
        return sens
    if known is not None and known.measured and known.calib == sens.calib and all(
            (p := known.tensors.get(sl.name)) is not None and p.probe is not None for sl in slots):
        for slot in slots:   # the same model, imatrix, calibration and probe mode: the measurements stand
            prev, ts = known.tensors[slot.name], out[slot.name]
            ts.probe, ts.probe_error, ts.probe_kld, ts.sensitivity = (prev.probe, prev.probe_error, prev.probe_kld,
                                                                      prev.sensitivity)
        sens.seconds, sens.info = known.seconds, dict(known.info)
        return sens
    _probe_all(slots, out, read, imatrix, probe, mode, threads, progress)
    sens.seconds = time.time() - t0
    sens.info = {"calib_tokens": int(probe.tokens.size), "scored_tokens": int(probe.calib.n_scored),
                 "probe": mode, "cpu_seconds": round(_cpu() - c0, 1), "forward_passes": probe.passes,
                 "full_pass_equivalents": round(probe.layers_run / max(probe.n_layer, 1), 1)}
    return sens


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _probe_all(slots: Sequence[TensorSlot], out: dict[str, TensorSensitivity], read, imatrix, probe: KLDProbe,
               mode: str, threads, progress: ProgressFn | None) -> None:
    """The forward-pass probes. ``mode`` "tensor": one pass per tensor (only it quantized). "layer": the tensors of
    three reference layers (first, middle, last) and those outside the layers one by one; every other layer as a
    whole (all its tensors quantized at once), its measured KLD shared among its tensors in the proportions the
    reference layers show for each kind of tensor (interpolated over the layer index)."""
    layer = {sl.name: _layer(sl.name) for sl in slots}
    layers = sorted({v for v in layer.values() if v >= 0})
    refs = set(layers) if mode == "tensor" or len(layers) <= 3 else \
        {layers[0], layers[len(layers) // 2], layers[-1]}
    single = [sl for sl in slots if layer[sl.name] < 0 or layer[sl.name] in refs]
    groups: dict[int, list[TensorSlot]] = {}
    for sl in slots:
        if layer[sl.name] >= 0 and layer[sl.name] not in refs:
            groups.setdefault(layer[sl.name], []).append(sl)

    def quantized(sl: TensorSlot) -> np.ndarray:
        ts = out[sl.name]
        pt = probe_type(sl, ts.errors)
        e_full, y = _quantize_whole(read(sl.name), sl, pt, imatrix, threads)
        ts.probe, ts.probe_error = pt.name, e_full
        return y.reshape(probe.weight_shape(sl.name))

    n_probe = len(single) + len(groups)
    done_p = 0
    for sl in single:
        ts = out[sl.name]
        ts.probe_kld = probe.kld({sl.name: quantized(sl)})
        ts.sensitivity = ts.probe_kld / ts.probe_error if ts.probe_error else 0.0
        done_p += 1
        if progress:
            progress("sensitivity", done_p, n_probe)
    # kind of tensor -> (layer, sensitivity) in the reference layers
    kinds: dict[str, list[tuple[int, float]]] = {}
    for sl in single:
        if layer[sl.name] >= 0:
            kinds.setdefault(_kind(sl.name), []).append((layer[sl.name], out[sl.name].sensitivity))
    for il, members in sorted(groups.items()):
        kld = probe.kld({sl.name: quantized(sl) for sl in members})
        ratio = {}
        for sl in members:
            pts = sorted(kinds.get(_kind(sl.name), []))
            ratio[sl.name] = float(np.interp(il, [p[0] for p in pts], [p[1] for p in pts])) if pts else 1.0
        denom = sum(ratio[sl.name] * (out[sl.name].probe_error or 0.0) for sl in members)
        for sl in members:
            ts = out[sl.name]
            ts.probe_kld = kld   # the whole layer's
            ts.sensitivity = ratio[sl.name] * kld / denom if denom > 0 else 0.0
        done_p += 1
        if progress:
            progress("sensitivity", done_p, n_probe)


def _kind(name: str) -> str:
    """'blk.7.attn_q.weight' -> 'attn_q.weight'."""
    return re.sub(r"^blk\.\d+\.", "", name)


def _quantize_whole(x: np.ndarray, slot: TensorSlot, t: GGMLType, imatrix, threads) -> tuple[float, np.ndarray]:
    """E of the whole tensor at type t and its dequantized rows."""
    ne2 = slot.shape[2] if len(slot.shape) > 2 else 1
    rpe = x.shape[0] // ne2
    parts, es = [], []
    for e in range(ne2):
        err, y, _ = weight_error(np.ascontiguousarray(x[e * rpe:(e + 1) * rpe]), t,
                                 tensor_weights(imatrix, slot.name, slot.shape, e), threads, return_dequantized=True)
        parts.append(y)
        es.append(err)
    return float(np.mean(es)), (parts[0] if ne2 == 1 else np.concatenate(parts))


def quantized_makers(slots: Sequence[TensorSlot], types: Mapping[str, GGMLType], read, probe: KLDProbe, imatrix,
                     threads=None) -> dict[str, Callable[[], np.ndarray]]:
    """For a whole-model KLD of a mix (``probe.kld_lazy``): per slot, a function making its dequantized weight
    at its type in ``types`` (numpy order) when the forward pass first needs it."""
    def maker(slot: TensorSlot) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            _, y = _quantize_whole(read(slot.name), slot, types[slot.name], imatrix, threads)
            return y.reshape(probe.weight_shape(slot.name))
        return make
    return {slot.name: maker(slot) for slot in slots}

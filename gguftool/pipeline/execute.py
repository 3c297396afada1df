"""The streaming quantize pipeline shared by ``gguftool quantize`` and ``gguftool convert``:

    TensorSource --(policy: a type per tensor)--> quant kernels --> GGUFWriter (temp file + rename)

One tensor at a time, and a big tensor in slabs of rows, so memory stays bounded whatever the model size.
It mirrors llama.cpp's ``llama_model_quantize_impl`` (src/llama-quant.cpp) for what lands in the file:

- tensors in llama's order (non-layer tensors first, then by layer, each group sorted by name);
- KV pairs of the input in order, then ``general.quantization_version`` and ``general.file_type`` moved to
  the end (llama.cpp's gguf_set_val_* removes a key and appends it), ``split.*`` keys removed, then the
  --override-kv pairs and the ``quantize.imatrix.*`` keys the same way;
- a tensor whose type does not change is copied byte for byte; others are converted to float32 (dequantized
  if needed) and quantized with the imatrix weights of their name.

Two steps: :func:`make_plan` decides everything and checks every request before a byte is written (so a bad
request never leaves a partial file); :func:`execute` streams the data. Neither prints: progress and warnings
go to callbacks.
"""
from __future__ import annotations

import math
import mmap
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import policy as P
from ..errors import ImatrixError, PolicyError, QuantError
from ..gguf.constants import (GGML_QUANTIZATION_VERSION, KEY_FILE_TYPE, KEY_QUANTIZATION_VERSION, GGMLType,
                             GGUFValueType)
from ..gguf.values import KV, kv_bool, kv_f32, kv_str, kv_u32
from ..importance.files import Imatrix
from .source import SourceTensor, TensorSource

__all__ = ["QuantizeConfig", "Plan", "TensorResult", "Summary", "make_plan", "execute", "output_kvs",
           "parse_kv_override", "imatrix_kvs", "SLAB_BYTES"]

# float32 bytes of source rows converted at once (a big tensor goes through in slabs of this size)
SLAB_BYTES = 64 << 20

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
    order: str = "llama"                   # "llama": llama-quantize's tensor order; "source": as given
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


def _shape3(shape: Sequence[int]) -> tuple[int, int, int]:
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
        if not all(hasattr(t, "split_index") and hasattr(t, "info") for t in by_name.values()):
            raise PolicyError("--keep-split needs a GGUF input (it keeps the input's split files)")
        names = sorted(by_name, key=lambda n: (by_name[n].split_index, by_name[n].info.offset))
    elif cfg.order == "llama":
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
    split_of = [by_name[tp.name].split_index for tp in plans] if cfg.keep_split else None
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
        ne0, _, ne2 = _shape3(tp.shape)
        if weights[name].size != ne0 * ne2:
            msg = (f"imatrix size {weights[name].size} is different from tensor size {ne0 * ne2} for {name}")
            if name in ("token_embd.weight", "per_layer_token_embd.weight"):
                warnings.append(msg + " (ignored for the token embeddings)")
            else:
                raise ImatrixError(msg)
    elif weights is not None and P.is_quantized(tp.new_type) and tp.new_type != GGMLType.Q8_0:
        missing.append(name)


# --- execution


@dataclass
class TensorResult:
    name: str
    shape: tuple[int, ...]
    src_type: GGMLType
    new_type: GGMLType
    src_bytes: int
    new_bytes: int
    seconds: float
    rmse: float | None = None           # --stats: RMS error of the dequantized result against the source
    weighted_rmse: float | None = None  # --stats with an imatrix: the same, columns weighted by the imatrix


@dataclass
class Summary:
    path: str | None
    results: list[TensorResult]
    src_bytes: int
    out_bytes: int
    n_elements: int
    file_size: int
    seconds: float
    n_fallback: int
    paths: list[str] = field(default_factory=list)   # every file written (several with --keep-split)

    @property
    def src_bpw(self) -> float:
        return self.src_bytes * 8.0 / self.n_elements if self.n_elements else 0.0

    @property
    def out_bpw(self) -> float:
        return self.out_bytes * 8.0 / self.n_elements if self.n_elements else 0.0

    def overall_rmse(self) -> float | None:
        rs = [(r.rmse, math.prod(r.shape)) for r in self.results if r.rmse is not None]
        if not rs:
            return None
        n = sum(k for _, k in rs)
        return math.sqrt(sum(r * r * k for r, k in rs) / n) if n else 0.0


Progress = Callable[[int, P.TensorPlan], None]


def execute(source: TensorSource, plan: Plan, out_path: "str | os.PathLike[str]", *, threads: int | None = None,
            stats: bool = False, overwrite: bool = False, protect: Sequence[str] = (),
            progress: Progress | None = None) -> Summary:
    """Write the planned file (or files, with --keep-split). progress(n, tensor) is called with source bytes
    just processed.

    Each output goes to a temporary file; all are renamed onto their targets once every one is complete. On
    any error or interrupt the temporary files are removed and the targets are left as they were.
    """
    from ..gguf.writer import GGUFWriter

    t0 = time.perf_counter()
    out_path = os.fspath(out_path)
    results: list[TensorResult] = []
    scratch = _ReadAhead(plan)
    files = output_files(plan, out_path)
    writers: list[GGUFWriter] = []
    with scratch:
        try:
            for path, kvs, tensors in files:
                w = GGUFWriter(path, overwrite=overwrite, protect=list(protect))
                writers.append(w)
                w.add_kvs(kvs)
                for tp in tensors:
                    w.add_tensor_info(tp.name, _ggml_shape(tp.shape), tp.new_type)
                w.write_header()
                scratch.write_behind = _WriteBehind.install(w)
                for tp in tensors:
                    results.append(_write_tensor(w, tp, plan, threads, stats, progress, scratch))
                w.finish(rename=False)
            for w in writers:
                w.commit()
        except BaseException:
            for w in writers:
                w.abort()
            raise
    paths = [f[0] for f in files]
    return Summary(paths[0], results, plan.src_bytes, plan.out_bytes, plan.n_elements,
                   sum(os.path.getsize(p) for p in paths), time.perf_counter() - t0, plan.n_fallback, paths)


def _write_tensor(w, tp: P.TensorPlan, plan: Plan, threads, stats: bool, progress, scratch) -> TensorResult:
    t1 = time.perf_counter()
    src = plan.sources[tp.name]
    acc = _StatAcc() if stats and tp.converts else None
    try:
        w.write_tensor_data(tp.name, _tensor_chunks(src, tp, plan.imatrix, threads, acc, progress, scratch))
    except QuantError as e:
        if tp.name in str(e):
            raise
        raise QuantError(f"tensor {tp.name} ({tp.src_type.name} -> {tp.new_type.name}): {e}") from None
    r = TensorResult(tp.name, tp.shape, tp.src_type, tp.new_type, tp.src_nbytes, tp.new_nbytes,
                     time.perf_counter() - t1)
    if acc is not None:
        r.rmse, r.weighted_rmse = acc.result()
    return r


class _WriteBehind:
    """Stands in for a GGUFWriter's output file: writes are queued, and ``kick()`` (called just before each
    kernel call) hands everything queued to a background thread that writes it with one ``os.writev`` system
    call (which runs without the GIL the numba kernels hold), so the page-cache copy of the output overlaps
    the next slab's quantization. Order is kept (one batch in flight at a time); ``close()`` writes what is
    left and reports any write error. The queued buffers are the writer's own chunks (fresh kernel outputs,
    views of the source map, header bytes), none of which is modified afterwards."""

    _MAX_IOV = 512

    def __init__(self, f):
        import threading

        self._f = f
        self._fd = f.fileno()
        self._queue: list = []
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._err: BaseException | None = None
        self._closed = False

    @classmethod
    def install(cls, writer) -> "_WriteBehind | None":
        f = getattr(writer, "_file", None)
        if f is None or not hasattr(os, "writev"):
            return None
        try:
            f.flush()
            wb = cls(f)
        except (OSError, ValueError, AttributeError):
            return None
        writer._file = wb
        return wb

    def write(self, data) -> int:
        if self._err is not None:
            raise self._err
        mv = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self._queue.append(mv)
        return len(mv)

    def flush(self) -> None:
        self._wait()
        self._write_all(self._take())

    def _take(self) -> list:
        q, self._queue = self._queue, []
        return q

    def _write_all(self, bufs: list) -> None:
        i = 0
        while i < len(bufs):
            batch = bufs[i:i + self._MAX_IOV]
            i += len(batch)
            while batch:
                k = os.writev(self._fd, batch)
                while batch and k >= len(batch[0]):
                    k -= len(batch[0])
                    batch.pop(0)
                if batch and k:
                    batch[0] = memoryview(batch[0])[k:]

    def _wait(self) -> None:
        self._idle.wait()
        if self._err is not None:
            raise self._err

    def kick(self) -> None:
        if not self._queue or not self._idle.is_set() or self._err is not None:
            return
        import threading

        bufs = self._take()
        started = threading.Event()
        self._idle.clear()

        def run():
            started.set()
            try:
                self._write_all(bufs)
            except BaseException as e:  # reported by the next write/close
                self._err = e
            finally:
                self._idle.set()

        threading.Thread(target=run, name="gguftool-write", daemon=True).start()
        started.wait()                  # the thread is about to enter writev (which releases the GIL)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            self._f.close()


def _ggml_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """llama.cpp writes ggml_n_dims dimensions (trailing 1s dropped)."""
    return tuple(shape[:P.n_dims(shape)])


class _Scratch:
    """One float32 buffer reused for every slab of every tensor (no fresh pages to fault in per slab)."""

    def __init__(self):
        self.buf = None

    def get(self, n: int) -> np.ndarray:
        if self.buf is None or self.buf.size < n:
            self.buf = np.empty(max(n, SLAB_BYTES // 4), dtype=np.float32)
        return self.buf


def _read_rows(src: SourceTensor, start: int, stop: int, scratch: "_Scratch | None" = None) -> np.ndarray:
    into = getattr(src, "read_rows_into", None)
    if into is not None and scratch is not None:
        x = into(start, stop, scratch.get((stop - start) * src.shape[0]))
        if x is not None:
            return x
    rr = getattr(src, "read_rows", None)
    if rr is not None:
        return rr(start, stop)
    return src.read_f32()[start:stop]


def _slabs(tp: P.TensorPlan):
    """(start_row, stop_row, expert) of each slab of a converted tensor, in order."""
    ne0, ne1, _ = _shape3(tp.shape)
    n_rows = tp.n_elements // ne0
    rows_per_expert = ne1 if len(tp.shape) >= 3 else n_rows
    slab = max(1, SLAB_BYTES // (4 * ne0))
    row = 0
    while row < n_rows:
        # a slab never crosses an expert boundary: each expert has its own imatrix slice
        expert = row // rows_per_expert
        stop = min(n_rows, row + slab, (expert + 1) * rows_per_expert)
        yield row, stop, expert
        row = stop


class _ReadAhead:
    """The source slabs of the converted tensors. F32 tensors of a GGUF file: views of a private map of the
    file (see _map_location). Other sources with ``read_rows_into``: read one slab ahead, in a background
    thread, while the current slab is quantized (the read is a kernel copy from the page cache that otherwise
    waits for the kernels, and vice versa); two float32 buffers, used in turn.

    The numba kernels hold the GIL, so a read is only handed over once its thread is about to enter the
    system call (which releases the GIL): ``_start`` waits for that. Slabs must be asked for in plan order
    (``rows``); anything else (or a source without a reader thread's benefit) reads synchronously."""

    def __init__(self, plan: Plan):
        self._sources = plan.sources
        self._maps: dict[str, "mmap.mmap | None"] = {}
        jobs = [(tp.name, a, b) for tp in plan.tensors if tp.converts for a, b, _ in _slabs(tp)]
        self._mapped = {}
        for tp in plan.tensors:
            if tp.converts:
                loc = self._map_location(self._sources[tp.name])
                if loc is not None:
                    self._mapped[tp.name] = loc
        self._jobs = iter([j for j in jobs if j[0] not in self._mapped])
        self._bufs = [_Scratch(), _Scratch()]
        self._turn = 0
        self._pool = None
        self._pending = None          # (job, future)
        self._sync = _Scratch()
        self.write_behind: "_WriteBehind | None" = None   # set by execute once the header is written

    def __enter__(self):
        self._start_next()
        return self

    def __exit__(self, *exc):
        self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        maps, self._maps = self._maps, {}
        for m in maps.values():
            if m is not None:
                try:
                    m.close()
                except BufferError:     # a slab view still alive somewhere: the collector closes it
                    pass
        return False

    # F32 tensors of a GGUF file are quantized straight from a private (copy-on-write) map of the file: the
    # kernels read the page cache, with no copy into a buffer (a private map, because numba types the
    # read-only views of a shared read-only map apart, and quantize() copies those; nothing writes to it).
    def _map_location(self, src) -> "tuple[str, int] | None":
        reader = getattr(src, "_reader", None)
        info = getattr(src, "info", None)
        path = getattr(reader, "path", None)
        base = getattr(reader, "data_offset", None)
        if (src.type != GGMLType.F32 or info is None or not isinstance(path, str) or base is None
                or getattr(src, "read_rows_into", None) is None or not os.path.isfile(path)):
            return None
        return path, base + info.offset

    def _map(self, path: str):
        if path not in self._maps:
            import mmap

            m = None
            try:
                with open(path, "rb") as f:
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):
                m = None
            self._maps[path] = m
        return self._maps[path]

    def _mapped_rows(self, name: str, src, start: int, stop: int) -> "np.ndarray | None":
        path, off = self._mapped[name]
        m = self._map(path)
        ne0 = src.shape[0]
        pos = off + start * ne0 * 4
        n = (stop - start) * ne0
        if m is None or pos + 4 * n > len(m):
            return None                 # (the pread path reports a truncated file properly)
        return np.frombuffer(m, dtype=np.float32, count=n, offset=pos).reshape(stop - start, ne0)

    def _drain(self) -> None:
        if self._pending is not None:
            _, fut = self._pending
            self._pending = None
            try:
                fut.result()
            except BaseException:       # the error (if any) is raised where the slab is used
                pass

    def _start_next(self) -> None:
        job = next(self._jobs, None)
        if job is None:
            return
        src = self._sources[job[0]]
        if getattr(src, "read_rows_into", None) is None:
            self._pending = (job, None)
            return
        import threading
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguftool-read")
        buf = self._bufs[self._turn]
        self._turn ^= 1
        started = threading.Event()

        def read():
            started.set()
            return _read_rows(src, job[1], job[2], buf)

        fut = self._pool.submit(read)
        started.wait()
        self._pending = (job, fut)

    def release(self, name: str, src, start: int, stop: int) -> None:
        """Unmap a used slab's pages (they would stay in the process's resident set until the end)."""
        if name not in self._mapped:
            return
        import mmap

        m = self._maps.get(self._mapped[name][0])
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if m is None or advice is None:
            return
        ne0 = src.shape[0]
        page = mmap.PAGESIZE
        lo = self._mapped[name][1] + start * ne0 * 4
        hi = min(self._mapped[name][1] + stop * ne0 * 4, len(m))
        lo = -(-lo // page) * page          # whole pages inside the slab only
        hi = hi // page * page
        if hi > lo:
            try:
                m.madvise(advice, lo, hi - lo)
            except (OSError, ValueError):
                pass

    def rows(self, name: str, src: SourceTensor, start: int, stop: int) -> np.ndarray:
        if name in self._mapped:
            x = self._mapped_rows(name, src, start, stop)
            if x is not None:
                return x
            return _read_rows(src, start, stop, self._sync)
        if self._pending is not None and self._pending[0] == (name, start, stop):
            _, fut = self._pending
            self._pending = None
            if fut is None:
                x = _read_rows(src, start, stop, self._sync)
            else:
                x = fut.result()
            self._start_next()
            return x
        return _read_rows(src, start, stop, self._sync)


def _tensor_chunks(src: SourceTensor, tp: P.TensorPlan, imatrix, threads, acc, progress, scratch=None):
    """The bytes of one output tensor, slab by slab."""
    from ..quants import dequantize, quantize

    total = tp.src_nbytes
    if not tp.converts:
        raw = src.read_raw()
        step = max(SLAB_BYTES, 1)
        for off in range(0, raw.size, step):
            chunk = raw[off:off + step]
            yield chunk
            if progress:
                progress(chunk.size, tp)
        if raw.size == 0 and progress:
            progress(0, tp)
        return

    ne0, ne1, ne2 = _shape3(tp.shape)
    n_rows = tp.n_elements // ne0
    w_all = imatrix.get(tp.name) if imatrix is not None else None
    if w_all is not None and w_all.size != ne0 * ne2:
        w_all = None  # token_embd with a mismatched entry: ignored, as llama.cpp does
    src_row_bytes = total // n_rows if n_rows else 0
    for row, stop, expert in _slabs(tp):
        if isinstance(scratch, _ReadAhead):
            x = scratch.rows(tp.name, src, row, stop)
        else:
            x = _read_rows(src, row, stop, scratch)
        w = None if w_all is None else w_all[expert * ne0:(expert + 1) * ne0]
        wb = getattr(scratch, "write_behind", None)
        if wb is not None:
            wb.kick()                   # the output so far is written while this slab is quantized
        q = quantize(x, tp.new_type, imatrix=w, threads=threads)
        if acc is not None:
            acc.add(x, dequantize(q, tp.new_type, ne0, threads=threads), w)
        del x
        if isinstance(scratch, _ReadAhead):
            scratch.release(tp.name, src, row, stop)
        yield q
        if progress:
            progress((stop - row) * src_row_bytes, tp)


class _StatAcc:
    """Running sums for the RMS error of one tensor (float64)."""

    def __init__(self):
        self.se = 0.0
        self.n = 0
        self.wse = 0.0
        self.wsum = 0.0

    def add(self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> None:
        d = (y.astype(np.float64) - x.astype(np.float64)) ** 2
        col = d.sum(axis=0)
        self.se += float(col.sum())
        self.n += d.size
        if w is not None:
            w64 = w.astype(np.float64)
            self.wse += float(col @ w64)
            self.wsum += float(w64.sum()) * d.shape[0]

    def result(self) -> tuple[float | None, float | None]:
        rmse = math.sqrt(self.se / self.n) if self.n else None
        wrmse = math.sqrt(self.wse / self.wsum) if self.wsum > 0 else None
        return rmse, wrmse

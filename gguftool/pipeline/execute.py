"""Running a plan: every tensor streamed from its source through the quant kernels into the writer.

One tensor at a time, and a big tensor in slabs of rows (:mod:`.io`), so memory stays bounded whatever the model
size. A tensor whose type does not change is copied byte for byte; the others are read as float32 (dequantized if
needed) and quantized with the imatrix weights of their name. The output is written behind the kernels
(GGUFWriter's ``write_behind``) into unnamed files (gguftool.outfile), put in place together once all are
complete. Nothing here prints: progress goes to a callback.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import QuantError
from ..gguf.constants import GGMLType
from ..gguf.writer import GGUFWriter
from . import io as pio
from . import policy as P
from .plan import Plan, output_files, shape3
from .source import SourceTensor, TensorSource

__all__ = ["TensorResult", "Summary", "Progress", "ErrorSums", "execute", "tensor_chunks", "tensor_weights",
           "ggml_shape"]


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

    Every output file stays unnamed (gguftool.outfile) until all of them are complete, then all are put in place
    together. On any error or interrupt nothing is left and the targets are as they were.
    """
    from ..gguf.writer import GGUFWriter, commit_writers
    from ..outfile import check_outputs

    t0 = time.perf_counter()
    out_path = os.fspath(out_path)
    results: list[TensorResult] = []
    reader = pio.SlabReader.of_plan(plan, threads)
    files = output_files(plan, out_path)
    check_outputs([f[0] for f in files], protect, overwrite=overwrite)
    writers: list[GGUFWriter] = []
    with reader:
        try:
            for path, kvs, tensors in files:
                # write-behind: the page-cache copy of the output overlaps the next slab's quantization
                w = GGUFWriter(path, overwrite=overwrite, protect=list(protect), write_behind=True)
                writers.append(w)
                w.add_kvs(kvs)
                for tp in tensors:
                    w.add_tensor_info(tp.name, ggml_shape(tp.shape), tp.new_type)
                w.write_header()
                for tp in tensors:
                    results.append(_write_tensor(w, tp, plan, threads, stats, progress, reader))
                w.finish(rename=False)
            commit_writers(writers)
        except BaseException:
            for w in writers:
                w.abort()
            raise
    paths = [f[0] for f in files]
    return Summary(paths[0], results, plan.src_bytes, plan.out_bytes, plan.n_elements,
                   sum(os.path.getsize(p) for p in paths), time.perf_counter() - t0, plan.n_fallback, paths)


def _write_tensor(w: GGUFWriter, tp: P.TensorPlan, plan: Plan, threads: int | None, stats: bool,
                  progress: Progress | None, reader: pio.SlabReader) -> TensorResult:
    t1 = time.perf_counter()
    src = plan.sources[tp.name]
    acc = ErrorSums() if stats and tp.converts else None
    try:
        w.write_tensor_data(tp.name, tensor_chunks(src, tp, tensor_weights(tp, plan.imatrix), threads, reader,
                                                   acc=acc, progress=progress))
    except QuantError as e:
        if tp.name in str(e):
            raise
        raise QuantError(f"tensor {tp.name} ({tp.src_type.name} -> {tp.new_type.name}): {e}") from None
    r = TensorResult(tp.name, tp.shape, tp.src_type, tp.new_type, tp.src_nbytes, tp.new_nbytes,
                     time.perf_counter() - t1)
    if acc is not None:
        r.rmse, r.weighted_rmse = acc.result()
    return r


def ggml_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """llama.cpp writes ggml_n_dims dimensions (trailing 1s dropped)."""
    return tuple(shape[:P.n_dims(shape)])


def tensor_weights(tp: P.TensorPlan, imatrix: dict[str, np.ndarray] | None) -> np.ndarray | None:
    """The imatrix weights a converted tensor is quantized with (all experts' slices), or None."""
    w_all = imatrix.get(tp.name) if imatrix is not None else None
    ne0, _, ne2 = shape3(tp.shape)
    if w_all is not None and w_all.size != ne0 * ne2:
        return None  # token_embd with a mismatched entry: ignored, as llama.cpp does
    return w_all


def tensor_chunks(src: SourceTensor, tp: P.TensorPlan, weights: np.ndarray | None, threads: int | None,
                  reader: pio.SlabReader, start: int = 0, stop: int | None = None, *, acc: ErrorSums | None = None,
                  progress: Progress | None = None) -> Iterator[np.ndarray]:
    """The bytes of one output tensor, slab by slab; with ``start``/``stop`` only those of its rows [start, stop)
    (whole slabs: :func:`gguftool.pipeline.io.slabs`), for a converted tensor. ``weights``: tensor_weights()."""
    from ..quants import dequantize, quantize

    total = tp.src_nbytes
    if not tp.converts:
        if start != 0 or stop is not None:
            raise ValueError("a copied tensor goes in one piece")
        raw = src.read_raw()
        step = max(pio.SLAB_BYTES, 1)
        for off in range(0, raw.size, step):
            chunk = raw[off:off + step]
            yield chunk
            if progress:
                progress(chunk.size, tp)
        if raw.size == 0 and progress:
            progress(0, tp)
        return

    ne0, ne1, ne2 = shape3(tp.shape)
    n_rows = tp.n_elements // ne0
    src_row_bytes = total // n_rows if n_rows else 0
    for row, last, expert in pio.slabs(tp, start, stop):
        x = reader.rows(src, row, last)
        w = None if weights is None else weights[expert * ne0:(expert + 1) * ne0]
        q = quantize(x, tp.new_type, imatrix=w, threads=threads)
        if acc is not None:
            acc.add(x, dequantize(q, tp.new_type, ne0, threads=threads), w)
        del x
        reader.release(src, row, last)
        yield q
        if progress:
            progress((last - row) * src_row_bytes, tp)


class ErrorSums:
    """Running sums for the RMS error of one tensor (float64): slab by slab with add(), and the sums of pieces
    computed elsewhere (Ray tasks) with merge()."""

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

    def merge(self, other: ErrorSums) -> None:
        self.se += other.se
        self.n += other.n
        self.wse += other.wse
        self.wsum += other.wsum

    def result(self) -> tuple[float | None, float | None]:
        rmse = math.sqrt(self.se / self.n) if self.n else None
        wrmse = math.sqrt(self.wse / self.wsum) if self.wsum > 0 else None
        return rmse, wrmse

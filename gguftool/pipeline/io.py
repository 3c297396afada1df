"""The pipeline's read side: the source rows of every converted tensor, in slabs, read ahead of the kernels.

A big tensor goes through the kernels in slabs of rows (:data:`SLAB_BYTES` of float32 at a time, never across
an expert boundary: see :func:`slabs`), so memory stays bounded whatever the model size. :class:`SlabReader`
gives those slabs in plan order as cheaply as the source allows:

- F32 tensors stored as they are in a file (``SourceTensor.raw_location``): views of a private map of the file,
  no copy at all;
- sources whose reads may run in another thread (``SourceTensor.concurrent_reads``): the next slab is read in a
  background thread, into one of two reused float32 buffers, while the current one is quantized; a GGUF input's
  F16, BF16 or quantized rows are decoded straight into that buffer by ``threads`` threads (nogil kernels, so the
  decoding overlaps the quantization of the slab before);
- anything else: read when asked, into one reused buffer where the source can.

(The write side, the output written behind the kernels, is GGUFWriter's ``write_behind`` option.)
"""
from __future__ import annotations

import mmap
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np

from ..gguf.constants import GGMLType
from . import policy as P
from .plan import Plan, shape3
from .source import SourceTensor

# one piece of work for the reader: a converted tensor, its source, and the rows [start, stop) wanted (whole slabs)
Piece = tuple[P.TensorPlan, SourceTensor, int, int]

__all__ = ["SLAB_BYTES", "SlabReader", "slabs"]

# float32 bytes of source rows converted at once (a big tensor goes through in slabs of this size)
SLAB_BYTES = 64 << 20


def slabs(tp: P.TensorPlan, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int, int]]:
    """(start_row, stop_row, expert) of each slab of a converted tensor, in order; with ``start``/``stop`` only the
    slabs inside rows [start, stop) (a piece of a tensor made of whole slabs: gguftool.distributed)."""
    ne0, ne1, _ = shape3(tp.shape)
    n_rows = tp.n_elements // ne0
    end = n_rows if stop is None else stop
    rows_per_expert = ne1 if len(tp.shape) >= 3 else n_rows
    slab = max(1, SLAB_BYTES // (4 * ne0))
    row = 0
    while row < n_rows:
        # a slab never crosses an expert boundary: each expert has its own imatrix slice
        expert = row // rows_per_expert
        last = min(n_rows, row + slab, (expert + 1) * rows_per_expert)
        if row >= end:
            return
        if row >= start and last <= end:
            yield row, last, expert
        row = last


def _thread_count(threads: int | None) -> int:
    """--threads as a count (None: numba's thread count, i.e. every core unless NUMBA_NUM_THREADS says less)."""
    if threads is not None:
        return max(1, int(threads))
    import numba     # (loaded by the kernels anyway)

    return max(1, int(numba.config.NUMBA_NUM_THREADS))


class _Scratch:
    """One float32 buffer reused for every slab it holds (no fresh pages to fault in per slab)."""

    def __init__(self):
        self.buf: np.ndarray | None = None

    def get(self, n: int) -> np.ndarray:
        if self.buf is None or self.buf.size < n:
            self.buf = np.empty(max(n, SLAB_BYTES // 4), dtype=np.float32)
        return self.buf


class SlabReader:
    """The source slabs of a plan's converted tensors (see the module docstring); a context manager.

    The numba kernels hold the GIL, so a background read is only handed over once its thread is about to enter
    the system call (which releases the GIL): ``_start_next`` waits for that. Slabs must be asked for in plan
    order (:func:`slabs` of each converted tensor); anything else is read synchronously.

    ``pieces``: the (tensor, source, start row, stop row) to be read, in order (:meth:`of_plan`: all of a plan's
    converted tensors). ``threads``: how many threads a source may decode a slab with (None: every core, as the
    kernels' own default)."""

    def __init__(self, pieces: "list[Piece]", threads: int | None = None):
        self._threads = _thread_count(threads)
        self._maps: dict[str, mmap.mmap | None] = {}
        self._mapped: dict[str, tuple[str, int]] = {}     # tensor name -> (path, offset) of its F32 rows
        for tp, src, _, _ in pieces:
            if tp.converts:
                loc = src.raw_location() if src.type == GGMLType.F32 else None
                if loc is not None:
                    self._mapped[tp.name] = loc
        self._jobs = iter([(src, a, b) for tp, src, start, stop in pieces
                           if tp.converts and tp.name not in self._mapped for a, b, _ in slabs(tp, start, stop)])
        self._bufs = [_Scratch(), _Scratch()]
        self._turn = 0
        self._pool: ThreadPoolExecutor | None = None
        # the next slab: ((tensor name, start, stop), its background read or None to read it when asked)
        self._pending: tuple[tuple[str, int, int], Future | None] | None = None
        self._sync = _Scratch()

    @classmethod
    def of_plan(cls, plan: Plan, threads: int | None = None) -> "SlabReader":
        return cls([(tp, plan.sources[tp.name], 0, tp.n_elements // shape3(tp.shape)[0]) for tp in plan.tensors
                    if tp.converts], threads)

    def __enter__(self) -> "SlabReader":
        self._start_next()
        return self

    def __exit__(self, *exc) -> None:
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

    def rows(self, src: SourceTensor, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of ``src`` as float32, shape (stop - start, ne0); valid until the next call."""
        if src.name in self._mapped:
            x = self._mapped_rows(src, start, stop)
            if x is not None:
                return x
            return src.read_rows_into(start, stop, self._sync.get((stop - start) * src.shape[0]), self._threads)
        if self._pending is not None and self._pending[0] == (src.name, start, stop):
            _, fut = self._pending
            self._pending = None
            if fut is None:
                x = src.read_rows_into(start, stop, self._sync.get((stop - start) * src.shape[0]), self._threads)
            else:
                x = fut.result()
            self._start_next()
            return x
        return src.read_rows_into(start, stop, self._sync.get((stop - start) * src.shape[0]), self._threads)

    def release(self, src: SourceTensor, start: int, stop: int) -> None:
        """Unmap a used slab's pages (they would stay in the process's resident set until the end)."""
        if src.name not in self._mapped:
            return
        path, off = self._mapped[src.name]
        m = self._maps.get(path)
        advice = getattr(mmap, "MADV_DONTNEED", None)   # (not on every platform)
        if m is None or advice is None:
            return
        ne0 = src.shape[0]
        page = mmap.PAGESIZE
        lo = off + start * ne0 * 4
        hi = min(off + stop * ne0 * 4, len(m))
        lo = -(-lo // page) * page          # whole pages inside the slab only
        hi = hi // page * page
        if hi > lo:
            try:
                m.madvise(advice, lo, hi - lo)
            except (OSError, ValueError):
                pass

    # F32 tensors stored as they are in a file are quantized straight from a private (copy-on-write) map of the
    # file: the kernels read the page cache, with no copy into a buffer (a private map, because numba types the
    # read-only views of a shared read-only map apart, and quantize() copies those; nothing writes to it).
    def _map(self, path: str) -> mmap.mmap | None:
        if path not in self._maps:
            m = None
            try:
                with open(path, "rb") as f:
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):
                m = None
            self._maps[path] = m
        return self._maps[path]

    def _mapped_rows(self, src: SourceTensor, start: int, stop: int) -> np.ndarray | None:
        path, off = self._mapped[src.name]
        m = self._map(path)
        ne0 = src.shape[0]
        pos = off + start * ne0 * 4
        n = (stop - start) * ne0
        if m is None or pos + 4 * n > len(m):
            return None                 # (the source's own read reports a truncated file properly)
        return np.frombuffer(m, dtype=np.float32, count=n, offset=pos).reshape(stop - start, ne0)

    def _drain(self) -> None:
        if self._pending is not None:
            _, fut = self._pending
            self._pending = None
            if fut is not None:
                try:
                    fut.result()
                except BaseException:   # the error (if any) is raised where the slab is used
                    pass

    def _start_next(self) -> None:
        job = next(self._jobs, None)
        if job is None:
            return
        src, start, stop = job
        key = (src.name, start, stop)
        if not src.concurrent_reads:
            self._pending = (key, None)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguftool-read")
        buf = self._bufs[self._turn].get((stop - start) * src.shape[0])
        self._turn ^= 1
        threads = self._threads
        started = threading.Event()

        def read():
            started.set()
            return src.read_rows_into(start, stop, buf, threads)

        fut = self._pool.submit(read)
        started.wait()
        self._pending = (key, fut)

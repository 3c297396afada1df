"""What a Ray worker runs for a distributed convert/quantize: one task's pieces, through the pipeline's own code.

The worker opens the source again from its recipe (the same files, seen through storage every worker shares;
kept open for the next task of the same run), reads each piece's rows with the pipeline's slab reader (one slab
at a time, inputs memory-mapped: the same bounded memory as a single-process run) and quantizes them with
:func:`gguftool.pipeline.execute.tensor_chunks` -- the function the single-process pipeline calls. The bytes go
either straight into the run's part file at the planned offsets (``os.pwrite``; shared storage), or back to the
driver as arrays (through Ray's object store). Nothing here imports Ray: the driver wraps :func:`run_task` as a
Ray task (gguftool.distributed.execute), and a piece written twice (a retried task) writes the same bytes.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, QuantError
from ..pipeline import io as pio
from ..pipeline.execute import ErrorSums, tensor_chunks, tensor_weights
from ..pipeline.source import SourceRecipe, SourceTensor, TensorSource
from .pieces import Piece

__all__ = ["TaskSpec", "TaskResult", "run_task"]


@dataclass(frozen=True)
class TaskSpec:
    recipe: SourceRecipe
    run_id: str                         # the run (a worker keeps one run's source open between its tasks)
    part_paths: list[str] | None        # the part file of each output file; None: return the bytes instead
    pieces: list[Piece]
    threads: int                        # kernel threads (the CPUs the task reserved)
    stats: bool = False                 # also return each converted piece's error sums (--stats)


@dataclass
class TaskResult:
    seconds: list[float]                # per piece
    data: list[np.ndarray] | None       # per piece, its bytes (part_paths None), else None
    errors: list[ErrorSums | None]      # per piece, its error sums (with spec.stats, for a converted piece)


# the source this worker process has open: (run id, recipe, source, its tensors by name)
_open: tuple[str, SourceRecipe, TensorSource, dict[str, SourceTensor]] | None = None


def _source(recipe: SourceRecipe, run_id: str) -> dict[str, SourceTensor]:
    global _open
    if _open is not None and _open[0] == run_id and _open[1] == recipe:
        return _open[3]
    if _open is not None:
        old, _open = _open, None
        old[2].close()
    src = recipe.open()
    _open = (run_id, recipe, src, {t.name: t for t in src.tensors})
    return _open[3]


def _tensor(tensors: dict[str, SourceTensor], p: Piece) -> SourceTensor:
    st = tensors.get(p.tp.name)
    if st is None or tuple(st.shape) != tuple(p.tp.shape) or st.type != p.tp.src_type:
        raise FormatError(f"tensor {p.tp.name}: not in the input as planned ({p.tp.src_type.name} "
                          f"{list(p.tp.shape)}) on this worker: was the input changed during the run, or does "
                          f"this machine see other files at its path?")
    return st


def run_task(spec: TaskSpec, imatrix: dict[str, np.ndarray] | None) -> TaskResult:
    """Compute (and, with part files, write) every piece of one task."""
    tensors = _source(spec.recipe, spec.run_id)
    srcs = [_tensor(tensors, p) for p in spec.pieces]
    fds: dict[int, int] = {}
    seconds: list[float] = []
    errors: list[ErrorSums | None] = []
    data: list[np.ndarray] | None = None if spec.part_paths is not None else []
    reader = pio.SlabReader([(p.tp, s, p.start, p.stop) for p, s in zip(spec.pieces, srcs) if p.tp.converts],
                            spec.threads)
    try:
        with reader:
            for p, st in zip(spec.pieces, srcs):
                t0 = time.perf_counter()
                rows = (p.start, p.stop) if p.tp.converts else (0, None)
                acc = ErrorSums() if spec.stats and p.tp.converts else None
                chunks = tensor_chunks(st, p.tp, tensor_weights(p.tp, imatrix), spec.threads, reader, *rows,
                                       acc=acc)
                if spec.part_paths is None:
                    assert data is not None
                    data.append(_collect(p, chunks))
                else:
                    if p.file not in fds:
                        # O_WRONLY without O_CREAT: a part file the driver has dropped (abort) is not made again
                        fds[p.file] = os.open(spec.part_paths[p.file], os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
                    _write_at(fds[p.file], p, chunks)
                seconds.append(time.perf_counter() - t0)
                errors.append(acc)
    except QuantError as e:
        name = spec.pieces[len(seconds)].tp
        if name.name in str(e):
            raise
        raise QuantError(f"tensor {name.name} ({name.src_type.name} -> {name.new_type.name}): {e}") from None
    finally:
        for fd in fds.values():
            os.close(fd)
    return TaskResult(seconds, data, errors)


def _collect(p: Piece, chunks) -> np.ndarray:
    out = np.empty(p.nbytes, np.uint8)
    pos = 0
    for c in chunks:
        b = np.ascontiguousarray(c).reshape(-1).view(np.uint8)
        _check_size(p, pos + b.size)
        out[pos:pos + b.size] = b
        pos += b.size
    _check_size(p, pos, final=True)
    return out


def _write_at(fd: int, p: Piece, chunks) -> None:
    pos = 0
    for c in chunks:
        mv = np.ascontiguousarray(c).reshape(-1).view(np.uint8).data
        _check_size(p, pos + mv.nbytes)
        done = 0
        while done < mv.nbytes:
            done += os.pwrite(fd, mv[done:], p.offset + pos + done)
        pos += mv.nbytes
    _check_size(p, pos, final=True)


def _check_size(p: Piece, n: int, final: bool = False) -> None:
    if n > p.nbytes or (final and n != p.nbytes):
        raise QuantError(f"tensor {p.tp.name}: rows {p.start}..{p.stop} gave {n} bytes, {p.nbytes} planned")

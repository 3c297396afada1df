"""Cutting a plan into the tasks of a distributed run: pieces of tensors, balanced by bytes.

A converted tensor is cut between its slabs (gguftool.pipeline.io.slabs: the same row ranges the single-process
pipeline quantizes at once, never across an expert), a copied tensor stays whole. Every piece knows where its
bytes go: the output file and the absolute offset the plan gives its first row. Pieces are grouped into tasks of
about ``target_bytes`` of source data each (small tensors together, a big tensor in several tasks), and the tasks
are listed largest first, so that whichever worker is free takes the next and the last ones to finish are small.
No Ray here: this is plain planning, tested on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..pipeline import io as pio
from ..pipeline import policy as P
from ..pipeline.plan import shape3

__all__ = ["Piece", "Task", "make_tasks", "target_task_bytes"]

# at least this many source bytes per task (a task has a fixed cost of a few milliseconds in Ray) ...
MIN_TASK_BYTES = 32 << 20
# ... and at most this many, so that no worker holds the others up at the end and a retried task redoes little
MAX_TASK_BYTES = 512 << 20


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one tensor, written at ``offset`` (absolute) of output file ``file``."""
    tp: P.TensorPlan
    file: int
    start: int
    stop: int
    offset: int
    nbytes: int         # output bytes
    src_bytes: int      # source bytes (what progress counts)


@dataclass
class Task:
    pieces: list[Piece] = field(default_factory=list)

    @property
    def src_bytes(self) -> int:
        return sum(p.src_bytes for p in self.pieces)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def target_task_bytes(total_src_bytes: int, workers: int) -> int:
    """Source bytes per task: about eight tasks per worker, within [MIN_TASK_BYTES, MAX_TASK_BYTES]."""
    return max(MIN_TASK_BYTES, min(MAX_TASK_BYTES, total_src_bytes // max(1, 8 * workers)))


def _pieces(tp: P.TensorPlan, file: int, offset: int, target: int) -> list[Piece]:
    """One tensor's pieces of at most ``target`` source bytes (at least one slab each)."""
    ne0 = shape3(tp.shape)[0]
    n_rows = tp.n_elements // ne0 if ne0 else 0
    if not tp.converts or n_rows == 0:
        return [Piece(tp, file, 0, n_rows, offset, tp.new_nbytes, tp.src_nbytes)]
    src_row = tp.src_nbytes // n_rows
    new_row = tp.new_nbytes // n_rows
    out: list[Piece] = []
    start = last = 0
    for a, b, _ in pio.slabs(tp):
        if (b - start) * src_row > target and last > start:
            out.append(Piece(tp, file, start, last, offset + start * new_row, (last - start) * new_row,
                             (last - start) * src_row))
            start = a
        last = b
    out.append(Piece(tp, file, start, n_rows, offset + start * new_row, (n_rows - start) * new_row,
                     (n_rows - start) * src_row))
    return out


def make_tasks(tensors: Sequence[tuple[P.TensorPlan, int, int]], target_bytes: int) -> list[Task]:
    """The tasks for ``tensors`` ((tensor, output file, absolute offset of its data) in output order), largest
    first."""
    tasks: list[Task] = []
    small = Task()
    for tp, file, offset in tensors:
        for piece in _pieces(tp, file, offset, target_bytes):
            if piece.src_bytes >= target_bytes // 2:
                tasks.append(Task([piece]))
                continue
            if small.pieces and small.src_bytes + piece.src_bytes > target_bytes:
                tasks.append(small)
                small = Task()
            small.pieces.append(piece)
    if small.pieces:
        tasks.append(small)
    tasks.sort(key=lambda t: -t.src_bytes)
    return tasks

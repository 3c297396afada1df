"""``gguftool imatrix --ray``: the calibration chunks evaluated by Ray actors, merged on the driver in chunk order.

The driver tokenizes the text and cuts it into the batches the single-process run evaluates
(:class:`gguftool.importance.collect.RunPlan`: ``-b / -c`` chunks each). Each worker is an actor that opens the
model once (memory-mapped, from storage every worker sees: the same path) and evaluates batch after batch with
:func:`gguftool.importance.collect.evaluate_batch`, returning that batch's sums, counts and per-chunk NLL sums
(:class:`~gguftool.importance.collect.BatchStatistics`). The driver keeps every worker busy (``IN_FLIGHT`` batches
queued per worker) and adds the results in chunk order with :class:`~gguftool.importance.collect.RunTotals`, the
object the local loop uses: snapshots, progress and the perplexity come out as in a single-process run, and as long
as the workers' forward pass computes what the local one does (same kernels, same batch composition) the sums,
counts and perplexity are bit for bit those of the local run.

What crosses the network: per batch the tokens (``n_seq * n_ctx`` int64 plus the scored targets) to the worker, and
back the float64 sums (one row of ``ne0`` per weight, ``n_expert`` rows for MoE experts) and int64 counts: a few
MB for a small model, independent of ``n_ctx``. Memory on the driver: the merged imatrix plus at most
``IN_FLIGHT * workers`` batch results waiting for an earlier one. Memory per worker: the single-process pipeline's
(the model memory-mapped, widened a slab at a time, one batch's activations).

Failures: an actor whose process dies is restarted (``MAX_RESTARTS``), reopens the model, and the batches it had
in hand are evaluated again (``MAX_TASK_RETRIES``); since a batch's statistics depend only on its tokens, the result
is unchanged. A GGUFError raised in a worker is raised on the driver as itself; a worker that keeps dying is a
ClusterError. Nothing is written here: gguftool.importance.run writes the output only after the run.

The layer-split mode (a worker holding only layers [a, b) and passing the hidden states on, for models that do not
fit one worker) is not implemented: every worker holds the whole model, memory-mapped.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import ClusterError, GGUFError
from ..importance.collect import (BatchStatistics, ImatrixCollector, ImatrixRun, ProgressFn, RunPlan, RunTotals,
                                  evaluate_batch, load_model)
from .cluster import LOCAL, connect, require_ray

__all__ = ["ImatrixWorker", "CrashOnce", "WorkerReport", "ClusterImatrixRun", "compute_imatrix_on_cluster",
           "MAX_RESTARTS", "MAX_TASK_RETRIES", "IN_FLIGHT"]

MAX_RESTARTS = 3        # a worker process that dies is started again this many times
MAX_TASK_RETRIES = 3    # and the batches it held are evaluated again
IN_FLIGHT = 2           # batches queued per worker: one evaluating, one waiting (hides the round trip)


@dataclass(frozen=True)
class CrashOnce:
    """Fault injection for tests: the worker that receives batch ``batch`` ends its process (os._exit) the first
    time, marking ``marker`` (a path on storage every worker sees) so that the retried batch runs."""
    batch: int
    marker: str


@dataclass
class WorkerReport:
    """One worker's account of the run (its last incarnation if it was restarted)."""
    pid: int
    node: str
    batches: int = 0
    tokens: int = 0
    busy_seconds: float = 0.0       # time spent evaluating
    load_seconds: float = 0.0       # opening the model
    peak_rss: int = 0               # bytes (ru_maxrss)
    bytes_returned: int = 0         # statistics sent back

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.busy_seconds if self.busy_seconds > 0 else float("nan")


class ImatrixWorker:
    """The actor: the model opened once, batches evaluated on request (the class Ray wraps with ray.remote)."""

    def __init__(self, model_path: str, n_threads: int, n_ctx: int, process_output: bool,
                 crash: CrashOnce | None = None):
        from ..model.forward import Model
        t0 = time.perf_counter()
        self.source = load_model(model_path)
        self.model = Model.from_source(self.source, n_threads=n_threads, origin=model_path)
        self.n_ctx, self.process_output, self.crash = n_ctx, process_output, crash
        self.report = WorkerReport(os.getpid(), os.uname().nodename, load_seconds=time.perf_counter() - t0)

    def evaluate(self, index: int, first_chunk: int, batch: np.ndarray,
                 targets: np.ndarray | None) -> BatchStatistics:
        """Batch number ``index`` (its first chunk ``first_chunk``)."""
        if self.crash is not None and index == self.crash.batch and not os.path.exists(self.crash.marker):
            with open(self.crash.marker, "w") as f:
                f.write(f"{os.getpid()}\n")
            os._exit(1)          # the process dies as a killed worker does: no exception, no reply
        t0 = time.perf_counter()
        stats = evaluate_batch(self.model, first_chunk, batch, targets, self.n_ctx, self.process_output)
        r = self.report
        r.busy_seconds += time.perf_counter() - t0
        r.batches += 1
        r.tokens += int(batch.size)
        r.bytes_returned += stats.nbytes
        return stats

    def finish(self) -> WorkerReport:
        self.report.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self.report


@dataclass
class ClusterImatrixRun:
    run: ImatrixRun
    workers: list[WorkerReport] = field(default_factory=list)
    n_workers: int = 0
    bytes_sent: int = 0             # tokens and targets sent to the workers
    bytes_returned: int = 0         # statistics returned
    merge_seconds: float = 0.0      # the driver adding batches (RunTotals.add, callbacks included)
    wall_seconds: float = 0.0       # from connecting to the last merge (actor start and model loading included)


def _worker_count(ray, workers: int | None, threads: int) -> int:
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if workers is None:
        return max(1, cpus // threads)
    if workers * threads > cpus:
        raise ClusterError(f"{workers} workers of {threads} thread(s) need {workers * threads} CPUs; the cluster "
                           f"has {cpus}")
    return workers


def compute_imatrix_on_cluster(model_path: str, tokenizer, text: str, *, address: str = LOCAL,
                               workers: int | None = None, threads: int = 1, n_ctx: int = 512, n_chunks: int = -1,
                               process_output: bool = False, compute_ppl: bool = True,
                               in_files: Sequence[str] = (), dataset: str = "", batch_tokens: int = 2048,
                               progress: ProgressFn | None = None,
                               on_chunk: Callable[[int, ImatrixCollector], None] | None = None,
                               crash: CrashOnce | None = None) -> ClusterImatrixRun:
    """:func:`gguftool.importance.collect.compute_imatrix` with the batches evaluated by ``workers`` Ray actors of
    ``threads`` threads each (None: as many as the cluster's CPUs allow) on the cluster at ``address`` (LOCAL:
    started here with ``workers * threads`` CPUs and shut down at the end). ``model_path`` must name the same model
    on every node (shared storage). Same arguments and result otherwise, plus the workers' reports."""
    if not isinstance(threads, int) or threads < 1:
        raise ClusterError(f"threads per worker must be >= 1 (got {threads})")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ClusterError(f"the worker count (--ray-workers) must be >= 1 (got {workers})")
    t_start = time.time()
    plan = RunPlan.make(tokenizer, text, n_ctx, n_chunks, batch_tokens, compute_ppl)
    totals = RunTotals(plan, process_output, in_files, progress, on_chunk)
    ray = require_ray()
    started_here = not ray.is_initialized()    # then shut down at the end
    num_cpus = None
    if address == LOCAL and workers is not None:
        num_cpus = max(os.cpu_count() or 1, workers * threads)
    connect(address, num_cpus=num_cpus)
    actors: list = []
    try:
        n_workers = min(_worker_count(ray, workers, threads), plan.n_batches)
        actor_cls = ray.remote(num_cpus=threads, max_restarts=MAX_RESTARTS,
                               max_task_retries=MAX_TASK_RETRIES)(ImatrixWorker)
        path = os.path.abspath(model_path)
        actors = [actor_cls.remote(path, threads, n_ctx, process_output, crash) for _ in range(n_workers)]
        traffic = _drive(ray, actors, plan, totals)
        reports = _gather(ray, [a.finish.remote() for a in actors])
        return ClusterImatrixRun(totals.finish(dataset, t_start), reports, n_workers, *traffic,
                                 wall_seconds=time.time() - t_start)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        if started_here:
            ray.shutdown()


def _drive(ray, actors: list, plan: RunPlan, totals: RunTotals) -> tuple[int, int, float]:
    """Feed the batches to the actors (up to IN_FLIGHT each, more to whichever frees first) and add the results
    to ``totals`` in chunk order as soon as the next one in order is in. Batches handed out but not merged stay
    within IN_FLIGHT per worker, which bounds the driver's memory. Returns (bytes sent, bytes returned, seconds
    spent merging)."""
    todo = list(enumerate(plan.batches()))
    todo.reverse()                          # pop() takes the earliest batch
    owner: dict = {}                        # ObjectRef -> (batch number, actor index)
    ready: dict[int, BatchStatistics] = {}  # batches in but not yet merged
    queued = [0] * len(actors)              # batches each actor holds
    limit = IN_FLIGHT * len(actors)
    next_merge, sent, returned, merging = 0, 0, 0, 0.0

    def fill() -> None:
        """Hand out batches round-robin to the least-loaded workers (an idle worker first)."""
        nonlocal sent
        while todo and len(owner) + len(ready) < limit:
            k = min(range(len(actors)), key=queued.__getitem__)
            if queued[k] >= IN_FLIGHT:
                return
            index, (first_chunk, batch) = todo.pop()
            targets = plan.targets(first_chunk, batch.shape[0])
            sent += batch.nbytes + (targets.nbytes if targets is not None else 0)
            owner[actors[k].evaluate.remote(index, first_chunk, batch, targets)] = (index, k)
            queued[k] += 1

    fill()
    while owner:
        done, _ = ray.wait(list(owner), num_returns=1)
        for ref in done:
            index, k = owner.pop(ref)
            queued[k] -= 1
            stats = _gather(ray, ref)
            returned += stats.nbytes
            ready[index] = stats
        t0 = time.perf_counter()
        while next_merge in ready:
            totals.add(ready.pop(next_merge))
            next_merge += 1
        merging += time.perf_counter() - t0
        fill()
    return sent, returned, merging


def _gather(ray, refs):
    """ray.get, with a worker's GGUFError raised as itself and Ray's failures as one-line ClusterErrors."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(e.cause, BaseException) else None
        if isinstance(cause, GGUFError):
            raise cause from None
        what = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).splitlines()[0]
        raise ClusterError(f"a worker failed: {what.splitlines()[0]}") from None
    except ray.exceptions.RayError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(f"a worker was lost after {MAX_RESTARTS} restarts ({type(e).__name__}: {first})") \
            from None

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
``IN_FLIGHT * workers`` (times ``stages``) batch results waiting for an earlier one. Memory per worker: the single-process pipeline's
(the model memory-mapped, widened a slab at a time, one batch's activations).

Every node needs gguftool (the same version) installed and the model at the same path; a local cluster's workers
inherit this process's environment.

Failures: an actor whose process dies is restarted (``MAX_RESTARTS``), reopens the model, and the batches it had
in hand are evaluated again (``MAX_TASK_RETRIES``); since a batch's statistics depend only on its tokens, the result
is unchanged. A GGUFError raised in a worker is raised on the driver as itself; a worker that keeps dying is a
ClusterError. Nothing is written here: gguftool.importance.run writes the output only after the run.

Layer split (``stages`` > 1, for a model that does not fit one worker): each worker becomes a pipeline of
``stages`` actors, actor k holding layers [a_k, a_{k+1}) (the first also the token embedding, the last the output
head): the first embeds the batch and runs its layers, each passes the residual stream (``n_seq * n_ctx *
n_embd`` float32) on through the object store straight to the next (not through the driver), and the last takes
the logits and the NLL sums. Each stage returns the statistics of its own weights; the driver combines a batch's
stages (:meth:`BatchStatistics.combine`) and merges as above, so the result is again the single-process one. With
several batches in flight, the stages work on different batches at once. A stage maps the whole file but touches
only its layers' pages (plus the embedding rows of the batch's tokens, or the output matrix).
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
                                  evaluate_batch, evaluate_stage, load_model)
from .cluster import LOCAL, connect, require_ray

__all__ = ["ImatrixWorker", "CrashOnce", "WorkerReport", "ClusterImatrixRun", "compute_imatrix_on_cluster",
           "split_layers",
           "MAX_RESTARTS", "MAX_TASK_RETRIES", "IN_FLIGHT"]

MAX_RESTARTS = 3        # a worker process that dies is started again this many times
MAX_TASK_RETRIES = 3    # and the batches it held are evaluated again
IN_FLIGHT = 2           # batches queued per worker (per stage): one evaluating, one waiting (hides the round trip)


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
    """The actor: the model opened once, batches evaluated on request (the class Ray wraps with ray.remote).
    ``layers`` (a, b): a pipeline stage holding layers [a, b) only (None: the whole model)."""

    def __init__(self, model_path: str, n_threads: int, n_ctx: int, process_output: bool,
                 crash: CrashOnce | None = None, layers: tuple[int, int] | None = None, exact: bool = False):
        from ..model.forward import Model
        t0 = time.perf_counter()
        self.source = load_model(model_path)
        self.model = Model.from_source(self.source, n_threads=n_threads, origin=model_path, exact=exact)
        self.n_ctx, self.process_output, self.crash = n_ctx, process_output, crash
        n_layer = self.model.cfg.n_layer
        a, b = layers if layers is not None else (0, n_layer)
        self.layers, self.first, self.last = range(a, b), a == 0, b == n_layer
        self.report = WorkerReport(os.getpid(), os.uname().nodename, load_seconds=time.perf_counter() - t0)

    def _maybe_crash(self, index: int) -> None:
        if self.crash is not None and index == self.crash.batch and not os.path.exists(self.crash.marker):
            with open(self.crash.marker, "w") as f:
                f.write(f"{os.getpid()}\n")
            os._exit(1)          # the process dies as a killed worker does: no exception, no reply

    def _account(self, t0: float, tokens: int, stats: BatchStatistics) -> None:
        r = self.report
        r.busy_seconds += time.perf_counter() - t0
        r.batches += 1
        r.tokens += tokens
        r.bytes_returned += stats.nbytes

    def evaluate(self, index: int, first_chunk: int, batch: np.ndarray,
                 targets: np.ndarray | None) -> BatchStatistics:
        """Batch number ``index`` (its first chunk ``first_chunk``) through the whole model."""
        self._maybe_crash(index)
        t0 = time.perf_counter()
        stats = evaluate_batch(self.model, first_chunk, batch, targets, self.n_ctx, self.process_output)
        self._account(t0, int(batch.size), stats)
        return stats

    def stage(self, index: int, first_chunk: int, inp: np.ndarray,
              targets: np.ndarray | None) -> tuple[np.ndarray | None, BatchStatistics]:
        """Batch number ``index`` through this stage's layers (:func:`evaluate_stage`): the residual stream for
        the next stage (None from the last) and this stage's statistics (called with num_returns=2)."""
        self._maybe_crash(index)
        t0 = time.perf_counter()
        if not self.first and not inp.flags.writeable:    # read-only from the object store; the stage adds to it
            inp = inp.copy()
        x, stats = evaluate_stage(self.model, first_chunk, inp, self.n_ctx, self.layers, self.first, self.last,
                                  targets, self.process_output)
        self._account(t0, int(inp.shape[0] * (self.n_ctx if self.first else 1)), stats)
        return x, stats

    def finish(self) -> WorkerReport:
        self.report.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self.report


@dataclass
class ClusterImatrixRun:
    run: ImatrixRun
    workers: list[WorkerReport] = field(default_factory=list)    # one per actor (stages included)
    n_workers: int = 0              # workers (pipelines when stages > 1)
    stages: int = 1                 # actors per worker, each holding a share of the layers
    bytes_sent: int = 0             # tokens and targets sent by the driver to the workers
    bytes_returned: int = 0         # statistics returned to the driver
    bytes_between_stages: int = 0   # residual streams passed from stage to stage (object store)
    merge_seconds: float = 0.0      # the driver adding batches (RunTotals.add, callbacks included)
    wall_seconds: float = 0.0       # from connecting to the last merge (actor start and model loading included)


def split_layers(n_layer: int, stages: int) -> list[tuple[int, int]]:
    """[a, b) layer ranges of ``stages`` pipeline stages, as even as the layer count allows."""
    if stages > n_layer:
        raise ClusterError(f"{stages} stages for a model of {n_layer} layers (--ray-stages must be <= the layers)")
    bounds = [n_layer * k // stages for k in range(stages + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _worker_count(ray, workers: int | None, threads: int, stages: int) -> int:
    cpus = int(ray.cluster_resources().get("CPU", 0))
    per_worker = threads * stages
    if workers is None:
        workers = max(1, cpus // per_worker)
    if workers * per_worker > cpus:
        what = f"{workers} workers of {threads} thread(s)" + (f" x {stages} stages" if stages > 1 else "")
        raise ClusterError(f"{what} need {workers * per_worker} CPUs; the cluster has {cpus}")
    return workers


def compute_imatrix_on_cluster(model_path: str, tokenizer, text: str, *, address: str = LOCAL,
                               workers: int | None = None, threads: int = 1, stages: int = 1, n_ctx: int = 512,
                               n_chunks: int = -1, process_output: bool = False, compute_ppl: bool = True,
                               in_files: Sequence[str] = (), dataset: str = "", batch_tokens: int = 2048,
                               progress: ProgressFn | None = None,
                               on_chunk: Callable[[int, ImatrixCollector], None] | None = None,
                               crash: CrashOnce | None = None, exact: bool = False) -> ClusterImatrixRun:
    """:func:`gguftool.importance.collect.compute_imatrix` with the batches evaluated by ``workers`` Ray workers
    (None: as many as the cluster's CPUs allow), each ``stages`` actors holding a share of the layers (1: the whole
    model) of ``threads`` threads each, on the cluster at ``address`` (LOCAL: started here with the CPUs they need
    and shut down at the end). ``model_path`` must name the same model on every node (shared storage). Same
    arguments and result otherwise, plus the workers' reports."""
    if not isinstance(threads, int) or threads < 1:
        raise ClusterError(f"threads per worker must be >= 1 (got {threads})")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ClusterError(f"the worker count (--ray-workers) must be >= 1 (got {workers})")
    if not isinstance(stages, int) or stages < 1:
        raise ClusterError(f"the stage count (--ray-stages) must be >= 1 (got {stages})")
    t_start = time.time()
    plan = RunPlan.make(tokenizer, text, n_ctx, n_chunks, batch_tokens, compute_ppl)
    totals = RunTotals(plan, process_output, in_files, progress, on_chunk)
    ray = require_ray()
    started_here = not ray.is_initialized()    # then shut down at the end
    num_cpus = None
    if address == LOCAL and workers is not None:
        num_cpus = max(os.cpu_count() or 1, workers * threads * stages)
    connect(address, num_cpus=num_cpus)
    actors: list = []
    try:
        n_workers = min(_worker_count(ray, workers, threads, stages), plan.n_batches)
        layer_ranges: list = [None]
        n_embd = 0
        if stages > 1:
            from ..model.config import ModelConfig
            src = load_model(model_path)
            try:
                cfg = ModelConfig.from_metadata(src, origin=model_path)
            finally:
                src.close()
            layer_ranges, n_embd = list(split_layers(cfg.n_layer, stages)), cfg.n_embd
        actor_cls = ray.remote(num_cpus=threads, max_restarts=MAX_RESTARTS,
                               max_task_retries=MAX_TASK_RETRIES)(ImatrixWorker)
        path = os.path.abspath(model_path)
        pipelines = [[actor_cls.remote(path, threads, n_ctx, process_output, crash, layers, exact)
                      for layers in layer_ranges] for _ in range(n_workers)]
        actors = [a for p in pipelines for a in p]
        traffic = _drive(ray, pipelines, plan, totals, n_embd)
        reports = _gather(ray, [a.finish.remote() for a in actors])
        return ClusterImatrixRun(totals.finish(dataset, t_start), reports, n_workers, stages, *traffic,
                                 wall_seconds=time.time() - t_start)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        if started_here:
            ray.shutdown()


def _drive(ray, pipelines: list[list], plan: RunPlan, totals: RunTotals,
           n_embd: int) -> tuple[int, int, int, float]:
    """Feed the batches to the workers (up to IN_FLIGHT per stage each, more to whichever frees first) and add the
    results to ``totals`` in chunk order as soon as the next one in order is in. Batches handed out but not merged
    stay within that bound, which bounds the driver's memory. Returns (bytes sent, bytes returned, bytes passed
    between stages, seconds spent merging)."""
    todo = list(enumerate(plan.batches()))
    todo.reverse()                          # pop() takes the earliest batch
    owner: dict = {}                        # the batch's last stats ref -> (batch number, worker, all stats refs)
    ready: dict[int, BatchStatistics] = {}  # batches in but not yet merged
    n_stages = len(pipelines[0])
    per_worker = IN_FLIGHT * n_stages
    queued = [0] * len(pipelines)           # batches each worker holds
    limit = per_worker * len(pipelines)
    next_merge, sent, returned, merging = 0, 0, 0, 0.0
    between = 0

    def fill() -> None:
        """Hand out batches to the least-loaded workers (an idle worker first)."""
        nonlocal sent, between
        while todo and len(owner) + len(ready) < limit:
            k = min(range(len(pipelines)), key=queued.__getitem__)
            if queued[k] >= per_worker:
                return
            index, (first_chunk, batch) = todo.pop()
            targets = plan.targets(first_chunk, batch.shape[0])
            sent += batch.nbytes + (targets.nbytes if targets is not None else 0)
            if n_stages == 1:
                refs = [pipelines[k][0].evaluate.remote(index, first_chunk, batch, targets)]
            else:
                refs, inp = [], batch
                for j, actor in enumerate(pipelines[k]):
                    last = j == n_stages - 1
                    inp, stats_ref = actor.stage.options(num_returns=2).remote(
                        index, first_chunk, inp, targets if last else None)
                    refs.append(stats_ref)
                between += (n_stages - 1) * batch.size * n_embd * 4
            owner[refs[-1]] = (index, k, refs)
            queued[k] += 1

    fill()
    while owner:
        done, _ = ray.wait(list(owner), num_returns=1)
        for ref in done:
            index, k, refs = owner.pop(ref)
            queued[k] -= 1
            parts = _gather(ray, refs)
            stats = parts[0] if len(parts) == 1 else BatchStatistics.combine(parts)
            returned += stats.nbytes
            ready[index] = stats
        t0 = time.perf_counter()
        while next_merge in ready:
            totals.add(ready.pop(next_merge))
            next_merge += 1
        merging += time.perf_counter() - t0
        fill()
    return sent, returned, between, merging


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

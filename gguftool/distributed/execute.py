"""Running a plan on a Ray cluster: the driver's side of a distributed convert/quantize.

The plan (types, metadata, every tensor's offset) is the one the single-process pipeline writes; here the driver

1. opens each output file as GGUFWriter does (checked first, a temporary beside the target), writes its header
   and sizes it for all the tensor data (``GGUFWriter.reserve_data``);
2. cuts the tensors into tasks balanced by bytes (:mod:`.pieces`) and submits them, largest first, keeping a few
   per worker in flight (so the object store never holds more than that);
3. each task (:mod:`.worker`) computes its pieces with the pipeline's own kernels and, with a shared filesystem,
   writes them into the part file at their offsets; without one (``shared_fs=False``) returns them through the
   object store and the driver writes them;
4. only when every task is in, the files are put in place together (gguftool.outfile.commit_all).

A task whose worker dies is retried by Ray (``max_retries``; a piece written twice gets the same bytes). An
error raised by the work itself (bad input) is not retried: it is raised here as the GGUFError it was. On any
error or interrupt the outstanding tasks are cancelled and the part files removed: nothing is left, and the
targets are as they were. (A SIGKILL of the driver itself leaves a shared-filesystem part file,
``.NAME.XXXXXXXXXXXX.tmp``, beside the target: other machines must be able to open it by name.)
"""
from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from ..errors import ClusterError, GGUFError
from ..gguf.writer import GGUFWriter, commit_writers
from ..outfile import check_outputs
from ..pipeline.execute import ErrorSums, Progress, Summary, TensorResult, ggml_shape
from ..pipeline.plan import Plan, output_files
from ..pipeline.source import TensorSource
from . import cluster
from .pieces import Task, make_tasks, target_task_bytes
from .worker import TaskSpec, run_task

__all__ = ["ClusterOptions", "execute_on_cluster"]


@dataclass(frozen=True)
class ClusterOptions:
    """How to run on Ray. ``address``: cluster.LOCAL (start a local cluster), "auto", or an address.
    ``shared_fs``: every worker sees the output's folder (tasks write the part file themselves); False: the bytes
    come back through the object store. ``workers``: CPU slots of a local cluster (None: all cores).
    ``threads``: kernel threads per task (the CPUs each task reserves). ``max_retries``: retries of a task whose
    worker died. ``task_bytes``: source bytes per task (None: about eight tasks per worker, 32-512 MiB each)."""
    address: str = cluster.LOCAL
    shared_fs: bool = True
    workers: int | None = None
    threads: int = 1
    max_retries: int = 3
    task_bytes: int | None = None


def execute_on_cluster(source: TensorSource, plan: Plan, out_path: "str | os.PathLike[str]", options: ClusterOptions,
                       *, stats: bool = False, overwrite: bool = False, protect: Sequence[str] = (),
                       progress: Progress | None = None) -> Summary:
    """Write the planned file(s) as gguftool.pipeline.execute.execute does (byte-identical), with the tensor data
    computed by Ray tasks. progress(n, tensor) is called with the source bytes of each finished piece; ``stats``:
    each converted tensor's RMS error, from the error sums of its pieces."""
    t0 = time.perf_counter()
    out_path = os.fspath(out_path)
    recipe = source.recipe()
    if recipe is None:
        raise ClusterError("this source exists only in this process (not in files): it cannot be read by Ray "
                           "workers")
    files = output_files(plan, out_path)
    check_outputs([f[0] for f in files], protect, overwrite=overwrite)
    ray = cluster.require_ray()
    started_here = not ray.is_initialized()
    ray = _connect_keeping_sigterm(options)
    writers: list[GGUFWriter] = []
    try:
        placed = []
        for i, (path, kvs, tensors) in enumerate(files):
            w = GGUFWriter(path, overwrite=overwrite, protect=list(protect), named=options.shared_fs)
            writers.append(w)
            w.add_kvs(kvs)
            for tp in tensors:
                w.add_tensor_info(tp.name, ggml_shape(tp.shape), tp.new_type)
            w.reserve_data()
            placed += [(tp, i, w.data_offset + info.offset) for tp, info in zip(tensors, w.tensor_infos)]
        slots = max(1, int(ray.cluster_resources().get("CPU", 1)) // options.threads)
        size = options.task_bytes or target_task_bytes(plan.src_bytes, slots)
        tasks = make_tasks(placed, size)
        parts = [w.part_path or "" for w in writers] if options.shared_fs else None
        seconds, errors = _run(ray, tasks, plan, recipe, parts, writers, options, slots, stats, progress)
        for w in writers:
            w.finish(rename=False)
        commit_writers(writers)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        if started_here:
            ray.shutdown()
    results = [TensorResult(tp.name, tp.shape, tp.src_type, tp.new_type, tp.src_nbytes, tp.new_nbytes,
                            seconds.get(tp.name, 0.0)) for tp in plan.tensors]
    for r in results:
        if r.name in errors:
            r.rmse, r.weighted_rmse = _tensor_errors(errors[r.name]).result()
    paths = [f[0] for f in files]
    return Summary(paths[0], results, plan.src_bytes, plan.out_bytes, plan.n_elements,
                   sum(os.path.getsize(p) for p in paths), time.perf_counter() - t0, plan.n_fallback, paths)


def _connect_keeping_sigterm(options: ClusterOptions):
    """cluster.connect; ray.init replaces the SIGTERM handler (with sys.exit), and the caller's (the command
    line's: SIGTERM unwinds as Ctrl-C does, with its cleanup and one-line message) is put back."""
    main = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGTERM) if main else None
    try:
        return cluster.connect(options.address, num_cpus=options.workers)
    finally:
        if main and saved is not None:
            signal.signal(signal.SIGTERM, saved)


def _tensor_errors(pieces: dict[int, ErrorSums]) -> ErrorSums:
    """One tensor's error sums: its pieces' (by first row) added in row order, as the single process adds slabs."""
    total = ErrorSums()
    for start in sorted(pieces):
        total.merge(pieces[start])
    return total


def _run(ray, tasks: list[Task], plan: Plan, recipe, parts: list[str] | None, writers: list[GGUFWriter],
         options: ClusterOptions, slots: int, stats: bool,
         progress: Progress | None) -> tuple[dict[str, float], dict[str, dict[int, ErrorSums]]]:
    """Submit the tasks (a window of two per slot in flight) and collect them; the worker seconds per tensor and,
    with ``stats``, the error sums of each tensor's pieces by first row."""
    remote = ray.remote(run_task).options(num_cpus=options.threads, max_retries=options.max_retries,
                                          retry_exceptions=False)
    run_id = secrets.token_hex(8)
    imatrix = ray.put(plan.imatrix)
    todo = list(reversed(tasks))        # pop() takes the largest first
    running: dict = {}                  # ObjectRef -> Task
    seconds: dict[str, float] = {}
    errors: dict[str, dict[int, ErrorSums]] = {}
    window = 2 * slots
    try:
        while todo or running:
            while todo and len(running) < window:
                task = todo.pop()
                spec = TaskSpec(recipe, run_id, parts, task.pieces, options.threads, stats)
                running[remote.remote(spec, imatrix)] = task
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                task = running.pop(ref)
                result = _get(ray, ref, options.max_retries)
                for i, p in enumerate(task.pieces):
                    if result.data is not None:
                        writers[p.file].pwrite(p.offset, result.data[i])
                    seconds[p.tp.name] = seconds.get(p.tp.name, 0.0) + result.seconds[i]
                    piece_errors = result.errors[i]
                    if piece_errors is not None:
                        errors.setdefault(p.tp.name, {})[p.start] = piece_errors
                    if progress:
                        progress(p.src_bytes, p.tp)
                del result
    except BaseException:
        for ref in running:
            try:
                ray.cancel(ref, force=True)
            except Exception:   # (already finished, or the cluster is gone)
                pass
        raise
    return seconds, errors


def _get(ray, ref, max_retries: int):
    """ray.get, with the task's own error raised as it was (a GGUFError or OSError: the usual one-line message),
    and the cluster's (a worker that died every time, a lost node) as ClusterError."""
    from ray import exceptions as rex

    try:
        return ray.get(ref)
    except rex.RayTaskError as e:
        cause = e.cause
        if isinstance(cause, (GGUFError, OSError, MemoryError)):
            raise cause from None
        raise ClusterError(f"a task failed: {type(cause).__name__}: {cause}") from None
    except rex.RayError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(f"a task failed after {max_retries} retries ({type(e).__name__}: {first})") from None

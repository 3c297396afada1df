"""``gguftool imatrix`` as a library call: from a model file and calibration text to an imatrix file.

:func:`compute_imatrix_file` opens the model, checks it (architecture, metadata, tensors) and its tokenizer,
evaluates the text chunk by chunk (:func:`gguftool.importance.collect.compute_imatrix`), merges earlier imatrix
files, writes the result (and snapshots every ``save_frequency`` chunks) and returns an :class:`ImatrixResult`.
With no calibration text it only combines ``in_files``. It never prints: progress goes to the ``progress``
callback, and what the command line reports (perplexity, weights that did not fit the memory) is in the result.
Options are checked before any file is opened.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ..errors import ImatrixError
from ..model.config import ModelConfig
from ..model.forward import Model
from ..model.tokenizer import Tokenizer
from .collect import (ImatrixCollector, ProgressFn, check_run_options, compute_imatrix, load_model,
                      merge_imatrix_files, read_calibration_text, save_imatrix)
from ..outfile import check_outputs
from .files import Imatrix, existing_snapshots, snapshot_path

if TYPE_CHECKING:
    from ..distributed.imatrix import ClusterImatrixRun

__all__ = ["ImatrixResult", "compute_imatrix_file"]

OUTPUT_FORMATS = ("gguf", "dat")


@dataclass
class ImatrixResult:
    """What a run wrote and measured."""
    output_path: str
    imatrix: Imatrix
    n_ctx: int
    n_chunks: int = 0               # chunks evaluated (0: in_files only combined)
    n_tokens: int = 0               # tokens in the calibration text
    ppl: float = float("nan")       # final perplexity estimate and its error (nan: not computed)
    ppl_err: float = float("nan")
    seconds: float = 0.0
    n_in_files: int = 0             # imatrix files merged in
    cluster: "ClusterImatrixRun | None" = None   # with ray_address: the workers' reports and the traffic


def _check_options(n_ctx: int, n_chunks: int, threads: int | None, output_format: str, save_frequency: int,
                   batch: int, max_weight_memory: int | None, compute_ppl: bool) -> None:
    check_run_options(n_ctx, n_chunks, batch, compute_ppl)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ImatrixError(f"the thread count (--threads) must be >= 1 (got {threads})")
    if output_format not in OUTPUT_FORMATS:
        raise ImatrixError(f"unknown imatrix output format {output_format!r} (gguf or dat)")
    if not isinstance(save_frequency, int) or save_frequency < 0:
        raise ImatrixError(f"the snapshot interval (--save-frequency) must be >= 0 (got {save_frequency})")
    if max_weight_memory is not None and (not isinstance(max_weight_memory, int) or max_weight_memory < 0):
        raise ImatrixError(f"the weight memory (--max-weight-memory) must be >= 0 bytes (got {max_weight_memory})")


def compute_imatrix_file(model_path: str | os.PathLike[str] | None, calib_path: str | os.PathLike[str] | None,
                         output_path: str | os.PathLike[str], *, n_ctx: int = 512, n_chunks: int = -1,
                         threads: int | None = None, output_format: str = "gguf", process_output: bool = False,
                         in_files: Sequence[str | os.PathLike[str]] = (),
                         save_frequency: int = 0, batch: int = 2048, max_weight_memory: int | None = None,
                         compute_ppl: bool = True, overwrite: bool = False,
                         progress: ProgressFn | None = None, ray_address: str | None = None,
                         ray_workers: int | None = None, ray_stages: int = 1, exact: bool = False) -> ImatrixResult:
    """Compute the importance matrix of the model at ``model_path`` (GGUF file or Hugging Face checkpoint) over
    the text at ``calib_path`` and write it to ``output_path`` (replaced if it exists), as llama-imatrix does.

    ``n_ctx``: tokens per chunk; ``n_chunks``: chunks to evaluate (-1: all the text gives); ``batch``: tokens
    evaluated together (several chunks when larger than ``n_ctx``); ``threads``: worker threads (None: all CPUs);
    ``output_format``: "gguf" or llama.cpp's legacy "dat"; ``process_output``: also collect output.weight;
    ``in_files``: imatrix files (either format) merged into the result; ``save_frequency``: also write
    ``OUTPUT.at_N`` every N chunks (0: never); ``max_weight_memory``: obsolete, checked and ignored (the weights stay in
    their stored form and are widened to float32 a slab at a time, see gguftool.model.weights);
    ``compute_ppl``: compute the perplexity; ``exact``: F16 products in llama.cpp's tinyBLAS order too (BF16 ones
    always are), bit for bit with its x86 CPU graph (~10 % slower: see gguftool.model.tinyblas); ``overwrite``: replace an existing output (and snapshots; never a
    file the run reads); ``progress(done, total, running_ppl)`` after each chunk.

    ``ray_address``: evaluate the chunks on a Ray cluster (gguftool.distributed.imatrix; "local" starts one here,
    "auto" joins this machine's), ``ray_workers`` workers (None: as many as the cluster's CPUs allow) of ``threads``
    threads each (None: 1); the model path must be readable by every worker. ``ray_stages`` > 1: each worker is a
    pipeline of that many actors holding a share of the layers each (for a model one worker cannot hold). The
    result is the local run's.

    Without ``calib_path`` the ``in_files`` are only combined (``model_path`` is not read). Raises ImatrixError
    (or another GGUFError) for bad options or input, before any work where it can tell.
    """
    _check_options(n_ctx, n_chunks, threads, output_format, save_frequency, batch, max_weight_memory, compute_ppl)
    if ray_address is not None:
        from ..distributed.cluster import require_ray
        if ray_workers is not None and (not isinstance(ray_workers, int) or ray_workers < 1):
            raise ImatrixError(f"the worker count (--ray-workers) must be >= 1 (got {ray_workers})")
        if not isinstance(ray_stages, int) or ray_stages < 1:
            raise ImatrixError(f"the stage count (--ray-stages) must be >= 1 (got {ray_stages})")
        require_ray()        # without the extra: the one-line hint before any file is opened
    output = os.fspath(output_path)
    in_paths = [os.fspath(p) for p in in_files]
    if calib_path is None:
        if not in_paths:
            raise ImatrixError("no calibration text and no imatrix files to combine")
        check_outputs([output], in_paths, overwrite=overwrite)
        collector = ImatrixCollector(n_ctx, process_output)
        merge_imatrix_files(collector, in_paths)
        im = collector.result()
        save_imatrix(output, im, output_format, overwrite=overwrite)
        return ImatrixResult(output, im, n_ctx, n_in_files=len(in_paths))
    if model_path is None:
        raise ImatrixError("no model given")
    model_file, calib = os.fspath(model_path), os.fspath(calib_path)
    text = read_calibration_text(calib)
    if not text.strip():
        raise ImatrixError(f"{calib}: calibration text is empty")

    source = load_model(model_file)
    try:
        # the output and the snapshots it may write are checked now, not after hours of computation
        check_outputs([output] + existing_snapshots(output, save_frequency), source.input_files() + [calib, *in_paths],
                      overwrite=overwrite)
        ModelConfig.from_metadata(source, origin=model_file)          # architecture first: the cheapest check
        tokenizer = Tokenizer.from_metadata(source, origin=model_file)
        # on a cluster the driver opens the model only to check it (memory-mapped, nothing evaluated here)
        n_threads = 1 if ray_address is not None else threads or os.cpu_count() or 1
        model = Model.from_source(source, n_threads=n_threads, origin=model_file, exact=exact)

        def save_snapshot(done: int, collector: ImatrixCollector) -> None:
            if save_frequency > 0 and done % save_frequency == 0:
                save_imatrix(snapshot_path(output, done), collector.result(calib), output_format, dataset=calib,
                             overwrite=overwrite)

        cluster = None
        if ray_address is None:
            run = compute_imatrix(model, tokenizer, text, n_ctx=n_ctx, n_chunks=n_chunks,
                                  process_output=process_output, compute_ppl=compute_ppl, in_files=in_paths,
                                  dataset=calib, batch_tokens=batch, progress=progress, on_chunk=save_snapshot)
        else:
            from ..distributed.imatrix import compute_imatrix_on_cluster
            del model
            cluster = compute_imatrix_on_cluster(
                model_file, tokenizer, text, address=ray_address, workers=ray_workers, threads=threads or 1,
                stages=ray_stages, exact=exact,
                n_ctx=n_ctx, n_chunks=n_chunks, process_output=process_output, compute_ppl=compute_ppl,
                in_files=in_paths, dataset=calib, batch_tokens=batch, progress=progress, on_chunk=save_snapshot)
            run = cluster.run
        if not run.imatrix.entries:
            raise ImatrixError("no matrix multiplications were collected")
        save_imatrix(output, run.imatrix, output_format, dataset=calib, overwrite=overwrite)
    finally:
        source.close()
    result = ImatrixResult(output, run.imatrix, n_ctx, n_chunks=run.n_chunks, n_tokens=run.n_tokens, ppl=run.ppl,
                           ppl_err=run.ppl_err, seconds=run.seconds, n_in_files=len(in_paths), cluster=cluster)
    return result

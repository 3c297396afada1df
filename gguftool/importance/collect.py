"""Importance matrix from calibration text: the statistics llama-imatrix collects, computed with our forward pass.

Mirrors tools/imatrix/imatrix.cpp:
- the text is tokenized once (``add_special=True``, special tokens not parsed) and cut into ``n_ctx``-token chunks;
  at least ``2 * n_ctx`` tokens are required; ``n_chunks`` limits how many chunks are evaluated;
- the first token of every chunk is replaced by BOS when the vocabulary adds BOS;
- each chunk is evaluated causally from position 0; for every matrix multiplication by a weight named ``blk.*``
  (and ``output.weight`` when ``process_output``: a tied output is ``token_embd.weight`` and is never collected)
  the squares of the input are summed per column and the number of input rows is counted; a MoE expert matrix
  (MUL_MAT_ID) gets one row of sums and one count per expert, over the tokens routed to that expert;
- perplexity is computed over the second half of each chunk (positions ``n_ctx/2 .. n_ctx-2`` predicting the
  next token), log-softmax as llama-imatrix (float ``expf``, double sum);
- ``--in-file`` imatrices are merged first (GGUF: raw sums and counts added; legacy .dat: values * chunk_size and
  ncall * chunk_size, as ``IMatrixCollector::load_imatrix``), and the chunk count is ``max(counts) // chunk_size``.

The result is an :class:`gguftool.importance.files.Imatrix`, written with ``write_imatrix_gguf`` /
``write_imatrix_legacy`` from :mod:`gguftool.importance.files` (which also reads both formats).
:mod:`gguftool.importance.run` puts the pieces together (files in, file out) for the command line and the API.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from ..errors import ImatrixError
from ..model.forward import ExpertHook
from ..model.chunks import (NLLTotals, chunk_batches, chunk_count, chunk_nll, open_model, read_text, scored_range,
                            tokenize_text)
from .files import Imatrix, ImatrixEntry, read_imatrix, write_imatrix_gguf, write_imatrix_legacy

if TYPE_CHECKING:
    from ..gguf.source import GGUFSource
    from ..hf.source import HFSource

__all__ = ["ImatrixCollector", "ImatrixRun", "BatchStatistics", "RunPlan", "RunTotals", "evaluate_batch", "evaluate_stage", "check_run_options", "compute_imatrix", "read_calibration_text",
           "load_model", "merge_imatrix_files", "save_imatrix", "chunk_nll"]


# --- the collector


class ImatrixCollector(ExpertHook):
    """Accumulates per-weight column sums of squared inputs (float64) and row counts; the forward pass hook."""

    def __init__(self, chunk_size: int, process_output: bool = False, output_name: str = "output.weight"):
        self.chunk_size = int(chunk_size)
        self.process_output = process_output
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.datasets: list[str] = []
        self.output_name = output_name
        self.expert_names: set[str] = set()    # weights collected per expert (hook.experts)

    def wants(self, name: str) -> bool:
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def _column_squares(self, names: Sequence[str], x: np.ndarray) -> tuple[list[str], np.ndarray | None]:
        """The wanted names and the per-column sum of squares of x's rows (float64; None: nothing to collect)."""
        names = [n for n in names if self.wants(n)]
        x = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        if not names or x.shape[0] == 0:
            return names, None
        s = np.einsum("ij,ij->j", x, x).astype(np.float64)
        if not np.all(np.isfinite(s)):
            raise ImatrixError(f"non-finite activations in the input of {names[0]}")
        return names, s

    def __call__(self, names: Sequence[str], x: np.ndarray) -> None:
        names, s = self._column_squares(names, x)
        if s is None:
            return
        n_rows = x.shape[0] if x.ndim == 2 else int(np.prod(x.shape[:-1]))
        for n in names:
            self._add_dense(n, s, n_rows)

    def _add_dense(self, n: str, s: np.ndarray, n_rows: int) -> None:
        """Add one matmul's column sums ``s`` (float64, ne0) over ``n_rows`` input rows to weight ``n``."""
        acc = self.sums.get(n)
        if acc is None:
            self.sums[n] = s.reshape(1, -1).copy()
            self.counts[n] = np.zeros(1, dtype=np.int64)
        else:
            if acc.shape[1] != s.shape[0]:
                raise ImatrixError(f"inconsistent size for {n} ({acc.size} vs {s.shape[0]})")
            if acc.shape[0] != 1:   # merged from a per-expert file: a dense weight has one matrix
                raise ImatrixError(f"inconsistent matrix count for {n} ({acc.shape[0]} vs 1)")
            acc += s
        c = self.counts[n]
        if c.size > 1 and np.all(c == c[0]):
            c = c[:1].copy()
        c += n_rows
        self.counts[n] = c

    def experts(self, names: Sequence[str], expert: int, x: np.ndarray, n_expert: int) -> None:
        """The inputs ``x`` (one row per token routed to ``expert``) of a MoE weight's expert matrix: per-expert
        sums and counts, as llama-imatrix collects a MUL_MAT_ID (one count per token and selected expert)."""
        names, s = self._column_squares(names, x)
        if s is None:
            return
        for n in names:
            self.expert_names.add(n)
            acc = self.sums.get(n)
            if acc is None:
                acc = self.sums[n] = np.zeros((n_expert, s.shape[0]), dtype=np.float64)
                self.counts[n] = np.zeros(n_expert, dtype=np.int64)
            elif acc.shape[1] != s.shape[0] or acc.shape[0] <= expert:
                raise ImatrixError(f"inconsistent size for {n} ({acc.shape} vs expert {expert} x {s.shape[0]})")
            acc[expert] += s
            self.counts[n][expert] += x.shape[0]

    def add_batch(self, stats: "BatchStatistics") -> None:
        """Add what one batch collected on its own (a fresh collector's sums and counts, :func:`evaluate_batch`).

        Bit for bit what this collector would hold had it been the batch's hook itself: the forward pass reports
        each weight's input once per batch (each expert's once), so a dense weight's batch sum is the one sum the
        hook would have added, and an expert weight adds 0.0 (exact) for the experts the batch did not route to.
        Adding batches in chunk order therefore reproduces the single-process run exactly, wherever they ran."""
        for n, s in stats.sums.items():
            cnt = stats.counts[n]
            if n not in stats.expert_names:
                self._add_dense(n, s[0], int(cnt[0]))
                continue
            self.expert_names.add(n)
            acc = self.sums.get(n)
            if acc is None:
                self.sums[n] = s.copy()
                self.counts[n] = cnt.copy()
                continue
            if acc.shape != s.shape:
                raise ImatrixError(f"inconsistent size for {n} ({acc.shape} vs {s.shape})")
            acc += s
            self.counts[n] = self.counts[n] + cnt

    def merge(self, im: Imatrix) -> None:
        """Add a loaded imatrix (IMatrixCollector::load_imatrix)."""
        cs = self.chunk_size
        for name, e in im.entries.items():
            sums = np.asarray(e.in_sum2, dtype=np.float64)
            if im.is_legacy:
                acc = self.sums.get(name)
                if acc is None:
                    self.sums[name] = np.zeros((1, sums.size), dtype=np.float64)
                    self.counts[name] = np.zeros(1, dtype=np.int64)
                    acc = self.sums[name]
                if acc.size != sums.size:
                    raise ImatrixError(f"mismatched sums size for {name}: {sums.size} != {acc.size}")
                # float32 in llama.cpp: values[j] += sums[j] * chunk_size
                acc += (sums.reshape(acc.shape).astype(np.float32) * np.float32(cs)).astype(np.float64)
                self.counts[name] = self.counts[name] + int(e.counts[0]) * cs
            else:
                n_mat = e.n_mat
                acc = self.sums.get(name)
                if acc is None:
                    self.sums[name] = sums.reshape(n_mat, -1).copy()
                    self.counts[name] = np.asarray(e.counts, dtype=np.int64).copy()
                    continue
                if acc.size != sums.size:
                    raise ImatrixError(f"mismatched sums size for {name}: {sums.size} != {acc.size}")
                c = self.counts[name]
                if c.size == 1 and n_mat > 1:
                    c = np.full(n_mat, c[0], dtype=np.int64)
                elif c.size != n_mat:
                    raise ImatrixError(f"mismatched counts size for {name}: {n_mat} != {c.size}")
                self.sums[name] = (acc.reshape(-1) + sums.reshape(-1)).reshape(n_mat, -1)
                self.counts[name] = c + np.asarray(e.counts, dtype=np.int64)
        self.datasets.extend(im.datasets)

    @property
    def chunk_count(self) -> int:
        mx = max((int(c.max()) for c in self.counts.values() if c.size), default=0)
        return mx // self.chunk_size if self.chunk_size > 0 else 0

    def result(self, dataset: str | None = None) -> Imatrix:
        """The in-memory imatrix (float32 sums, as llama-imatrix stores them)."""
        entries = {}
        for name in sorted(self.sums):
            entries[name] = ImatrixEntry(self.sums[name].astype(np.float32), self.counts[name].copy())
        datasets = list(self.datasets) + ([dataset] if dataset else [])
        return Imatrix(entries, datasets, self.chunk_count, self.chunk_size, is_legacy=False, has_metadata=True)


# --- inputs (the shared pieces live in gguftool.model.chunks)


def read_calibration_text(path: str) -> str:
    """The file as UTF-8 text, without one trailing newline (llama.cpp's ``-f`` drops it too)."""
    return read_text(path, ImatrixError, "calibration")


def load_model(path: str) -> "GGUFSource | HFSource":
    """Open a GGUF file or a Hugging Face checkpoint (directory or .safetensors) as a TensorSource."""
    return open_model(path, ImatrixError)


def merge_imatrix_files(collector: ImatrixCollector, paths: Sequence[str]) -> None:
    for p in paths:
        collector.merge(read_imatrix(p))


def save_imatrix(path: str, im: Imatrix, fmt: str = "gguf", dataset: str = "", *, overwrite: bool = True) -> None:
    if fmt == "gguf":
        write_imatrix_gguf(path, im, overwrite=overwrite)
    elif fmt == "dat":
        write_imatrix_legacy(path, im, dataset=dataset, overwrite=overwrite)
    else:
        raise ImatrixError(f"unknown imatrix output format {fmt!r} (gguf or dat)")


# --- the run


def check_run_options(n_ctx: int, n_chunks: int | None, batch_tokens: int, compute_ppl: bool) -> None:
    """The chunking options, checked before any work (errors name the command line option too)."""
    min_ctx = 3 if compute_ppl else 1   # perplexity is taken over positions n_ctx/2 .. n_ctx-2
    if not isinstance(n_ctx, int) or n_ctx < min_ctx:
        why = " to compute perplexity over its second half" if compute_ppl else ""
        raise ImatrixError(f"the context size (--ctx) must be at least {min_ctx}{why} (got {n_ctx})")
    if n_chunks is not None and (not isinstance(n_chunks, int) or n_chunks == 0 or n_chunks < -1):
        raise ImatrixError(f"the chunk count (--chunks) must be > 0, or -1 for all (got {n_chunks})")
    if not isinstance(batch_tokens, int) or batch_tokens <= 0:
        raise ImatrixError(f"the batch size (--batch-size) must be > 0 (got {batch_tokens})")


@dataclass
class ImatrixRun:
    imatrix: Imatrix
    n_tokens: int             # tokens in the calibration text
    n_chunks: int             # chunks evaluated
    ppl: float                # final perplexity estimate
    ppl_err: float
    chunk_ppl: list = field(default_factory=list)   # running perplexity after each chunk
    seconds: float = 0.0


ProgressFn = Callable[[int, int, float], None]   # (chunks done, chunks total, running perplexity)


@dataclass
class BatchStatistics:
    """What evaluating one batch of chunks collects on its own, from a fresh collector: the unit of work a Ray
    worker sends back (gguftool.distributed.imatrix) and the local loop adds the same way."""
    first_chunk: int                      # index of the batch's first chunk
    sums: dict[str, np.ndarray]           # float64 (n_mat, ne0) per weight
    counts: dict[str, np.ndarray]         # int64 (n_mat,) per weight
    expert_names: frozenset[str]          # the weights collected per expert
    nll: list[tuple[float, float]]        # per chunk: sums of nll and nll² over its scored tokens (empty: no PPL)

    @classmethod
    def combine(cls, parts: Sequence["BatchStatistics"]) -> "BatchStatistics":
        """The statistics of one batch's pipeline stages as one (each weight is collected by one stage)."""
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, np.ndarray] = {}
        experts: set[str] = set()
        nll: list[tuple[float, float]] = []
        for p in parts:
            if p.first_chunk != parts[0].first_chunk or sums.keys() & p.sums.keys():
                raise ImatrixError(f"stage statistics of batch {parts[0].first_chunk} do not fit together")
            sums.update(p.sums)
            counts.update(p.counts)
            experts |= p.expert_names
            nll = nll or p.nll
        return cls(parts[0].first_chunk, sums, counts, frozenset(experts), nll)

    @property
    def nbytes(self) -> int:
        """Bytes of the statistics (what crosses the network per batch)."""
        return sum(a.nbytes for a in self.sums.values()) + sum(a.nbytes for a in self.counts.values())


def evaluate_batch(model, first_chunk: int, batch: np.ndarray, targets: np.ndarray | None, n_ctx: int,
                   process_output: bool) -> BatchStatistics:
    """Evaluate ``batch`` ((nb, n_ctx) tokens, BOS already in place) and collect its statistics; ``targets``
    ((nb, n_scored) next tokens of the scored positions, :meth:`RunPlan.targets`) or None: no perplexity."""
    collector = ImatrixCollector(n_ctx, process_output)
    first, last = scored_range(n_ctx) if targets is not None else (0, 0)
    logits = model.forward(batch, hook=collector, logits_from=first, logits_to=last, process_output=process_output)
    nll = [chunk_nll(logits[j], targets[j]) for j in range(batch.shape[0])] if targets is not None else []
    return BatchStatistics(first_chunk, collector.sums, collector.counts, frozenset(collector.expert_names), nll)


def evaluate_stage(model, first_chunk: int, inp: np.ndarray, n_ctx: int, layers: range, first: bool, last: bool,
                   targets: np.ndarray | None, process_output: bool) -> tuple[np.ndarray | None, BatchStatistics]:
    """One pipeline stage of :func:`evaluate_batch`: the model's ``layers`` only. ``inp``: the batch's tokens
    ((nb, n_ctx), BOS in place) for the ``first`` stage, else the residual stream (nb * n_ctx, n_embd) the previous
    stage returned. Returns the residual stream for the next stage (None from the ``last``, which also takes the
    logits and the NLL sums) and the statistics of this stage's weights. The stages' statistics together
    (:meth:`BatchStatistics.combine`) are exactly evaluate_batch's: each weight belongs to one stage."""
    collector = ImatrixCollector(n_ctx, process_output)
    nb = inp.shape[0] if first else inp.shape[0] // n_ctx
    x = model.embed(inp) if first else inp
    x = model.run_layers(x, nb, n_ctx, layers, collector)
    nll: list[tuple[float, float]] = []
    if last:
        lo, hi = scored_range(n_ctx) if targets is not None else (0, 0)
        logits = model.head(x, nb, n_ctx, collector, lo, hi, process_output)
        nll = [chunk_nll(logits[j], targets[j]) for j in range(nb)] if targets is not None else []
    stats = BatchStatistics(first_chunk, collector.sums, collector.counts, frozenset(collector.expert_names), nll)
    return (None if last else x), stats


@dataclass
class RunPlan:
    """The calibration text tokenized and cut into the batches a run evaluates (the same for every executor)."""
    tokens: np.ndarray        # the text's tokens
    n_ctx: int
    n_chunk: int              # chunks evaluated
    n_seq: int                # chunks per batch
    bos: int | None           # replaces each chunk's first token (None: kept)
    compute_ppl: bool

    @classmethod
    def make(cls, tokenizer, text: str, n_ctx: int, n_chunks: int, batch_tokens: int,
             compute_ppl: bool) -> "RunPlan":
        check_run_options(n_ctx, n_chunks, batch_tokens, compute_ppl)
        tokens = tokenize_text(tokenizer, text, n_ctx, ImatrixError, "calibration")
        return cls(tokens, n_ctx, chunk_count(len(tokens), n_ctx, n_chunks), max(1, batch_tokens // n_ctx),
                   tokenizer.bos_id if tokenizer.add_bos else None, compute_ppl)

    def batches(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first chunk, (nb, n_ctx) tokens) in chunk order."""
        return chunk_batches(self.tokens, self.n_ctx, self.n_chunk, self.n_seq, self.bos)

    @property
    def n_batches(self) -> int:
        return -(-self.n_chunk // self.n_seq)

    def targets(self, first_chunk: int, nb: int) -> np.ndarray | None:
        """The tokens the scored positions of chunks first_chunk .. first_chunk+nb-1 predict (None: no PPL)."""
        if not self.compute_ppl:
            return None
        first, _ = scored_range(self.n_ctx)
        rows = self.tokens[first_chunk * self.n_ctx:(first_chunk + nb) * self.n_ctx].reshape(nb, self.n_ctx)
        return np.ascontiguousarray(rows[:, first + 1:])


class RunTotals:
    """The driver's side of a run: batches added in chunk order to the collector (in_files merged first) and to
    the perplexity sums, with the snapshot and progress callbacks after each chunk."""

    def __init__(self, plan: RunPlan, process_output: bool, in_files: Sequence[str] = (),
                 progress: ProgressFn | None = None,
                 on_chunk: Callable[[int, ImatrixCollector], None] | None = None):
        self.plan = plan
        self.collector = ImatrixCollector(plan.n_ctx, process_output)
        for p in in_files:
            self.collector.merge(read_imatrix(p))
        self.nll = NLLTotals()
        self.progress, self.on_chunk = progress, on_chunk
        self.done = 0

    def add(self, stats: BatchStatistics) -> None:
        """The next batch (its first chunk must be the next chunk: batches are added in chunk order)."""
        if stats.first_chunk != self.done:
            raise ImatrixError(f"batch of chunk {stats.first_chunk} added after chunk {self.done}")
        self.collector.add_batch(stats)
        first, last = scored_range(self.plan.n_ctx)
        nb = min(self.plan.n_seq, self.plan.n_chunk - stats.first_chunk)
        for j in range(nb):
            if stats.nll:
                self.nll.add(*stats.nll[j], last - first)
            self.done += 1
            if self.on_chunk is not None:
                self.on_chunk(self.done, self.collector)
            if self.progress is not None:
                self.progress(self.done, self.plan.n_chunk,
                              self.nll.running[-1] if self.nll.running else float("nan"))

    def finish(self, dataset: str, t_start: float) -> "ImatrixRun":
        ppl, ppl_err = self.nll.estimate()      # (NaN, NaN) without compute_ppl: no token was added
        return ImatrixRun(self.collector.result(dataset), len(self.plan.tokens), self.plan.n_chunk, ppl, ppl_err,
                          self.nll.running, time.time() - t_start)


def compute_imatrix(model, tokenizer, text: str, n_ctx: int = 512, n_chunks: int = -1,
                    process_output: bool = False, compute_ppl: bool = True, in_files: Sequence[str] = (),
                    dataset: str = "", batch_tokens: int = 2048, progress: ProgressFn | None = None,
                    on_chunk: Callable[[int, ImatrixCollector], None] | None = None) -> ImatrixRun:
    """Evaluate ``text`` in chunks of ``n_ctx`` tokens and collect the importance matrix.

    ``model``: :class:`gguftool.model.forward.Model`; ``tokenizer``: :class:`gguftool.model.tokenizer.Tokenizer`.
    ``batch_tokens`` (llama-imatrix's ``-b``, 2048) sets how many chunks are evaluated together.
    """
    t_start = time.time()
    plan = RunPlan.make(tokenizer, text, n_ctx, n_chunks, batch_tokens, compute_ppl)
    totals = RunTotals(plan, process_output, in_files, progress, on_chunk)
    for i, batch in plan.batches():
        totals.add(evaluate_batch(model, i, batch, plan.targets(i, batch.shape[0]), n_ctx, process_output))
    return totals.finish(dataset, t_start)

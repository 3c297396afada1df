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

import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..errors import ImatrixError
from ..model.forward import ExpertHook
from .files import Imatrix, ImatrixEntry, read_imatrix, write_imatrix_gguf, write_imatrix_legacy

if TYPE_CHECKING:
    from ..gguf.source import GGUFSource
    from ..hf.source import HFSource

__all__ = ["ImatrixCollector", "ImatrixRun", "check_run_options", "compute_imatrix", "read_calibration_text",
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
            acc = self.sums.get(n)
            if acc is None:
                acc = self.sums[n] = np.zeros((n_expert, s.shape[0]), dtype=np.float64)
                self.counts[n] = np.zeros(n_expert, dtype=np.int64)
            elif acc.shape[1] != s.shape[0] or acc.shape[0] <= expert:
                raise ImatrixError(f"inconsistent size for {n} ({acc.shape} vs expert {expert} x {s.shape[0]})")
            acc[expert] += s
            self.counts[n][expert] += x.shape[0]

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


# --- perplexity


def chunk_nll(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """Sum of -log p(target) and of its square over rows (llama-imatrix's log_softmax: float exp, double sum)."""
    logits = np.asarray(logits, dtype=np.float32)
    mx = logits.max(axis=1, keepdims=True)
    sh = logits - mx
    sum_exp = np.exp(sh).sum(axis=1, dtype=np.float64)
    lp = sh[np.arange(len(targets)), targets].astype(np.float64) - np.log(sum_exp)
    v = -lp
    return float(v.sum()), float((v * v).sum())


def _exp(mean_nll: float) -> float:
    """exp() of a mean negative log-likelihood: a model whose weights make the logits explode has an infinite
    perplexity (printed as inf, as llama.cpp prints it), not an OverflowError."""
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


# --- inputs


def read_calibration_text(path: str) -> str:
    """The file as UTF-8 text, without one trailing newline (llama.cpp's ``-f`` drops it too)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ImatrixError(f"{path}: no such calibration file") from None
    except IsADirectoryError:
        raise ImatrixError(f"{path}: is a directory, not a calibration text file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ImatrixError(f"{path}: calibration text is not valid UTF-8 (byte {e.start}: "
                           f"0x{raw[e.start]:02x})") from None
    return text[:-1] if text.endswith("\n") else text


def load_model(path: str) -> "GGUFSource | HFSource":
    """Open a GGUF file or a Hugging Face checkpoint (directory or .safetensors) as a TensorSource."""
    if not os.path.exists(path):
        raise ImatrixError(f"{path}: no such model file or directory")
    is_gguf = False
    if os.path.isfile(path):
        with open(path, "rb") as f:
            is_gguf = f.read(4) == b"GGUF"
    if is_gguf:
        from ..gguf.source import open_gguf_source
        return open_gguf_source(path)
    if os.path.isdir(path) or path.endswith(".safetensors"):
        from ..hf.source import open_hf_source
        return open_hf_source(path, outtype="f32")
    raise ImatrixError(f"{path}: not a GGUF file nor a Hugging Face checkpoint")


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


def compute_imatrix(model, tokenizer, text: str, n_ctx: int = 512, n_chunks: int = -1,
                    process_output: bool = False, compute_ppl: bool = True, in_files: Sequence[str] = (),
                    dataset: str = "", batch_tokens: int = 2048, progress: ProgressFn | None = None,
                    on_chunk: Callable[[int, ImatrixCollector], None] | None = None) -> ImatrixRun:
    """Evaluate ``text`` in chunks of ``n_ctx`` tokens and collect the importance matrix.

    ``model``: :class:`gguftool.model.forward.Model`; ``tokenizer``: :class:`gguftool.model.tokenizer.Tokenizer`.
    ``batch_tokens`` (llama-imatrix's ``-b``, 2048) sets how many chunks are evaluated together.
    """
    check_run_options(n_ctx, n_chunks, batch_tokens, compute_ppl)
    t_start = time.time()
    collector = ImatrixCollector(n_ctx, process_output)
    for p in in_files:
        collector.merge(read_imatrix(p))
    tokens = np.asarray(tokenizer.tokenize(text, add_special=True, parse_special=False), dtype=np.int64)
    if len(tokens) < 2 * n_ctx:
        raise ImatrixError(f"the calibration text tokenizes to only {len(tokens)} tokens; a context of {n_ctx} "
                           f"needs at least {2 * n_ctx}")
    n_chunk_max = len(tokens) // n_ctx
    n_chunk = n_chunk_max if n_chunks is None or n_chunks < 0 else min(n_chunks, n_chunk_max)
    n_seq = max(1, batch_tokens // n_ctx)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    running: list[float] = []
    hook = collector
    for i in range(0, n_chunk, n_seq):
        nb = min(n_seq, n_chunk - i)
        batch = tokens[i * n_ctx:(i + nb) * n_ctx].reshape(nb, n_ctx).copy()
        if bos is not None:
            batch[:, 0] = bos
        lo, hi = (first, n_ctx - 1) if compute_ppl else (0, 0)
        logits = model.forward(batch, hook=hook, logits_from=lo, logits_to=hi, process_output=process_output)
        for j in range(nb):
            if compute_ppl:
                start = (i + j) * n_ctx
                targets = tokens[start + first + 1:start + n_ctx]
                a, b = chunk_nll(logits[j], targets)
                nll += a
                nll2 += b
                count += n_ctx - first - 1
                running.append(_exp(nll / count))
            if on_chunk is not None:
                on_chunk(i + j + 1, collector)
            if progress is not None:
                progress(i + j + 1, n_chunk, running[-1] if running else float("nan"))
    ppl = ppl_err = float("nan")
    if compute_ppl and count:
        m1 = nll / count
        m2 = nll2 / count - m1 * m1
        ppl = _exp(m1)
        ppl_err = math.sqrt(m2 / (count - 1)) * ppl if m2 > 0 and count > 1 and ppl < math.inf else float("nan")
    im = collector.result(dataset)
    return ImatrixRun(im, len(tokens), n_chunk, ppl, ppl_err, running, time.time() - t_start)

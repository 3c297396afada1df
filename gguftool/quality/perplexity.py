"""``gguftool perplexity`` as a library call: llama-perplexity's three runs on our forward pass.

- plain: the text's perplexity, chunked and scored as :mod:`gguftool.model.chunks` describes (perplexity.cpp's
  ``perplexity()``), with the ``Final estimate: PPL = X +/- Y`` figures;
- ``kl_divergence_base=FILE``: the same run, also writing the base model's log-probabilities of every scored token
  to FILE (:mod:`gguftool.quality.logits_file`); the nll is then the float32 one that ``process_logits`` with a
  stream computes;
- ``kl_divergence=True`` with ``kl_divergence_base=FILE``: the chunks and tokens come from FILE (the text, when
  given, must tokenize to them), and the model is compared with the base (:mod:`gguftool.quality.kld`).

:func:`compute_perplexity` never prints: progress goes to the ``progress`` callback. Options are checked before any
file is opened, the base file's path before the model is evaluated.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import PerplexityError
from ..model.chunks import (NLLTotals, chunk_batches, chunk_count, chunk_nll, open_model, read_text, scored_range,
                            tokenize_text)
from ..model.config import ModelConfig
from ..model.forward import Model
from ..model.tokenizer import Tokenizer
from ..outfile import check_outputs
from .kld import KLDAccumulator, KLDStats
from .logits_file import LogitsFile, LogitsFileWriter, encode_log_probs, read_logits_file

__all__ = ["PerplexityResult", "compute_perplexity"]

ProgressFn = Callable[[int, int, float], None]   # (tokens evaluated, tokens to evaluate, running perplexity)


@dataclass
class PerplexityResult:
    """What a run measured (and wrote)."""
    mode: str                         # "perplexity", "kl-divergence-base" or "kl-divergence"
    model_path: str
    n_ctx: int
    n_chunks: int                     # chunks evaluated
    n_vocab: int
    n_tokens: int                     # tokens in the text (in the base file's header for kl-divergence)
    n_scored: int                     # tokens scored: n_chunks * (n_ctx - 1 - n_ctx/2)
    ppl: float
    ppl_err: float
    chunk_ppl: list[float] = field(default_factory=list)    # running perplexity after each chunk
    seconds: float = 0.0
    text_path: str | None = None
    base_path: str | None = None      # the base logits file written or read
    kld: KLDStats | None = None       # kl-divergence statistics

    @property
    def tokens_per_second(self) -> float:
        return self.n_chunks * self.n_ctx / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("mode", "model_path", "text_path", "base_path", "n_ctx", "n_chunks",
                                           "n_vocab", "n_tokens", "n_scored", "ppl", "ppl_err", "chunk_ppl",
                                           "seconds")}
        d["tokens_per_second"] = self.tokens_per_second
        d["kl_divergence"] = self.kld.to_dict() if self.kld is not None else None
        return _finite_or_none(d)


def _finite_or_none(x):
    """JSON has no NaN or infinity: an undefined figure (an error estimate from one token) is null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    return x


def _check_options(n_ctx: int | None, n_chunks: int, batch: int, threads: int | None, kl_divergence: bool,
                   base: str | None, text: str | None, max_weight_memory: int | None) -> None:
    if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx < 3):
        raise PerplexityError(f"the context size (--ctx) must be at least 3 to score its second half (got {n_ctx})")
    if not isinstance(n_chunks, int) or n_chunks == 0 or n_chunks < -1:
        raise PerplexityError(f"the chunk count (--chunks) must be > 0, or -1 for all (got {n_chunks})")
    if not isinstance(batch, int) or batch <= 0:
        raise PerplexityError(f"the batch size (--batch-size) must be > 0 (got {batch})")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise PerplexityError(f"the thread count (--threads) must be >= 1 (got {threads})")
    if max_weight_memory is not None and (not isinstance(max_weight_memory, int) or max_weight_memory < 0):
        raise PerplexityError(f"the weight memory must be >= 0 bytes (got {max_weight_memory})")
    if kl_divergence and base is None:
        raise PerplexityError("--kl-divergence needs the base model's logits file (--kl-divergence-base FILE)")
    if not kl_divergence and text is None:
        raise PerplexityError("no text file given (-f/--file)")


def compute_perplexity(model_path: str | os.PathLike[str], text_path: str | os.PathLike[str] | None = None, *,
                       n_ctx: int | None = None, n_chunks: int = -1, batch: int = 2048, threads: int | None = None,
                       kl_divergence_base: str | os.PathLike[str] | None = None, kl_divergence: bool = False,
                       max_weight_memory: int | None = None, overwrite: bool = False, exact: bool = False,
                       progress: ProgressFn | None = None) -> PerplexityResult:
    """The perplexity of the model at ``model_path`` (GGUF file or Hugging Face checkpoint) on the text at
    ``text_path``, as llama-perplexity computes it.

    ``n_ctx``: tokens per chunk (None: 512, or the base file's with ``kl_divergence``); ``n_chunks``: chunks to
    evaluate (-1: all); ``batch``: tokens evaluated together; ``threads``: None for all CPUs;
    ``kl_divergence_base``: the base logits file to write (or, with ``kl_divergence``, to compare with);
    ``overwrite``: replace an existing base file (never an input); ``max_weight_memory``: obsolete, checked and ignored
    (the weights stay in their stored form); ``exact``: F16 products in llama.cpp's tinyBLAS order too (BF16 ones
    always are), bit for bit with its x86 CPU graph (~10 % slower: see gguftool.model.tinyblas); ``progress(tokens done, tokens total, running
    ppl)``.
    Raises PerplexityError (or another GGUFError) for bad options or input, before any work where it can tell.
    """
    base = None if kl_divergence_base is None else os.fspath(kl_divergence_base)
    text_file = None if text_path is None else os.fspath(text_path)
    _check_options(n_ctx, n_chunks, batch, threads, kl_divergence, base, text_file, max_weight_memory)
    model_file = os.fspath(model_path)
    text = None if text_file is None else read_text(text_file, PerplexityError, "evaluation")
    base_in: LogitsFile | None = read_logits_file(base) if kl_divergence and base is not None else None
    if base_in is not None and n_ctx is not None and n_ctx != base_in.n_ctx:
        raise PerplexityError(f"{base}: the base logits were computed with a context of {base_in.n_ctx}, this run "
                              f"uses --ctx {n_ctx}")
    t_start = time.time()
    source = open_model(model_file, PerplexityError)
    try:
        if base is not None and not kl_divergence:   # checked now, not after the whole evaluation
            check_outputs([base], source.input_files() + ([text_file] if text_file else []), overwrite=overwrite)
        ModelConfig.from_metadata(source, origin=model_file)
        tokenizer = Tokenizer.from_metadata(source, origin=model_file)
        model = Model.from_source(source, n_threads=threads or os.cpu_count() or 1, origin=model_file, exact=exact)
        if base_in is not None:
            result = _kl_divergence(model, tokenizer, model_file, text, base_in, n_chunks, batch, progress)
        else:
            result = _perplexity(model, tokenizer, model_file, text or "", n_ctx or 512, n_chunks, batch, base,
                                 overwrite, progress)
    finally:
        source.close()
    result.text_path = text_file
    result.seconds = time.time() - t_start
    return result


def _n_vocab(tokenizer: Tokenizer, logits: np.ndarray, origin: str) -> int:
    if logits.shape[-1] != tokenizer.n_vocab:
        raise PerplexityError(f"{origin}: the output has {logits.shape[-1]} logits per token, the vocabulary "
                              f"{tokenizer.n_vocab} tokens")
    return tokenizer.n_vocab


class _TokenProgress:
    """A ``ProgressFn`` fed in tokens and never backwards: during a batch's forward pass the batch's tokens in
    proportion to the layers done (the output layer the last step), so that a bar moves through a long batch rather
    than sitting still until its logits; then chunk by chunk as they are scored."""

    def __init__(self, fn: ProgressFn | None, total: int, n_layer: int):
        self.fn, self.total, self.steps = fn, total, n_layer + 1
        self.done = 0

    def __call__(self, done: int, ppl: float) -> None:
        if self.fn is not None:
            self.done = max(self.done, done)
            self.fn(self.done, self.total, ppl)

    def layers(self, first_token: int, n_tokens: int, running: list[float]) -> Callable[[int], None] | None:
        """The forward pass's ``on_layer`` for a batch of ``n_tokens`` from ``first_token`` (``running``: the
        perplexities so far)."""
        if self.fn is None:
            return None
        ppl = running[-1] if running else math.nan
        return lambda il: self(first_token + n_tokens * (il + 1) // self.steps, ppl)


def _perplexity(model: Model, tokenizer: Tokenizer, origin: str, text: str, n_ctx: int, n_chunks: int, batch: int,
                base: str | None, overwrite: bool, progress: ProgressFn | None) -> PerplexityResult:
    tokens = tokenize_text(tokenizer, text, n_ctx, PerplexityError, "evaluation")
    n_chunk = chunk_count(len(tokens), n_ctx, n_chunks)
    first, last = scored_range(n_ctx)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    report = _TokenProgress(progress, n_chunk * n_ctx, model.cfg.n_layer)
    writer = None
    if base is not None:
        writer = LogitsFileWriter(base, n_ctx, tokenizer.n_vocab, tokens, n_chunk, overwrite=overwrite)
    try:
        totals = NLLTotals()
        for i, chunks in chunk_batches(tokens, n_ctx, n_chunk, max(1, batch // n_ctx), bos):
            logits = model.forward(chunks, logits_from=first, logits_to=last,
                                   on_layer=report.layers(i * n_ctx, chunks.size, totals.running))
            _n_vocab(tokenizer, logits, origin)
            for j in range(chunks.shape[0]):
                start = (i + j) * n_ctx
                targets = tokens[start + first + 1:start + n_ctx]
                if writer is not None:
                    rows, v = encode_log_probs(logits[j], targets)
                    writer.write_chunk(rows)
                    v64 = v.astype(np.float64)
                    ppl = totals.add(float(v64.sum()), float((v64 * v64).sum()), last - first)
                else:
                    ppl = totals.add(*chunk_nll(logits[j], targets), last - first)
                report((i + j + 1) * n_ctx, ppl)
        if writer is not None:
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    ppl, err = totals.estimate()
    return PerplexityResult("kl-divergence-base" if base else "perplexity", origin, n_ctx, n_chunk,
                            tokenizer.n_vocab, len(tokens), totals.count, ppl, err, totals.running, base_path=base)


def _kl_divergence(model: Model, tokenizer: Tokenizer, origin: str, text: str | None, base: LogitsFile,
                   n_chunks: int, batch: int, progress: ProgressFn | None) -> PerplexityResult:
    n_ctx = base.n_ctx
    if base.n_vocab != tokenizer.n_vocab:
        raise PerplexityError(f"{base.path}: the base logits have a vocabulary of {base.n_vocab} tokens, {origin} "
                              f"has {tokenizer.n_vocab}")
    if text is not None:
        tokens = np.asarray(tokenizer.tokenize(text, add_special=True, parse_special=False), dtype=np.int64)
        n = min(len(tokens), len(base.tokens))
        diff = np.flatnonzero(tokens[:n] != base.tokens[:n])
        if diff.size or len(tokens) < len(base.tokens):
            at = int(diff[0]) if diff.size else n
            ours = int(tokens[at]) if at < len(tokens) else "end of text"
            raise PerplexityError(f"{base.path}: the base logits are for other tokens than the text's: token {at} "
                                  f"is {int(base.tokens[at])} in the base file, {ours} in the text")
    tokens = base.tokens.astype(np.int64)
    n_chunk = base.n_chunk if n_chunks < 0 else min(n_chunks, base.n_chunk)
    first, last = scored_range(n_ctx)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    acc = KLDAccumulator(base.n_vocab)
    report = _TokenProgress(progress, n_chunk * n_ctx, model.cfg.n_layer)
    running: list[float] = []
    for i, chunks in chunk_batches(tokens, n_ctx, n_chunk, max(1, batch // n_ctx), bos):
        logits = model.forward(chunks, logits_from=first, logits_to=last,
                               on_layer=report.layers(i * n_ctx, chunks.size, running))
        _n_vocab(tokenizer, logits, origin)
        for j in range(chunks.shape[0]):
            start = (i + j) * n_ctx
            acc.add(logits[j], base.chunk(i + j), tokens[start + first + 1:start + n_ctx])
            running.append(acc.running()[0])
            report((i + j + 1) * n_ctx, running[-1])
    stats = acc.stats()
    return PerplexityResult("kl-divergence", origin, n_ctx, n_chunk, base.n_vocab, len(base.tokens), acc.count,
                            stats.ppl, stats.ppl_err, running, base_path=base.path, kld=stats)

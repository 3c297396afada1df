"""llama-perplexity's base logits file (``--kl-divergence-base``): what the base model predicted, per scored token.

Layout (little-endian; tools/perplexity/perplexity.cpp, ``perplexity()`` writes it, ``kl_divergence()`` reads it)::

    char[8]   "_logits_"
    int32     n_ctx
    int32     n_vocab
    int32     n_chunk
    int32     tokens[n_chunk * n_ctx]        the text's tokens (the original first token, not the BOS put in its place)
    per chunk, per scored token (n_ctx - 1 - n_ctx/2 of them: positions n_ctx/2 .. n_ctx-2):
      uint16  row[nv], nv = 2*((n_vocab+1)/2) + 4
              row[0:2] float32 scale, row[2:4] float32 min_log_prob, row[4:4+n_vocab] q[i], the rest 0

The log-probability of token i is ``scale * q[i] + min_log_prob`` (``log_softmax`` with a ``uint16_t *`` argument):
``min_logit = max(min(logits), max_logit - 16)``, ``scale = (max_logit - min_logit) / 65535``,
``q[i] = nearest_int((logits[i] - min_logit) / scale)`` for logits above ``min_logit``, else 0; all float32.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from ..errors import PerplexityError
from ..outfile import OutputFile

__all__ = ["MAGIC", "row_width", "scored_per_chunk", "encode_log_probs", "decode_log_probs", "LogitsFileWriter",
           "LogitsFile", "read_logits_file"]

MAGIC = b"_logits_"
_HEADER = struct.Struct("<8siii")


def row_width(n_vocab: int) -> int:
    """uint16 values per scored token: the two float32 header values and n_vocab codes, padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored_per_chunk(n_ctx: int) -> int:
    return n_ctx - 1 - n_ctx // 2


def encode_log_probs(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows (n, nv) uint16, nll (n,) float32) for logits (n, n_vocab) predicting ``targets``: perplexity.cpp's
    ``log_softmax(n_vocab, logits, log_prob, tok)``, whose nll is float32 ``max + log(sum exp) - logit[tok]``."""
    logits = np.asarray(logits, dtype=np.float32)
    n, n_vocab = logits.shape
    mx = logits.max(axis=1)
    mn = np.maximum(logits.min(axis=1), mx - np.float32(16))
    sum_exp = np.exp(logits - mx[:, None]).sum(axis=1, dtype=np.float64)
    lse = np.log(sum_exp).astype(np.float32)
    min_log_prob = (mn - mx) - lse
    scale = (mx - mn) / np.float32(65535)
    rows = np.zeros((n, row_width(n_vocab)), dtype=np.uint16)
    rows[:, 0:2] = scale.astype("<f4").view(np.uint16).reshape(n, 2)
    rows[:, 2:4] = min_log_prob.astype("<f4").view(np.uint16).reshape(n, 2)
    nz = scale != 0
    if nz.any():
        inv = np.float32(1) / scale[nz]
        lg, lo = logits[nz], mn[nz][:, None]
        q = np.rint(inv[:, None] * (lg - lo)).astype(np.int64)   # nearest_int: round half to even
        rows[nz, 4:4 + n_vocab] = np.where(lg > lo, q, 0).astype(np.uint16)   # stored as uint16_t, as in C
    nll = (mx + lse) - logits[np.arange(n), targets]
    return rows, nll


def decode_log_probs(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """The float32 log-probabilities (n, n_vocab) that rows (n, nv) encode: ``scale * q + min_log_prob``."""
    rows = np.ascontiguousarray(rows, dtype=np.uint16)
    scale = rows[:, 0:2].copy().view("<f4").astype(np.float32)
    min_lp = rows[:, 2:4].copy().view("<f4").astype(np.float32)
    return scale * rows[:, 4:4 + n_vocab].astype(np.float32) + min_lp


class LogitsFileWriter:
    """Writes a base logits file chunk by chunk; it appears under ``path`` only when :meth:`commit` is called
    (:class:`gguftool.outfile.OutputFile`), so an interrupted run leaves nothing."""

    def __init__(self, path: str, n_ctx: int, n_vocab: int, tokens: np.ndarray, n_chunk: int, *,
                 overwrite: bool = False):
        self.path = path
        self._rows = scored_per_chunk(n_ctx) * row_width(n_vocab)
        self._out = OutputFile(path, overwrite=overwrite)
        self._stream: BinaryIO | None = None
        try:
            self._stream = self._out.stream()
            self._stream.write(_HEADER.pack(MAGIC, n_ctx, n_vocab, n_chunk))
            self._stream.write(np.asarray(tokens[:n_chunk * n_ctx], dtype="<i4").tobytes())
        except BaseException:
            self.abort()
            raise

    def write_chunk(self, rows: np.ndarray) -> None:
        if rows.size != self._rows or self._stream is None:
            raise PerplexityError(f"{self.path}: internal error: chunk of {rows.size} log-prob values, expected "
                                  f"{self._rows}")
        self._stream.write(np.ascontiguousarray(rows, dtype="<u2").tobytes())

    def commit(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._out.commit()

    def abort(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except OSError:
                pass
            self._stream = None
        self._out.abort()


@dataclass
class LogitsFile:
    """A validated base logits file: the header, the tokens and a memory map of the per-token rows."""
    path: str
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray          # (n_chunk * n_ctx,) int32
    rows: np.ndarray            # (n_chunk, scored_per_chunk(n_ctx), row_width(n_vocab)) uint16, memory-mapped

    def chunk(self, i: int) -> np.ndarray:
        return self.rows[i]


def read_logits_file(path: str | os.PathLike[str]) -> LogitsFile:
    """Open and validate a base logits file (magic, header values, exact size for the counts it claims)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
    except FileNotFoundError:
        raise PerplexityError(f"{path}: no such base logits file") from None
    except IsADirectoryError:
        raise PerplexityError(f"{path}: is a directory, not a base logits file") from None
    if len(head) < 8 or head[:8] != MAGIC:
        raise PerplexityError(f"{path}: not a llama-perplexity logits file (no '_logits_' magic at offset 0)")
    if len(head) < _HEADER.size:
        raise PerplexityError(f"{path}: truncated: {size} bytes, the header alone needs {_HEADER.size}")
    _, n_ctx, n_vocab, n_chunk = _HEADER.unpack(head)
    if n_ctx < 3:
        raise PerplexityError(f"{path}: bad context size n_ctx = {n_ctx} at offset 8 (at least 3)")
    if n_vocab < 1:
        raise PerplexityError(f"{path}: bad vocabulary size n_vocab = {n_vocab} at offset 12")
    if n_chunk < 1:
        raise PerplexityError(f"{path}: bad chunk count n_chunk = {n_chunk} at offset 16")
    n_tok = n_chunk * n_ctx
    per_chunk = scored_per_chunk(n_ctx) * row_width(n_vocab)
    expected = _HEADER.size + 4 * n_tok + 2 * n_chunk * per_chunk
    if size < expected:
        raise PerplexityError(f"{path}: truncated: {size} bytes, n_ctx {n_ctx} x n_chunk {n_chunk} with n_vocab "
                              f"{n_vocab} needs {expected}")
    if size > expected:
        raise PerplexityError(f"{path}: {size - expected} unexpected bytes after the {expected} that n_ctx {n_ctx}, "
                              f"n_chunk {n_chunk} and n_vocab {n_vocab} account for")
    tokens = np.fromfile(path, dtype="<i4", count=n_tok, offset=_HEADER.size).astype(np.int32)
    bad = np.flatnonzero((tokens < 0) | (tokens >= n_vocab))
    if bad.size:
        raise PerplexityError(f"{path}: token {int(tokens[bad[0]])} at index {int(bad[0])} is outside the "
                              f"vocabulary of {n_vocab}")
    rows = np.memmap(path, dtype="<u2", mode="r", offset=_HEADER.size + 4 * n_tok,
                     shape=(n_chunk, scored_per_chunk(n_ctx), row_width(n_vocab)))
    return LogitsFile(path, n_ctx, n_vocab, n_chunk, tokens, rows)

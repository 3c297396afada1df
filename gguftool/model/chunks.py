"""Text evaluated in chunks, as llama-imatrix and llama-perplexity both do it.

Shared by :mod:`gguftool.importance` and :mod:`gguftool.quality`:
- the text file is read as UTF-8 without one trailing newline (llama.cpp's ``-f`` drops it too);
- the model is a GGUF file or a Hugging Face checkpoint;
- the text is tokenized once (``add_special=True``, special tokens not parsed) and cut into ``n_ctx``-token chunks;
  at least ``2 * n_ctx`` tokens are required; ``n_chunks`` limits how many chunks are evaluated;
- the first token of every chunk is replaced by BOS when the vocabulary adds BOS (the token list keeps the original);
- only the second half of each chunk is scored: the logits at positions ``first = n_ctx/2 .. n_ctx-2`` predict the
  tokens at ``first+1 .. n_ctx-1``;
- the negative log-likelihood is llama.cpp's log-softmax (float ``expf``, double sum) and the estimate's error is
  ``sqrt((mean(nll²) - mean(nll)²) / (count - 1)) * PPL``.

The functions take the error class to raise (ImatrixError for imatrix, PerplexityError for perplexity) and a word for
the text ("calibration", "evaluation") so that messages name the command's own input.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Iterator

import numpy as np
from numba import njit

from ..errors import GGUFError

if TYPE_CHECKING:
    from ..gguf.source import GGUFSource
    from ..hf.source import HFSource
    from .tokenizer import Tokenizer

__all__ = ["read_text", "open_model", "tokenize_text", "chunk_count", "chunk_batches", "scored_range", "chunk_nll",
           "safe_exp", "NLLTotals"]


def read_text(path: str, error: type[GGUFError], what: str) -> str:
    """The file as UTF-8 text, without one trailing newline; ``what`` names the text in messages."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what} text file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} text is not valid UTF-8 (byte {e.start}: 0x{raw[e.start]:02x})") from None
    return text[:-1] if text.endswith("\n") else text


def open_model(path: str, error: type[GGUFError]) -> "GGUFSource | HFSource":
    """Open a GGUF file or a Hugging Face checkpoint (directory or .safetensors; or a Hub repo id when no such path
    exists, from huggingface_hub's cache) as a TensorSource."""
    if not os.path.exists(path):
        from ..hf.hub import looks_like_repo_id, resolve_model
        if not looks_like_repo_id(path):
            raise error(f"{path}: no such model file or directory")
        path = resolve_model(path)[0]
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
    raise error(f"{path}: not a GGUF file nor a Hugging Face checkpoint")


def tokenize_text(tokenizer: "Tokenizer", text: str, n_ctx: int, error: type[GGUFError], what: str) -> np.ndarray:
    """The text's tokens (int64), checked to fill at least two chunks (llama.cpp's minimum)."""
    tokens = np.asarray(tokenizer.tokenize(text, add_special=True, parse_special=False), dtype=np.int64)
    if len(tokens) < 2 * n_ctx:
        raise error(f"the {what} text tokenizes to only {len(tokens)} tokens; a context of {n_ctx} needs at "
                    f"least {2 * n_ctx}")
    return tokens


def chunk_count(n_tokens: int, n_ctx: int, n_chunks: int | None) -> int:
    """Chunks evaluated: all the text gives (``n_chunks`` None or < 0), else at most ``n_chunks``."""
    n_max = n_tokens // n_ctx
    return n_max if n_chunks is None or n_chunks < 0 else min(n_chunks, n_max)


def chunk_batches(tokens: np.ndarray, n_ctx: int, n_chunk: int, n_seq: int,
                  bos: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """(index of the first chunk, (nb, n_ctx) tokens) for groups of up to ``n_seq`` chunks evaluated together;
    the first token of each chunk replaced by ``bos`` (None: kept)."""
    for i in range(0, n_chunk, n_seq):
        nb = min(n_seq, n_chunk - i)
        batch = tokens[i * n_ctx:(i + nb) * n_ctx].reshape(nb, n_ctx).copy()
        if bos is not None:
            batch[:, 0] = bos
        yield i, batch


def scored_range(n_ctx: int) -> tuple[int, int]:
    """The positions whose logits are scored: ``first = n_ctx/2`` up to (excluding) ``n_ctx - 1``."""
    return n_ctx // 2, n_ctx - 1


@njit(cache=True, nogil=True)
def _nll_rows(logits, targets):
    """Per row: max, then sum(expf(l - max)) in double, nll = log(sum) - (l[target] - max)."""
    nll = 0.0
    nll2 = 0.0
    for r in range(logits.shape[0]):
        mx = logits[r, 0]
        for i in range(1, logits.shape[1]):
            if logits[r, i] > mx:
                mx = logits[r, i]
        total = 0.0
        for i in range(logits.shape[1]):
            total += np.float64(np.exp(logits[r, i] - mx))
        v = np.log(total) - np.float64(logits[r, targets[r]] - mx)
        nll += v
        nll2 += v * v
    return nll, nll2


def chunk_nll(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """Sum of -log p(target) and of its square over rows (llama.cpp's log_softmax: float exp, double sum), in one
    numba pass over the logits (the vocabulary is 49k-262k wide: numpy's passes and temporaries cost more)."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    targets = np.ascontiguousarray(targets, dtype=np.int64)
    if logits.shape[0] == 0:
        return 0.0, 0.0
    nll, nll2 = _nll_rows(logits, targets)
    return float(nll), float(nll2)


def safe_exp(mean_nll: float) -> float:
    """exp() of a mean negative log-likelihood: a model whose weights make the logits explode has an infinite
    perplexity (printed as inf, as llama.cpp prints it), not an OverflowError."""
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


class NLLTotals:
    """Sums of the negative log-likelihoods of the scored tokens: the running perplexity after each chunk and
    the final ``PPL = X +/- Y`` estimate, as llama-perplexity (and llama-imatrix) print them."""

    def __init__(self) -> None:
        self.nll = self.nll2 = 0.0
        self.count = 0
        self.running: list[float] = []      # the perplexity after each chunk

    def add(self, nll: float, nll2: float, n_tokens: int) -> float:
        """One chunk's sums of nll and nll² over its ``n_tokens`` scored tokens; returns the running perplexity."""
        self.nll += nll
        self.nll2 += nll2
        self.count += n_tokens
        self.running.append(safe_exp(self.nll / self.count))
        return self.running[-1]

    def estimate(self) -> tuple[float, float]:
        """(PPL, its +/- error) over every token added (NaN, NaN before any)."""
        if self.count <= 0:
            return float("nan"), float("nan")
        m1 = self.nll / self.count
        m2 = self.nll2 / self.count - m1 * m1
        ppl = safe_exp(m1)
        ok = m2 > 0 and self.count > 1 and ppl < math.inf
        return ppl, (math.sqrt(m2 / (self.count - 1)) * ppl if ok else float("nan"))

#!/usr/bin/env python3
"""Per-token agreement of gguftool's forward pass with llama.cpp's (llama-cpp-python, flash attention on and off).

    python scripts/ppl_per_token.py MODEL.gguf [-f TEXT] [-c 512] [--chunks 2] [-t 2] [--no-flash-attn-ours]

Evaluates the first CHUNKS chunks of TEXT (as llama-perplexity cuts them: BOS in place of each chunk's first token
when the vocabulary adds one) with llama-cpp-python (``logits_all``; ``flash_attn`` True, then False) and with
gguftool's Model, and prints, per block of positions, the mean and maximum over rows of max |Δ log p| (over the
vocabulary, where either log p > -10) and the mean |Δ log p| of the target token; then, over the scored half
(positions n_ctx/2 .. n_ctx-2 as llama-perplexity), the std of the signed target difference (its std / sqrt(5355)
is what the PPL of 21 chunks of 512 scatters by, in ln PPL) and llama.cpp's flash-attention vs no-flash-attention
difference measured the same way: the noise floor of llama.cpp itself.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def llama_logits(model: str, text: str, n_ctx: int, n_chunks: int, threads: int, flash_attn: bool):
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, flash_attn=flash_attn,
                n_threads=threads, verbose=False)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    bos = llm.token_bos() if llm._model.add_bos_token() else None
    chunks, logits = [], []
    for c in range(n_chunks):
        t = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            t[0] = bos
        llm.reset()
        llm.eval(t)
        chunks.append(t)
        logits.append(np.array(llm.scores[:n_ctx], dtype=np.float32))
    return np.array(chunks, dtype=np.int64), np.stack(logits), np.array(tokens[:n_chunks * n_ctx + 1])


def compare(name: str, a: np.ndarray, b: np.ndarray, targets: np.ndarray, n_ctx: int) -> None:
    la, lb = log_softmax(a), log_softmax(b)
    keep = (la > -10) | (lb > -10)
    rowmax = np.where(keep, np.abs(la - lb), 0).max(-1)                     # (chunks, n_ctx)
    d = (np.take_along_axis(la, targets[..., None], -1) - np.take_along_axis(lb, targets[..., None], -1))[..., 0]
    print(name)
    step = n_ctx // 8
    for p0 in range(0, n_ctx, step):
        sl = slice(p0, p0 + step)
        print(f"  positions {p0:4d}-{p0 + step - 1:4d}: row max |Δ log p| mean {rowmax[:, sl].mean():.5f} "
              f"max {rowmax[:, sl].max():.5f}; target |Δ log p| mean {np.abs(d[:, sl]).mean():.6f}")
    sd = d[:, n_ctx // 2:n_ctx - 1]
    print(f"  scored positions: target Δ log p mean {sd.mean():+.6f}, |mean| {np.abs(sd).mean():.6f}, std "
          f"{sd.std():.5f} (-> {100 * sd.std() / np.sqrt(5355):.3f} % PPL scatter over 5355 tokens)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-f", "--text", default=str(ROOT / "fixtures/calibration/essays.txt"))
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--no-flash-attn-ours", action="store_true", help="gguftool with one plain softmax instead of "
                    "the flash-attention emulation (Model.flash_attn = False)")
    a = ap.parse_args(argv)
    from gguftool.errors import GGUFError
    from gguftool.model.chunks import open_model
    from gguftool.model.forward import Model

    text = Path(a.text).read_text(encoding="utf-8")
    toks, fa, all_tokens = llama_logits(a.model, text, a.ctx, a.chunks, a.threads, True)
    _, nofa, _ = llama_logits(a.model, text, a.ctx, a.chunks, a.threads, False)
    source = open_model(a.model, GGUFError)
    try:
        model = Model.from_source(source, n_threads=a.threads, origin=a.model)
        model.flash_attn = not a.no_flash_attn_ours
        ours = model.forward(toks, logits_from=0, logits_to=a.ctx)
    finally:
        source.close()
    # the target of position p is the text's next token (not the BOS that replaced a chunk's first one)
    targets = np.stack([all_tokens[c * a.ctx + 1:(c + 1) * a.ctx + 1] for c in range(a.chunks)])
    compare("gguftool vs llama.cpp (flash attention)", ours, fa, targets, a.ctx)
    compare("gguftool vs llama.cpp (no flash attention)", ours, nofa, targets, a.ctx)
    compare("llama.cpp flash attention vs llama.cpp no flash attention", fa, nofa, targets, a.ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())

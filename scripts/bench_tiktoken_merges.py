#!/usr/bin/env python
"""Time the BPE merge rebuild of a Kimi-K2-sized tiktoken.model: gguftool's against llama.cpp converter's loop.

llama.cpp's converter (DeepseekV2Model.set_vocab, pre-tokenizer "kimi-k2") rebuilds the merges of Kimi's 163,584
BPE ranks by re-running BPE on every token (QwenModel.bpe). This script builds a vocabulary of that size
deterministically - the 1024 ranks of fixtures/kimi-k2/tiktoken.model, then tokens made by joining two earlier
tokens (seeded random pairs, at most 16 bytes, so every token has a merge path like a trained vocabulary) - writes
it as a tiktoken.model under a temporary folder, and runs, back to back and --repeat times each:

- gguftool: ``read_ranks`` + ``rebuild_merges`` (gguftool/hf/tiktoken_vocab.py);
- llama.cpp: the converter's own loop (its ``QwenModel.bpe`` + ``token_bytes_to_string``, imported from the
  llama.cpp source given, in a Python that can import it, i.e. with torch), on tiktoken's loader's ranks.

It prints both times (wall and CPU: under load the CPU time is the one to compare), their ratio, the load average, and whether the two merge lists are identical (sha256).

    python scripts/bench_tiktoken_merges.py --llama-cpp DIR --python /work/venv-torch/bin/python [--repeat 2]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
N_RANKS = 163584          # Kimi-K2: 163,840 ids = 163,584 ranks + 256 special ids

LLAMA_CPP_LOOP = r"""
import hashlib, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
from conversion.qwen import QwenModel
from tiktoken.load import load_tiktoken_bpe
mergeable_ranks = load_tiktoken_bpe(sys.argv[2])
t0, c0 = time.perf_counter(), time.process_time()
merges, vocab = [], {}
for token, rank in mergeable_ranks.items():      # DeepseekV2Model.set_vocab, "kimi-k2" branch
    vocab[QwenModel.token_bytes_to_string(token)] = rank
    if len(token) == 1:
        continue
    merged = QwenModel.bpe(mergeable_ranks, token, max_rank=rank)
    if len(merged) == 2:
        merges.append(' '.join(map(QwenModel.token_bytes_to_string, merged)))
dt, dc = time.perf_counter() - t0, time.process_time() - c0
print(dt, dc, len(merges), hashlib.sha256("\n".join(merges).encode()).hexdigest())
"""


def kimi_sized_ranks(n: int = N_RANKS, seed: int = 0, max_len: int = 16) -> list[bytes]:
    sys.path.insert(0, str(ROOT))
    from gguftool.hf.tiktoken_vocab import read_ranks

    base = read_ranks(ROOT / "fixtures" / "kimi-k2" / "tiktoken.model")
    tokens = sorted(base, key=base.__getitem__)
    seen = set(tokens)
    rng = np.random.default_rng(seed)
    while len(tokens) < n:
        m = len(tokens)
        # parts drawn mostly from the earlier (shorter) tokens, as a trained vocabulary's merges are: mean length
        # 7.6 bytes (median 7), about a 160k-token BPE vocabulary's
        a, b = (int(m * u ** 6) for u in rng.random(2))
        t = tokens[a] + tokens[b]
        if len(t) <= max_len and t not in seen:
            seen.add(t)
            tokens.append(t)
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source folder (conversion/, gguf-py/)")
    ap.add_argument("--python", required=True, help="a Python that can import llama.cpp's conversion package "
                                                    "(torch) and tiktoken")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from gguftool.hf.tiktoken_vocab import read_ranks, rebuild_merges

    tokens = kimi_sized_ranks()
    lengths = np.array([len(t) for t in tokens])
    with tempfile.TemporaryDirectory(prefix="bench-tiktoken-") as tmp:
        path = Path(tmp) / "tiktoken.model"
        path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
        print(f"vocabulary: {len(tokens)} ranks, mean token length {lengths.mean():.2f} bytes, "
              f"file {path.stat().st_size / 2**20:.1f} MiB")
        env = dict(os.environ, TIKTOKEN_CACHE_DIR="")
        for i in range(args.repeat):
            t0 = time.perf_counter()
            ranks = read_ranks(path)
            t1, c1 = time.perf_counter(), time.process_time()
            merges = rebuild_merges(ranks)
            t2, c2 = time.perf_counter(), time.process_time()
            ours = hashlib.sha256("\n".join(merges).encode()).hexdigest()
            out = subprocess.run([args.python, "-c", LLAMA_CPP_LOOP, args.llama_cpp, str(path)], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()
            wall, cpu, n, sha = float(out[0]), float(out[1]), int(out[2]), out[3]
            print(f"run {i + 1}: gguftool read {t1 - t0:.2f} s + merges {t2 - t1:.2f} s wall / {c2 - c1:.2f} s CPU "
                  f"({len(merges)} merges) | llama.cpp converter loop {wall:.2f} s wall / {cpu:.2f} s CPU ({n} merges)"
                  f" | CPU ratio llama.cpp/gguftool {cpu / (c2 - c1):.1f} | merges identical: {ours == sha} | "
                  f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

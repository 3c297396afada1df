#!/usr/bin/env python3
"""Time ``gguftool perplexity`` against llama-perplexity: same model, text, context, chunks, batch and threads.

    python scripts/bench_perplexity.py MODEL.gguf [-f fixtures/calibration/essays.txt] [-c 512] [--chunks 8]
                                       [-t 2] [--repeat 1] [--llama-bin DIR]

Both run as whole processes (loading, tokenizing, evaluating), back to back, ``--repeat`` times each (the best
wall time is kept); printed side by side: wall time, tokens/s, peak RSS (and how far above the model file's size),
the final PPL, and the ratios. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are unset for both (scripts/bench_common.py).
llama.cpp's tools come from --llama-bin (default: $LLAMA_BIN or the native build this project uses).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from bench_common import LLAMA_BIN, Run, load, ours, run, table


def ppl_of(out: str) -> str:
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    return f"PPL {m.group(1)} +/- {m.group(2)}" if m else "PPL ?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-f", "--file", default="fixtures/calibration/essays.txt")
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("-b", "--batch", type=int, default=2048)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--llama-bin", default=LLAMA_BIN)
    a = ap.parse_args(argv)
    common = ["-f", a.file, "-c", str(a.ctx), "--chunks", str(a.chunks), "-b", str(a.batch), "-t", str(a.threads)]
    cmds = {
        "gguftool perplexity": ours() + ["perplexity", a.model, *common, "-q"],
        "llama-perplexity": [os.path.join(a.llama_bin, "llama-perplexity"), "-m", a.model, *common],
    }
    best: dict[str, Run] = {}
    for _ in range(a.repeat):
        for name, cmd in cmds.items():     # back to back, so both see the same machine load
            r = run(cmd)
            if name not in best or r.wall < best[name].wall:
                best[name] = r
    size = os.path.getsize(a.model)
    tokens = a.chunks * a.ctx
    print(f"{a.model} ({size / 2**20:.0f} MiB), ctx {a.ctx}, {a.chunks} chunks ({tokens} tokens), batch {a.batch}, "
          f"{a.threads} threads, best of {a.repeat}; {load()}")
    print(table([(n, r, ppl_of(r.output)) for n, r in best.items()], tokens, size))
    o, ref = best["gguftool perplexity"], best["llama-perplexity"]
    print(f"ratio gguftool / llama.cpp: wall {o.wall / ref.wall:.2f}, peak RSS {o.max_rss / ref.max_rss:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

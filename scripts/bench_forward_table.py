#!/usr/bin/env python3
"""The forward-pass speed table: ``gguftool perplexity`` / ``imatrix`` against llama-perplexity / llama-imatrix for
several models and thread counts, each pair run back to back, as one markdown table.

    python scripts/bench_forward_table.py M-bf16.gguf M-f16.gguf M-q4_k_m.gguf M-f32.gguf [-t 1 2] [--chunks 4]
        [--tools perplexity imatrix] [--repeat 1] [--no-omp-passive] [--llama-bin DIR] [--ours-option=--exact]

One row per (tool, model, threads): wall and CPU seconds (user + system, every thread) of both processes and the
ratios gguftool / llama.cpp. Whole processes are timed (start-up, model load, tokenizing and evaluating included),
with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset (scripts/bench_common.py) and, unless ``--no-omp-passive``,
OMP_WAIT_POLICY=passive for both: on a loaded machine llama.cpp's OpenMP spin-wait otherwise inflates its wall and
CPU time. On a shared machine compare the CPU columns (and -t 1 rows); the wall ratio means something only on a
quiet one. The synthetic 1.5B model comes from ``scripts/make_synthetic_llama.py --bench`` (then quantized with
``gguftool quantize``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from bench_common import LLAMA_BIN, Run, load, ours, run


def commands(tool: str, model: str, common: list[str], llama_bin: str, tmp: str,
             extra: list[str]) -> dict[str, list[str]]:
    if tool == "perplexity":
        return {"ours": ours() + ["perplexity", model, *common, *extra, "-q"],
                "llama": [os.path.join(llama_bin, "llama-perplexity"), "-m", model, *common]}
    return {"ours": ours() + ["imatrix", model, *common, *extra, "-o", os.path.join(tmp, "ours.gguf"), "--force",
                              "-q"],
            "llama": [os.path.join(llama_bin, "llama-imatrix"), "-m", model, *common,
                      "-o", os.path.join(tmp, "ref.gguf")]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("-f", "--file", default="fixtures/calibration/essays.txt")
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("-b", "--batch", type=int, default=2048)
    ap.add_argument("-t", "--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--tools", nargs="+", choices=("perplexity", "imatrix"), default=["perplexity", "imatrix"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-omp-passive", action="store_true")
    ap.add_argument("--llama-bin", default=LLAMA_BIN)
    ap.add_argument("--ours-option", action="append", default=[], metavar="OPT",
                    help="an option for gguftool's command (repeatable), e.g. --ours-option=--exact")
    a = ap.parse_args(argv)
    if not a.no_omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "passive"     # bench_common.run passes the environment on
    print(f"ctx {a.ctx}, {a.chunks} chunks, batch {a.batch}, best of {a.repeat} (by wall); "
          f"gguftool options: {' '.join(a.ours_option) or '(none)'}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print("| tool | model | threads | wall ours s | wall llama s | wall ratio | CPU ours s | CPU llama s | CPU ratio "
          "| load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as tmp:
        for tool in a.tools:
            for model in a.models:
                for t in a.threads:
                    common = ["-f", a.file, "-c", str(a.ctx), "--chunks", str(a.chunks), "-b", str(a.batch),
                              "-t", str(t)]
                    best: dict[str, Run] = {}
                    for _ in range(a.repeat):
                        for name, cmd in commands(tool, model, common, a.llama_bin, tmp, a.ours_option).items():
                            r = run(cmd)       # back to back: both see the same machine load
                            if name not in best or r.wall < best[name].wall:
                                best[name] = r
                    o, ref = best["ours"], best["llama"]
                    print(f"| {tool} | {os.path.basename(model)} | {t} | {o.wall:.1f} | {ref.wall:.1f} | "
                          f"{o.wall / ref.wall:.2f} | {o.cpu:.1f} | {ref.cpu:.1f} | {o.cpu / ref.cpu:.2f} | "
                          f"{load().replace('load average ', '')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

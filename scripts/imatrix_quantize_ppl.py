#!/usr/bin/env python3
"""Quantize one model with two imatrix files (ours and llama-imatrix's) and compare llama-perplexity on both.

    python scripts/imatrix_quantize_ppl.py F32.gguf OURS.imatrix REF.imatrix [--type Q4_K_M] [--calib ...]
                                           [--ctx 512] [--chunks 10] [--threads 2]

The quantized files are made with ``gguftool quantize --imatrix``; perplexity is llama.cpp's
(``llama-perplexity``, the binary built from llama-cpp-python's vendored sources). Prints both perplexities,
their relative difference and how many tensors differ between the two quantized files.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


def ppl(exe, model, calib, ctx, chunks, threads):
    p = subprocess.run([exe, "-m", model, "-f", calib, "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads)],
                       capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", p.stdout + p.stderr)
    if p.returncode != 0 or not m:
        raise SystemExit(f"llama-perplexity failed:\n{(p.stdout + p.stderr)[-2000:]}")
    return float(m.group(1)), float(m.group(2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("ours")
    ap.add_argument("ref")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--calib", default="fixtures/calibration/essays.txt")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-perplexity", default="/work/ref/build/bin/llama-perplexity")
    a = ap.parse_args(argv)
    from gguftool.gguf.reader import GGUFReader
    with tempfile.TemporaryDirectory() as tmp:
        outs = []
        for tag, im in (("ours", a.ours), ("ref", a.ref)):
            out = os.path.join(tmp, f"{tag}.gguf")
            subprocess.run(["gguftool", "quantize", a.model, out, "--type", a.type, "--imatrix", im], check=True,
                           capture_output=True)
            outs.append(out)
        with GGUFReader(outs[0]) as r0, GGUFReader(outs[1]) as r1:
            n_diff = sum(1 for t in r0.tensors
                         if bytes(r0.tensor_bytes(t)) != bytes(r1.tensor_bytes(r1.tensor(t.name))))
            n_all = len(r0.tensors)
        p_ours = ppl(a.llama_perplexity, outs[0], a.calib, a.ctx, a.chunks, a.threads)
        p_ref = ppl(a.llama_perplexity, outs[1], a.calib, a.ctx, a.chunks, a.threads)
    print(f"{a.type}: tensors differing between the two quantized files: {n_diff} of {n_all}")
    print(f"perplexity with our imatrix:           {p_ours[0]:.4f} +/- {p_ours[1]:.4f}")
    print(f"perplexity with llama-imatrix's:       {p_ref[0]:.4f} +/- {p_ref[1]:.4f}")
    print(f"relative difference: {abs(p_ours[0] / p_ref[0] - 1) * 100:.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())

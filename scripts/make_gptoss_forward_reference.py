#!/usr/bin/env python3
"""Make the llama.cpp references of gpt-oss's forward pass (tests/test_gptoss_forward.py).

1. scripts/make_gptoss_checkpoint.py's MXFP4 checkpoint (seed 20: 2 layers, the first sliding with a 32-token window,
   4 experts of which 2 per token, attention sinks, YaRN) converted by ``gguftool convert --type MXFP4_MOE
   --tensor-type 'attn|token_embd|output=f32'``: MXFP4 experts as released, every other matrix F32;
2. ``llama-imatrix -m F -f fixtures/calibration/essays.txt -c 128 --chunks 4 -t 2`` ->
   fixtures/imatrix_reference/gpt-oss_ctx128.gguf (its own file) and its perplexity print;
3. ``llama-perplexity -m F -f fixtures/calibration/essays.txt -c 128 --chunks 6 -t 2`` -> its chunk figures and
   final estimate in fixtures/perplexity_reference/gpt-oss-ppl.log.

The native tools are those built from the llama.cpp that llama-cpp-python 0.3.36 vendors (``-DGGML_NATIVE=ON``, AVX2),
run with OMP_WAIT_POLICY=passive.

    python scripts/make_gptoss_forward_reference.py --llama-bin DIR [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
CALIB = ROOT / "fixtures" / "calibration" / "essays.txt"
F32_OVERRIDE = "attn|token_embd|output=f32"


def convert(work: Path) -> Path:
    """The checkpoint and its conversion (what the tests rebuild the same way)."""
    from make_gptoss_checkpoint import make_gptoss

    from gguftool.cli import main as cli

    d = make_gptoss(work / "gpt-oss")
    out = work / "gpt-oss-mxfp4-f32.gguf"
    try:
        cli(["convert", str(d), "--type", "MXFP4_MOE", "--tensor-type", F32_OVERRIDE, "-o", str(out)],
            standalone_mode=False)
    except SystemExit as e:   # click's exit in standalone mode only; kept for safety
        if e.code:
            raise
    return out


def run(exe: Path, *args: str) -> str:
    env = dict(os.environ, OMP_WAIT_POLICY="passive")
    p = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{exe.name} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin", type=Path, required=True, help="directory of llama-imatrix and llama-perplexity")
    ap.add_argument("--keep", type=Path, help="keep the checkpoint and the GGUF here")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gptoss-ref-"))
    try:
        model = convert(work)
        im_out = ROOT / "fixtures" / "imatrix_reference" / "gpt-oss_ctx128.gguf"
        log = run(args.llama_bin / "llama-imatrix", "-m", str(model), "-f", str(CALIB), "-o", str(work / "im.gguf"),
                  "-c", "128", "--chunks", "4", "-t", "2")
        shutil.copyfile(work / "im.gguf", im_out)
        print("llama-imatrix:", re.findall(r"Final estimate: PPL = [0-9.]+", log))
        log = run(args.llama_bin / "llama-perplexity", "-m", str(model), "-f", str(CALIB), "-c", "128",
                  "--chunks", "6", "-t", "2")
        lines = [ln.split(" I ")[-1] for ln in log.splitlines() if re.match(r"^(\[\d+\]|.*Final estimate)", ln)]
        (ROOT / "fixtures" / "perplexity_reference" / "gpt-oss-ppl.log").write_text("\n".join(lines) + "\n")
        print("llama-perplexity:", lines[-1])
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model, args.keep / model.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

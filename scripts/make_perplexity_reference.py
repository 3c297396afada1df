#!/usr/bin/env python3
"""Write fixtures/perplexity_reference/: base logits files and printed statistics from llama-perplexity itself.

    python scripts/make_perplexity_reference.py --llama-bin DIR [--out fixtures/perplexity_reference]

The tests cannot run llama-perplexity (CI has no native build), so its output is kept here, small:
1. the model: fixtures/tiny-llama converted to F32 by ``gguftool convert`` (what tests/test_perplexity_reference.py
   builds too), and its ``gguftool quantize --type Q4_K_M`` (byte-identical to llama-quantize's);
2. ``llama-perplexity -m F32 -f fixtures/tiny-llama-text.txt -c 128 --chunks 6 --kl-divergence-base
   llama-base.kld`` -> ``llama-base.kld`` (the base logits file written by llama.cpp, ~390 KB) and
   ``llama-base.log`` (its printed lines: the running and final perplexity);
3. ``llama-perplexity -m MODEL --kl-divergence --kl-divergence-base llama-base.kld`` for MODEL = F32 and Q4_K_M ->
   ``llama-kld-{F32,Q4_K_M}.log``: the statistics llama.cpp prints from its own base file;
4. ``gguftool perplexity F32 ... --kl-divergence-base ours-base.kld`` (a scratch file, not kept), then
   ``llama-perplexity -m Q4_K_M --kl-divergence --kl-divergence-base ours-base.kld`` -> ``llama-kld-ours-base.log``:
   llama.cpp reading a base file gguftool wrote (the other direction of the cross-reading).

Only the lines llama-perplexity prints on stdout (its LOG()) are kept: the chunk lines and the statistics, no timing
or system information (plus the ``Final estimate`` line of the base run, from stderr). Threads: 2 (--threads).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "fixtures" / "tiny-llama-text.txt"
CTX, CHUNKS = 128, 6


def run(cmd, what: str, until: str | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; with ``until``, again (up to 5 times) while its output lacks that text: llama.cpp's logger
    prints from a thread that is not waited for at exit (common/log.cpp leaks it on purpose), so the last lines of
    a short run are sometimes lost."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for _ in range(5):
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise SystemExit(f"{what} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        if until is None or until in p.stdout + p.stderr:
            return p
    raise SystemExit(f"{what}: no '{until}' in the output after 5 runs")


def printed(p: subprocess.CompletedProcess) -> str:
    """What llama-perplexity printed on stdout, without the timing line (the ETA: "0.02 minutes")."""
    return "\n".join(x for x in p.stdout.strip().splitlines() if not x.endswith(" minutes")).strip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin", required=True, help="directory with llama-perplexity")
    ap.add_argument("--out", default=str(ROOT / "fixtures" / "perplexity_reference"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    exe = Path(a.llama_bin) / "llama-perplexity"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t = ["-t", a.threads]
    gguftool = [sys.executable, "-m", "gguftool"]
    with tempfile.TemporaryDirectory(prefix="ppl-ref-") as tmp:
        f32, q4 = Path(tmp) / "tiny-f32.gguf", Path(tmp) / "tiny-Q4_K_M.gguf"
        run(gguftool + ["convert", ROOT / "fixtures" / "tiny-llama", "-o", f32, "--type", "F32"], "gguftool convert")
        run(gguftool + ["quantize", f32, q4, "--type", "Q4_K_M"], "gguftool quantize")
        base = out / "llama-base.kld"
        p = run([exe, "-m", f32, "-f", TEXT, "-c", CTX, "--chunks", CHUNKS, "--kl-divergence-base", base, *t],
                "llama-perplexity --kl-divergence-base", until="Final estimate")
        final = [x[x.index("Final estimate"):] for x in p.stderr.splitlines() if "Final estimate" in x]
        (out / "llama-base.log").write_text(printed(p) + "\n".join(final) + "\n")
        for name, model in (("F32", f32), ("Q4_K_M", q4)):
            p = run([exe, "-m", model, "--kl-divergence", "--kl-divergence-base", base, "-c", CTX, *t],
                    f"llama-perplexity --kl-divergence {name}", until="Same top p:")
            (out / f"llama-kld-{name}.log").write_text(printed(p))
        ours = Path(tmp) / "ours-base.kld"
        run(gguftool + ["perplexity", f32, "-f", TEXT, "-c", CTX, "--chunks", CHUNKS, "--kl-divergence-base", ours,
                        "-q", *t], "gguftool perplexity --kl-divergence-base")
        p = run([exe, "-m", q4, "--kl-divergence", "--kl-divergence-base", ours, "-c", CTX, *t],
                "llama-perplexity --kl-divergence on gguftool's base file", until="Same top p:")
        (out / "llama-kld-ours-base.log").write_text(printed(p))
    for f in sorted(out.iterdir()):
        print(f"{f.stat().st_size:>9}  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

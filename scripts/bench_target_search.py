#!/usr/bin/env python3
"""What ``--target-size`` costs beyond the quantization itself (issue 14: at most 10 minutes on a 1-2B model, 2 cores).

    python scripts/bench_target_search.py MODEL.gguf [--imatrix IM.gguf] [--calib TEXT] [-t 2] [--no-quantize]

1. the importance matrix: ``--imatrix`` as given, else ``gguftool imatrix MODEL -f TEXT -c 512 --chunks 4`` made
   once into /tmp/bench-target-<model>.imatrix.gguf (any imatrix does for a cost measurement);
2. the target: the file size of MODEL's stock Q4_K_M (planned, not written);
3. the search: ``gguftool quantize MODEL --target-size SIZE --imatrix IM --calib TEXT --dry-run -t T`` (everything
   ``--target-size`` adds: the stock mixes sized, the weight-error table, the forward-pass probes, the whole-model
   check; nothing written), timed as a child process: wall seconds, CPU seconds (user + system), and the tool's
   own "search: N s" line;
4. the quantization alone, for scale: ``gguftool quantize MODEL OUT --type Q4_K_M --imatrix IM -t T`` (the file is
   written to a temporary folder and deleted), timed the same way (skip it with ``--no-quantize``).

Prints one line per step and the load average before and after (the figures are only comparable on a quiet
machine: the CPU seconds much more than the wall seconds). TEXT defaults to fixtures/calibration/essays.txt.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(args: list[str]) -> tuple[float, float, str]:
    """Run ``python -m gguftool ARGS``: (wall s, CPU s of the child, its output)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "gguftool", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"failed: gguftool {' '.join(args)}\n{(p.stdout + p.stderr)[-3000:]}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall, cpu, p.stdout + p.stderr


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--imatrix", type=Path)
    ap.add_argument("--calib", type=Path, default=ROOT / "fixtures" / "calibration" / "essays.txt")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--reference", default="Q4_K_M", help="the stock mix whose size is the target")
    ap.add_argument("--no-quantize", action="store_true", help="time the search only")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from gguftool import api
    from gguftool.allocation.search import file_size

    print(f"model {a.model} ({a.model.stat().st_size / 1e9:.2f} GB), {a.threads} threads, {os.cpu_count()} cores; "
          f"load {load()}", flush=True)
    im = a.imatrix
    if im is None:
        im = Path(tempfile.gettempdir()) / f"bench-target-{a.model.stem}.imatrix.gguf"
        if not im.exists():
            wall, cpu, _ = timed(["imatrix", str(a.model), "-f", str(a.calib), "-c", "512", "--chunks", "4",
                                  "-t", str(a.threads), "-o", str(im), "-q"])
            print(f"imatrix (4 chunks of 512, made once): {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    with api.plan_quantize(a.model, None, type=a.reference, dry_run=True,
                           options=api.QuantizeOptions(imatrix=str(im))) as job:
        size = file_size(job.plan)
    print(f"target: {size:,} bytes (the stock {a.reference}'s file)", flush=True)

    wall, cpu, out = timed(["quantize", str(a.model), "--target-size", str(size), "--imatrix", str(im),
                            "--calib", str(a.calib), "--dry-run", "-t", str(a.threads)])
    m = re.search(r"search: ([0-9.]+) s", out)
    summary = [x for x in out.splitlines() if x.startswith(("allocation:", "estimated KLD", "the stock mix"))]
    print(f"search (--target-size --dry-run): {wall:.1f} s wall, {cpu:.1f} s CPU; the tool's own figure "
          f"{m.group(1) if m else '?'} s; load {load()}", flush=True)
    for line in summary:
        print(f"  {line}")
    if not a.no_quantize:
        with tempfile.TemporaryDirectory(prefix="bench-target-") as d:
            wall_q, cpu_q, _ = timed(["quantize", str(a.model), str(Path(d) / "q.gguf"), "--type", a.reference,
                                      "--imatrix", str(im), "-t", str(a.threads)])
        print(f"quantization alone (--type {a.reference}): {wall_q:.1f} s wall, {cpu_q:.1f} s CPU; load {load()}")
        print(f"search / quantization: {wall / wall_q:.2f}x wall, {cpu / cpu_q:.2f}x CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())

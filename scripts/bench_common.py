"""What scripts/bench_perplexity.py and scripts/bench_imatrix.py share: running one command as a child process and
measuring its wall time and peak RSS, and the environment both tools run in.

Peak RSS is the child's ``ru_maxrss`` (os.wait4): resident pages, file-backed ones included, so a model read
through a memory map counts in full once touched. The OpenBLAS tuning variables some machines set
(OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE) are removed from the children's environment: they select a slower kernel
than a user's machine runs (docs: REFERENCE.md, "Pitfalls measured here").
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_BIN = os.environ.get("LLAMA_BIN", "/work/llama-native/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin")


@dataclass
class Run:
    wall: float        # seconds
    max_rss: int       # bytes
    cpu: float         # user + system seconds (of every thread)
    output: str        # stdout + stderr


def bench_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run(cmd: list[str]) -> Run:
    """Run cmd (stdout and stderr captured to a temp file); SystemExit with its output's tail if it fails."""
    import tempfile
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=bench_env())
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read().decode("utf-8", "replace")
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}):\n{out[-3000:]}")
    return Run(wall, ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime, out)


def ours() -> list[str]:
    return [sys.executable, "-m", "gguftool"]


def load() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def table(rows: list[tuple[str, Run, str]], tokens: int, file_size: int) -> str:
    """One line per tool: wall, CPU time, tokens/s, peak RSS (and RSS over the model file's size), extra figure."""
    lines = [f"{'tool':<20} {'wall s':>8} {'cpu s':>8} {'tok/s':>8} {'peak RSS MiB':>13} {'RSS - file MiB':>15}  "
             "result"]
    for name, r, extra in rows:
        lines.append(f"{name:<20} {r.wall:8.2f} {r.cpu:8.2f} {tokens / r.wall:8.1f} {r.max_rss / 2**20:13.0f} "
                     f"{(r.max_rss - file_size) / 2**20:15.0f}  {extra}")
    return "\n".join(lines)


def forward_pass_args(description: str) -> argparse.ArgumentParser:
    """The arguments of the in-process forward-pass scripts (bench_forward_pass.py, profile_forward_phases.py):
    MODEL, --chunks sequences of -c tokens, -t threads."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("model")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=1)
    return ap

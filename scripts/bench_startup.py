#!/usr/bin/env python
"""Fixed start-up cost of `gguftool quantize`: a tiny file, warm numba cache, next to llama-quantize.

    python scripts/bench_startup.py [--type Q4_K_M] [--repeat 5] [--work-dir /tmp/gguftool-bench]

Quantizes the small synthetic llama (scripts/make_synthetic_llama.py --layers 1: 5 MB, made once in --work-dir)
with gguftool from this checkout (a first run fills the numba cache and is not counted), then times --repeat
runs of gguftool and of the native llama-quantize in turn. Prints the median wall and CPU (user + system) seconds of each and the load
average. Also prints `import gguftool` alone.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NATIVE_QUANTIZE = "/work/llama-native/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-quantize"

def run(cmd: list[str], env: dict) -> tuple[float, float]:
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default="/tmp/gguftool-bench")
    ap.add_argument("--llama-quantize", default=NATIVE_QUANTIZE)
    a = ap.parse_args(argv)
    env = dict(os.environ, OMP_WAIT_POLICY="passive",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                    if p]))
    os.makedirs(a.work_dir, exist_ok=True)
    model = os.path.join(a.work_dir, "synthetic-llama-1l-f32.gguf")
    out = os.path.join(a.work_dir, "startup-out.gguf")
    if not os.path.exists(model):
        subprocess.run([sys.executable, os.path.join(HERE, "make_synthetic_llama.py"), model, "--layers", "1"],
                       check=True, env=env)
    q = ["quantize", model, out, "--type", a.type, "--threads", str(a.threads), "--force"]
    cmds = {
        "gguftool": [sys.executable, "-m", "gguftool", *q],
        "llama-quantize": [a.llama_quantize, model, out, a.type, str(a.threads)],
        "python -c 'import gguftool'": [sys.executable, "-c", "import gguftool"],
    }
    run(cmds["gguftool"], env)      # fills the numba cache for this type's kernels
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for _ in range(a.repeat):
        for k, c in cmds.items():
            if os.path.exists(out):
                os.remove(out)
            res[k].append(run(c, env))
    print(f"{a.type} of {model} ({os.path.getsize(model) / 1e6:.1f} MB), {a.threads} threads, median of "
          f"{a.repeat}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'command':32} {'wall s':>7} {'CPU s':>7}")
    for k, v in res.items():
        print(f"{k:32} {statistics.median(w for w, _ in v):7.2f} {statistics.median(c for _, c in v):7.2f}")
    if os.path.exists(out):
        os.remove(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

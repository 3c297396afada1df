#!/usr/bin/env python3
"""Make fixtures/exact_forward/: llama.cpp's own intermediate tensors for the tiny Llama in BF16 and F16.

    python scripts/make_exact_forward_reference.py [--out fixtures/exact_forward]

For each type, fixtures/tiny-llama is converted by gguftool (``convert --type BF16`` / ``F16``: tensors byte-identical
with convert_hf_to_gguf.py's), then llama.cpp (llama-cpp-python's libllama, the x86 AVX2 + FMA CPU backend) evaluates
one 128-token sequence (BOS, then seeded random ids; every position outputs logits, so that the last layer keeps all
its rows: a single row would go through ggml_vec_dot_bf16/f16 instead of tinyBLAS, not emulated) with a ``cb_eval`` callback that copies the float32 tensors it
is asked for: the residual stream after each layer (l_out-L; bit for bit there means every product, norm, RoPE,
attention and SwiGLU before it was too, the BF16/F16 rounding of the next product would spread any difference).
llama.cpp's context is what llama-imatrix and
llama-perplexity use: 128 positions, one ubatch, flash attention left at auto (on for the CPU), F16 KV cache.

tests/test_exact_forward.py asserts that gguftool's forward pass gives these tensors bit for bit.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TOKENS = 128
SEED = 12


class _Tensor(ctypes.Structure):      # struct ggml_tensor (ggml.h), the fields read here and those before them
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def tokens() -> np.ndarray:
    rng = np.random.default_rng(SEED)
    t = rng.integers(3, 512, size=N_TOKENS).astype(np.int32)
    t[0] = 1                                   # BOS
    return t


def wanted(name: str) -> bool:
    return name.split("-")[0] == "l_out"


def llama_tensors(model_path: str, toks: np.ndarray) -> dict[str, np.ndarray]:
    import llama_cpp as L
    store: dict[str, np.ndarray] = {}

    @L.ggml_backend_sched_eval_callback
    def cb(tp, ask, _ud):
        t = ctypes.cast(tp, ctypes.POINTER(_Tensor)).contents
        name = t.name.decode()
        if ask:
            return wanted(name)
        if wanted(name) and t.type == 0 and name not in store:        # F32
            ne, nb = list(t.ne), list(t.nb)
            span = sum((ne[i] - 1) * nb[i] for i in range(4)) + 4
            raw = np.frombuffer((ctypes.c_char * span).from_address(t.data), dtype=np.float32)
            a = np.lib.stride_tricks.as_strided(raw, shape=ne[::-1], strides=nb[::-1])
            store[name] = np.array(a, dtype=np.float32).reshape(-1, ne[0])
        return True

    L.llama_backend_init()
    model = L.llama_model_load_from_file(model_path.encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = N_TOKENS
    cp.n_threads = cp.n_threads_batch = 2
    cp.cb_eval = cb
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(N_TOKENS, 0, 1)
    for i, tok in enumerate(toks):       # every position outputs logits, as in llama-imatrix / llama-perplexity
        batch.token[i] = int(tok)
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1
    batch.n_tokens = N_TOKENS
    if L.llama_decode(ctx, batch) != 0:
        raise SystemExit("llama_decode failed")
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return store


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures", "exact_forward"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    toks = tokens()
    with tempfile.TemporaryDirectory(prefix="exact-forward-") as tmp:
        for typ in ("BF16", "F16"):
            gguf = os.path.join(tmp, f"tiny-{typ}.gguf")
            subprocess.run([sys.executable, "-m", "gguftool", "convert", os.path.join(ROOT, "fixtures", "tiny-llama"),
                            "--type", typ, "-o", gguf], check=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": ROOT})
            got = llama_tensors(gguf, toks)
            out = os.path.join(a.out, f"tiny_llama_{typ.lower()}.npz")
            np.savez_compressed(out, tokens=toks, **got)
            print(out, sorted(got))
    return 0


if __name__ == "__main__":
    sys.exit(main())

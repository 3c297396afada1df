#!/usr/bin/env python
"""Write a synthetic llama-architecture F32 GGUF (rows a multiple of 256, or 576 wide for the fallbacks).

Used by the quantize tests (small: a few MB) and by scripts/bench_quantize.py (``--large``: about 2.4 GB).
Every dimension is a multiple of 256, so the K-quant mixes apply without row-length fallbacks, and the
GQA ratio is 4, so the n_gqa >= 4 rules fire.

The weights come from an integer hash of (seed, tensor index, element index) turned into float32 with exact
operations only (no log/sin/exp whose last bit may differ between numpy builds), so the same arguments give
the same bytes on every machine - the committed reference hashes in fixtures/quantize_reference/ rely on it.

The file is written with gguftool's streaming writer (one tensor in memory at a time).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shape:
    n_embd: int = 256
    n_ff: int = 768
    n_layer: int = 8
    n_head: int = 4
    n_head_kv: int = 1
    n_vocab: int = 1024
    tied: bool = False   # no output.weight: token_embd doubles as the output projection
    n_expert: int = 0    # > 0: Mixtral-style MoE FFN (ffn_gate_inp + ffn_{gate,up,down}_exps), 2 experts used


SMALL = Shape()
MOE = Shape(n_layer=4, n_vocab=512, n_expert=4)                                  # 3-D expert tensors
# 576 wide as SmolLM2 (9 heads of 64, 3 KV heads): rows of 576 are not a multiple of 256, so the IQ/K mixes take
# their fallback types (in the MoE variant all but the expert down projections, whose rows are 256 long)
W576 = Shape(n_embd=576, n_ff=768, n_layer=2, n_head=9, n_head_kv=3, n_vocab=512)
MOE576 = Shape(n_embd=576, n_ff=256, n_layer=2, n_head=9, n_head_kv=3, n_vocab=512, n_expert=4)
LARGE = Shape(n_embd=2048, n_ff=5632, n_layer=10, n_head=16, n_head_kv=4, n_vocab=32000)
# the forward-pass benchmark model (scripts/bench_perplexity.py, bench_imatrix.py): 1.47e9 parameters
BENCH_1_5B = Shape(n_embd=2048, n_ff=8192, n_layer=22, n_head=16, n_head_kv=4, n_vocab=32000)

# --- deterministic float32 data

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def synthetic_rows(seed: int, tensor_index: int, n_rows: int, n_cols: int, scale: float,
                   row_start: int = 0) -> np.ndarray:
    """Rows [row_start, row_start + n_rows) of a tensor: roughly normal values with per-column scales.

    The value = (sum of 4 uniforms in [0,1) - 2) * column scale * scale: an Irwin-Hall bell curve with a few
    loud columns (as real activations/weights have), computed with float32 +,-,* only.
    """
    base = np.uint64((seed * 1_000_003 + tensor_index) * 0x100000000 & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        idx = np.arange(row_start * n_cols, (row_start + n_rows) * n_cols, dtype=np.uint64)
        acc = np.zeros(idx.shape, dtype=np.float32)
        for k in range(4):
            h = _splitmix64(idx * np.uint64(4) + np.uint64(k) + base * np.uint64(7))
            acc += (h >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
        acc -= np.float32(2.0)
        col = _splitmix64(np.arange(n_cols, dtype=np.uint64) + base + np.uint64(12345))
        # 1 column in 32 is 4x louder, 1 in 256 is 16x louder
        col_scale = np.where((col & np.uint64(255)) == 0, np.float32(16.0),
                             np.where((col & np.uint64(31)) == 0, np.float32(4.0), np.float32(1.0)))
    x = acc.reshape(n_rows, n_cols) * col_scale.astype(np.float32)[None, :]
    return x * np.float32(scale)


# --- model layout


def tensor_specs(s: Shape) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, ggml shape (ne0 first), scale) in the order convert_hf_to_gguf writes them."""
    head_dim = s.n_embd // s.n_head
    kv = head_dim * s.n_head_kv
    w = 0.02
    specs = [("token_embd.weight", (s.n_embd, s.n_vocab), 0.5)]
    for i in range(s.n_layer):
        p = f"blk.{i}."
        specs += [
            (p + "attn_norm.weight", (s.n_embd,), 1.0),
            (p + "attn_q.weight", (s.n_embd, s.n_embd), w),
            (p + "attn_k.weight", (s.n_embd, kv), w),
            (p + "attn_v.weight", (s.n_embd, kv), w),
            (p + "attn_output.weight", (s.n_embd, s.n_embd), w),
            (p + "ffn_norm.weight", (s.n_embd,), 1.0),
        ]
        if s.n_expert:
            specs += [
                (p + "ffn_gate_inp.weight", (s.n_embd, s.n_expert), w),
                (p + "ffn_gate_exps.weight", (s.n_embd, s.n_ff, s.n_expert), w),
                (p + "ffn_down_exps.weight", (s.n_ff, s.n_embd, s.n_expert), w),
                (p + "ffn_up_exps.weight", (s.n_embd, s.n_ff, s.n_expert), w),
            ]
        else:
            specs += [
                (p + "ffn_gate.weight", (s.n_embd, s.n_ff), w),
                (p + "ffn_up.weight", (s.n_embd, s.n_ff), w),
                (p + "ffn_down.weight", (s.n_ff, s.n_embd), w),
            ]
    specs.append(("output_norm.weight", (s.n_embd,), 1.0))
    if not s.tied:
        specs.append(("output.weight", (s.n_embd, s.n_vocab), w))
    return specs


def _vocab(n: int):
    """A minimal SentencePiece-style vocabulary so that llama.cpp can load the model."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    i = 0
    while len(tokens) < n:
        tokens.append(f"\u2581t{i}")
        types.append(1)
        i += 1
    tokens, types = tokens[:n], types[:n]
    scores = [-float(j) for j in range(n)]
    return tokens, scores, types


def write_model(path: str, shape: Shape = SMALL, seed: int = 0, progress=None) -> int:
    """Write the model to path (gguftool's streaming writer, temp file + rename); returns its size in bytes."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gguftool.gguf.constants import GGMLType, GGUFValueType
    from gguftool.gguf.values import kv_array, kv_f32, kv_str, kv_u32
    from gguftool.gguf.writer import GGUFWriter

    if shape.n_embd % 32 or shape.n_ff % 32:
        raise ValueError("all row lengths must be multiples of 32 (the smallest quantization block)")
    tokens, scores, types = _vocab(shape.n_vocab)
    a = "llama"
    kvs = [
        kv_str("general.architecture", a), kv_str("general.name", "synthetic-llama"),
        kv_u32("general.file_type", 0),
        kv_u32(f"{a}.context_length", 2048), kv_u32(f"{a}.embedding_length", shape.n_embd),
        kv_u32(f"{a}.block_count", shape.n_layer), kv_u32(f"{a}.feed_forward_length", shape.n_ff),
        kv_u32(f"{a}.rope.dimension_count", shape.n_embd // shape.n_head),
        kv_u32(f"{a}.attention.head_count", shape.n_head), kv_u32(f"{a}.attention.head_count_kv", shape.n_head_kv),
        kv_f32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5), kv_f32(f"{a}.rope.freq_base", 10000.0),
        kv_u32(f"{a}.vocab_size", shape.n_vocab),
        *([kv_u32(f"{a}.expert_count", shape.n_expert), kv_u32(f"{a}.expert_used_count", 2)]
          if shape.n_expert else []),
        kv_str("tokenizer.ggml.model", "llama"),
        kv_array("tokenizer.ggml.tokens", GGUFValueType.STRING, tokens),
        kv_array("tokenizer.ggml.scores", GGUFValueType.FLOAT32, np.array(scores, dtype=np.float32)),
        kv_array("tokenizer.ggml.token_type", GGUFValueType.INT32, np.array(types, dtype=np.int32)),
        kv_u32("tokenizer.ggml.bos_token_id", 1), kv_u32("tokenizer.ggml.eos_token_id", 2),
        kv_u32("tokenizer.ggml.unknown_token_id", 0),
    ]
    specs = tensor_specs(shape)
    with GGUFWriter(path, overwrite=True) as w:
        w.add_kvs(kvs)
        for name, ggml_shape, _ in specs:
            w.add_tensor_info(name, ggml_shape, GGMLType.F32)
        w.write_header()
        for ti, (name, ggml_shape, scale) in enumerate(specs):
            ne0 = ggml_shape[0]
            if len(ggml_shape) == 1:
                data = np.float32(1.0) + synthetic_rows(seed, ti, 1, ne0, 0.1)
            else:
                data = synthetic_rows(seed, ti, int(np.prod(ggml_shape[1:])), ne0, scale)
            w.write_tensor_data(name, data)
            if progress:
                progress(name)
        w.finish()
    return os.path.getsize(path)


def synthetic_imatrix(tensors, n_tokens: int = 5120, chunk_count: int = 10, chunk_size: int = 512):
    """A deterministic imatrix for the given (name, ggml shape) list: one entry per matrix except token_embd,
    in_sum2 = 0.5 + 3000 u^2 with u a hashed uniform, counts = n_tokens (per expert matrix for 3-D tensors)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gguftool.importance.files import Imatrix, ImatrixEntry

    entries = {}
    for k, (name, shape) in enumerate(tensors):
        if len(shape) < 2 or "token_embd" in name:
            continue
        ne0, n_mat = shape[0], (shape[2] if len(shape) > 2 else 1)
        with np.errstate(over="ignore"):
            h = _splitmix64(np.arange(ne0 * n_mat, dtype=np.uint64) + np.uint64(k * 100003))
        u = (h >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
        sums = u * u * np.float32(3000.0) + np.float32(0.5)
        entries[name] = ImatrixEntry(sums.reshape(n_mat, ne0), np.full(n_mat, n_tokens, dtype=np.int64))
    return Imatrix(entries, ["synthetic.txt"], chunk_count, chunk_size)


def write_synthetic_imatrix(model_path: str, out_path: str, legacy: bool = False) -> None:
    """synthetic_imatrix for the tensors of a GGUF model, written as GGUF (or legacy .dat)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gguftool.gguf.reader import GGUFReader
    from gguftool.importance.files import write_imatrix_gguf, write_imatrix_legacy

    with GGUFReader(model_path) as r:
        im = synthetic_imatrix([(t.name, t.shape) for t in r.tensors])
    if legacy:
        write_imatrix_legacy(out_path, im)
    else:
        write_imatrix_gguf(out_path, im)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output .gguf path")
    ap.add_argument("--large", action="store_true", help="the ~2.4 GB benchmark model instead of the small one")
    ap.add_argument("--bench", action="store_true", help="the 1.5B-parameter forward-pass benchmark model "
                                                         "(about 5.9 GB as F32)")
    ap.add_argument("--tied", action="store_true", help="no output.weight (tied embeddings)")
    ap.add_argument("--layers", type=int, help="override the layer count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--imatrix", metavar="MODEL", help="instead: write a synthetic imatrix for MODEL to OUT "
                                                       "(legacy .dat format if OUT ends in .dat)")
    a = ap.parse_args(argv)
    if a.imatrix:
        write_synthetic_imatrix(a.imatrix, a.out, legacy=a.out.endswith(".dat"))
        return 0
    shape = BENCH_1_5B if a.bench else LARGE if a.large else SMALL
    if a.tied or a.layers:
        shape = Shape(**{**shape.__dict__, "tied": a.tied or shape.tied, "n_layer": a.layers or shape.n_layer})
    size = write_model(a.out, shape, a.seed)
    print(f"wrote {a.out}: {size / 1e6:.1f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

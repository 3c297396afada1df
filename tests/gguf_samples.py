"""Makers of small GGUF files for tests and for the shipped fixture ``fixtures/tiny.gguf``.

``python tests/gguf_samples.py`` rewrites fixtures/tiny.gguf; tests/test_inspect.py checks that the shipped
file is exactly what ``make_tiny_gguf`` writes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from gguftool.gguf.constants import GGMLType, GGUFValueType as VT
from gguftool.gguf.reader import GGUFReader
from gguftool.gguf.values import KV, GGUFArray
from gguftool.gguf.writer import GGUFWriter
from gguftool.gguf.source import split_path

TINY_FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny.gguf"


def _q8_0(x: np.ndarray) -> np.ndarray:
    """Rows of float32 -> Q8_0 blocks (fp16 scale d = amax/127, int8 round(x/d)); only for making fixtures."""
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    d = (amax / 127).astype(np.float16)
    inv = np.where(d == 0, 0, 1 / np.maximum(d.astype(np.float32), 1e-30))
    q = np.clip(np.rint(blocks * inv[:, None]), -127, 127).astype(np.int8)
    out = np.empty((blocks.shape[0], 34), np.uint8)
    out[:, :2] = d.view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out


def write_splits(src_path, prefix, n_split):
    """Split a GGUF file as llama.cpp's gguf-split does: the first split keeps every KV, each split gets
    split.no (u16), split.count (u16) and split.tensors.count (i32); tensors in order, spread over the splits."""
    paths = []
    with GGUFReader(src_path) as r:
        tensors = list(r.tensors)
        per = -(-len(tensors) // n_split)
        for i in range(n_split):
            p = split_path(str(prefix), i, n_split)
            paths.append(p)
            kvs = (list(r.kvs) if i == 0 else []) + [
                KV("split.no", VT.UINT16, i), KV("split.count", VT.UINT16, n_split),
                KV("split.tensors.count", VT.INT32, len(tensors))]
            part = tensors[i * per:(i + 1) * per]
            with GGUFWriter(p) as w:
                w.add_kvs(kvs)
                for t in part:
                    w.add_tensor_info(t.name, t.shape, t.type)
                w.write_header()
                for t in part:
                    w.write_tensor_data(t.name, r.tensor_bytes(t))
                w.finish()
    return paths


def make_tiny_gguf(path, *, overwrite: bool = False) -> Path:
    """A 1-layer llama-style GGUF (n_embd 32, vocab 32) with F32, F16 and Q8_0 tensors; deterministic."""
    rng = np.random.default_rng(20240601)
    n_embd, n_ff, n_vocab, n_head, n_head_kv = 32, 64, 32, 4, 2
    head_dim = n_embd // n_head
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(16)] + \
        ["▁the", "▁a", "▁of", "▁and", "▁to", "▁in", "▁is", "▁it", "▁that", "▁was", "▁for", "▁on", "▁GGUF"]
    assert len(tokens) == n_vocab
    kvs = [
        KV("general.architecture", VT.STRING, "llama"),
        KV("general.type", VT.STRING, "model"),
        KV("general.name", VT.STRING, "tiny"),
        KV("llama.block_count", VT.UINT32, 1),
        KV("llama.context_length", VT.UINT32, 64),
        KV("llama.embedding_length", VT.UINT32, n_embd),
        KV("llama.feed_forward_length", VT.UINT32, n_ff),
        KV("llama.attention.head_count", VT.UINT32, n_head),
        KV("llama.attention.head_count_kv", VT.UINT32, n_head_kv),
        KV("llama.rope.freq_base", VT.FLOAT32, 10000.0),
        KV("llama.attention.layer_norm_rms_epsilon", VT.FLOAT32, float(np.float32(1e-5))),
        KV("general.file_type", VT.UINT32, 7),
        KV("tokenizer.ggml.model", VT.STRING, "llama"),
        KV("tokenizer.ggml.pre", VT.STRING, "default"),
        KV("tokenizer.ggml.tokens", VT.ARRAY, GGUFArray(VT.STRING, tokens)),
        KV("tokenizer.ggml.scores", VT.ARRAY, GGUFArray(VT.FLOAT32, -np.arange(n_vocab, dtype=np.float32))),
        KV("tokenizer.ggml.token_type", VT.ARRAY,
           GGUFArray(VT.INT32, np.array([2, 3, 3] + [6] * 16 + [1] * 13, np.int32))),
        KV("tokenizer.ggml.bos_token_id", VT.UINT32, 1),
        KV("tokenizer.ggml.eos_token_id", VT.UINT32, 2),
        KV("tokenizer.ggml.unknown_token_id", VT.UINT32, 0),
        KV("tokenizer.chat_template", VT.STRING,
           "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"),
        KV("general.quantization_version", VT.UINT32, 2),
    ]

    def w(*shape_numpy):
        return (rng.standard_normal(shape_numpy) * 0.05).astype(np.float32)

    # (name, ggml shape, type, float32 data in numpy order)
    tensors = [
        ("token_embd.weight", (n_embd, n_vocab), GGMLType.Q8_0, w(n_vocab, n_embd)),
        ("output_norm.weight", (n_embd,), GGMLType.F32, np.ones(n_embd, np.float32)),
        ("blk.0.attn_norm.weight", (n_embd,), GGMLType.F32, np.ones(n_embd, np.float32)),
        ("blk.0.attn_q.weight", (n_embd, n_embd), GGMLType.Q8_0, w(n_embd, n_embd)),
        ("blk.0.attn_k.weight", (n_embd, head_dim * n_head_kv), GGMLType.Q8_0, w(head_dim * n_head_kv, n_embd)),
        ("blk.0.attn_v.weight", (n_embd, head_dim * n_head_kv), GGMLType.Q8_0, w(head_dim * n_head_kv, n_embd)),
        ("blk.0.attn_output.weight", (n_embd, n_embd), GGMLType.Q8_0, w(n_embd, n_embd)),
        ("blk.0.ffn_norm.weight", (n_embd,), GGMLType.F32, np.ones(n_embd, np.float32)),
        ("blk.0.ffn_gate.weight", (n_embd, n_ff), GGMLType.Q8_0, w(n_ff, n_embd)),
        ("blk.0.ffn_up.weight", (n_embd, n_ff), GGMLType.Q8_0, w(n_ff, n_embd)),
        ("blk.0.ffn_down.weight", (n_ff, n_embd), GGMLType.F16, w(n_embd, n_ff)),
    ]
    with GGUFWriter(path, overwrite=overwrite) as wr:
        wr.add_kvs(kvs)
        for name, shape, t, _ in tensors:
            wr.add_tensor_info(name, shape, t)
        wr.write_header()
        for name, _, t, data in tensors:
            if t == GGMLType.Q8_0:
                data = _q8_0(data)
            elif t == GGMLType.F16:
                data = data.astype(np.float16)
            wr.write_tensor_data(name, data)
    return Path(path)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else TINY_FIXTURE
    make_tiny_gguf(target, overwrite=True)
    print(f"wrote {target} ({target.stat().st_size} bytes)")

"""model.attention.flash_attention: ggml's tiled CPU flash-attention (online softmax over 64-key tiles) computes
softmax attention; checked against a float64 reference with masks that skip whole tiles, GQA heads, a soft-cap and
attention sinks. Its agreement with llama.cpp itself is test_perplexity's (tiny-llama / SmolLM2 vs
llama-cpp-python with flash attention)."""
from __future__ import annotations

import numpy as np
import pytest

from gguftool.model.attention import KV_TILE, flash_attention


def _reference(q, k, v, mask, scale, softcap=0.0, sinks=None):
    """Softmax attention in float64: q (n_q, G, D), k (n_kv, D), v (n_kv, Dv), mask (n_q, n_kv)."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("qgd,kd->qgk", q, k) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    s = s + mask[:, None, :]
    m = s.max(axis=-1, keepdims=True)
    if sinks is not None:
        m = np.maximum(m, np.asarray(sinks, np.float64)[None, :, None])
    p = np.exp(s - m)
    den = p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        den = den + np.exp(np.asarray(sinks, np.float64)[None, :, None] - m)
    return np.einsum("qgk,kd->qgd", p / den, v)


def _causal(n_q: int, n_kv: int, window: int = 0) -> np.ndarray:
    qp = np.arange(n_kv - n_q, n_kv)[:, None]
    kp = np.arange(n_kv)[None, :]
    masked = kp > qp
    if window:
        masked |= (qp - kp) >= window
    return np.where(masked, -np.inf, 0.0).astype(np.float32)


@pytest.mark.parametrize("n_q,n_kv,G,window,softcap,with_sinks", [
    (200, 200, 3, 0, 0.0, False),       # several tiles, the last one partial, GQA
    (70, 200, 1, 0, 0.0, False),        # queries at the end of a longer context
    (200, 200, 2, 50, 0.0, False),      # sliding window: rows skip whole leading tiles
    (130, 130, 2, 0, 30.0, False),      # gemma2's soft-cap
    (150, 150, 4, 0, 0.0, True),        # gpt-oss's attention sinks
    (150, 150, 2, 40, 0.0, True),       # sinks with a sliding window
])
def test_flash_attention_is_softmax_attention(n_q, n_kv, G, window, softcap, with_sinks):
    rng = np.random.default_rng(n_q * 1000 + n_kv + G)
    D, Dv = 64, 48
    q = rng.standard_normal((n_q, G, D), dtype=np.float32) * 2
    k = rng.standard_normal((n_kv, D), dtype=np.float32).astype(np.float16).astype(np.float32)
    v = rng.standard_normal((n_kv, Dv), dtype=np.float32).astype(np.float16).astype(np.float32)
    mask = _causal(n_q, n_kv, window)
    sinks = rng.standard_normal(G).astype(np.float32) * 3 if with_sinks else None
    scale = 1.0 / np.sqrt(D)
    got = flash_attention(q, k, v, mask, scale, softcap, sinks)
    assert got.dtype == np.float32 and got.shape == (n_q, G, Dv)
    want = _reference(q, k, v, mask, scale, softcap, sinks)
    assert np.abs(got - want).max() < 2e-5 * max(1.0, np.abs(want).max())


def test_running_maximum_rescales_the_accumulator():
    """A later tile with a much larger score than every earlier one: the earlier tiles' sum and accumulator are
    scaled down by exp(M_old - M_new) (a kernel that forgot would weigh them ~e^40 too much)."""
    D = 8
    n = 3 * KV_TILE
    q = np.zeros((1, 1, D), np.float32)
    q[0, 0, 0] = 1.0
    k = np.zeros((n, D), np.float32)
    k[-1, 0] = 40.0                                   # only the last key (third tile) stands out
    v = np.zeros((n, 2), np.float32)
    v[:, 0] = 1.0
    v[-1] = [0.0, 1.0]
    got = flash_attention(q, k, v, np.zeros((1, n), np.float32), 1.0)
    want = _reference(q, k, v, np.zeros((1, n), np.float32), 1.0)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-12)
    assert got[0, 0, 1] > 0.999


def test_all_masked_row_gives_zeros():
    """A row with every key masked (S == 0) is 0, as ggml writes (S_inv = 0), not NaN."""
    q = np.ones((2, 1, 4), np.float32)
    k = np.ones((3, 4), np.float32)
    v = np.ones((3, 4), np.float32)
    mask = np.zeros((2, 3), np.float32)
    mask[0] = -np.inf
    got = flash_attention(q, k, v, mask, 0.5)
    assert np.array_equal(got[0], np.zeros((1, 4), np.float32))
    assert np.allclose(got[1], 1.0)

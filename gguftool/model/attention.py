"""Causal attention computed as ggml's CPU flash-attention kernel computes it (what llama.cpp runs by default).

llama-perplexity and llama-imatrix leave ``flash_attn_type`` at ``auto``, which llama.cpp resolves to enabled when
the device (here the CPU) supports GGML_OP_FLASH_ATTN_EXT, so their attention is ``ggml_flash_attn_ext`` over the
float16 KV cache. For a prompt batch of at least 64 query rows (every perplexity / imatrix chunk) the CPU runs
``ggml_compute_forward_flash_attn_ext_tiled`` (ggml-cpu/ops.cpp), which this module follows:

- Q stays float32; K and V come from the float16 cache (the caller rounds them) and are widened to float32;
- the keys are visited in tiles of 64 (``KV_TILE``) from position 0; per query row and tile: the scores
  ``Q K^T`` in float32, times ``scale`` (with a soft-cap: ``cap * tanh(score * scale / cap)``), plus the mask;
  a tile whose scores are all -inf for a row is skipped for that row;
- online softmax: the running maximum M grows tile by tile; when it grows, the float32 accumulator and the running
  sum are scaled by ``exp(M_old - M_new)``; the tile's ``exp(score - M)`` are summed in double and added to the
  float32 running sum; the accumulator gets ``P V`` of the tile (float32);
- attention sinks (gpt-oss): after the last tile, one more logit per head that adds to the sum and to nothing else;
- the output is the accumulator times ``1 / S`` (0 where S is 0).

Bit for bit (x86 AVX2 + FMA, without a soft-cap: ``_fa_rows``): the scores are simd_gemm's FMA chain over the head
dimension, the softmax is ggml_v_expf (model.ops) on groups of 8 whose hsums go into a double, the rescale factor
is the C library's expf, and P V is accumulated by FMAs straight into the running output. With a soft-cap
(gemma2) the numpy formulation below runs: ggml's tanh and the summation order are not emulated there.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .simd import expf_lane, fma32

__all__ = ["KV_TILE", "flash_attention"]

KV_TILE = 64      # GGML_FA_TILE_KV (ggml-cpu/common.h)


def flash_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float,
                    softcap: float = 0.0, sinks: np.ndarray | None = None) -> np.ndarray:
    """Attention of the query rows of ONE KV head, as ggml's tiled CPU flash-attention kernel computes it.

    q: (n_q, G, D) float32, the G query heads that share this KV head, per query position;
    k: (n_kv, D), v: (n_kv, Dv) float32 (the KV cache's values: float16-rounded by the caller when the cache is
    float16); mask: (n_q, n_kv) float32, added to the scaled scores (0 or -inf; causal / sliding window);
    scale: the score scale (1/sqrt(D) usually); softcap: the logit soft-cap (0: none);
    sinks: (G,) float32 attention-sink logits of the G heads (gpt-oss), or None.
    Returns (n_q, G, Dv) float32.
    """
    n_q, G, D = q.shape
    n_kv, Dv = v.shape
    f32 = np.float32
    R = n_q * G
    if not softcap:
        out = np.empty((R, Dv), dtype=f32)
        has_sinks = sinks is not None
        sk = np.asarray(sinks, dtype=f32) if has_sinks else np.zeros(G, dtype=f32)
        _fa_rows(np.ascontiguousarray(q, dtype=f32).reshape(R, D), np.ascontiguousarray(k.T, dtype=f32),
                 np.ascontiguousarray(v, dtype=f32), np.ascontiguousarray(mask, dtype=f32), f32(scale), G, sk,
                 has_sinks, out)
        return out.reshape(n_q, G, Dv)
    qr = np.ascontiguousarray(q, dtype=f32).reshape(R, D)
    sc = f32(scale)
    cap = f32(softcap)
    if cap:
        sc = f32(sc / cap)        # ggml: scale /= logit_softcap, then softcap * tanh(s * scale)
    M = np.full(R, -np.inf, dtype=f32)
    S = np.zeros(R, dtype=f32)
    acc = np.zeros((R, Dv), dtype=f32)
    for c0 in range(0, n_kv, KV_TILE):
        c1 = min(n_kv, c0 + KV_TILE)
        mt = mask[:, c0:c1]
        if not (mt > -np.inf).any():      # every row masked in this tile: skipped
            continue
        kq = qr @ k[c0:c1].T              # (R, tile)
        kq *= sc
        if cap:
            np.tanh(kq, out=kq)
            kq *= cap
        kq = kq.reshape(n_q, G, c1 - c0)
        kq += mt[:, None, :]
        kq = kq.reshape(R, c1 - c0)
        tmax = kq.max(axis=1)
        live = tmax > -np.inf
        m_new = np.where(live, np.maximum(M, tmax), M)
        grow = m_new > M
        if grow.any():
            ms = np.exp(M[grow] - m_new[grow])     # 0 where M was -inf
            acc[grow] *= ms[:, None]
            S[grow] *= ms
        M = m_new
        if live.all():
            kq -= M[:, None]
        else:
            kq[live] -= M[live, None]
            kq[~live] = -np.inf                    # rows skipped in this tile contribute nothing
        p = np.exp(kq, out=kq)
        S = (S.astype(np.float64) + p.sum(axis=1, dtype=np.float64)).astype(f32)
        acc += p @ v[c0:c1]
    if sinks is not None:
        s = np.tile(np.asarray(sinks, dtype=f32), n_q)        # row r is head r % G
        up = s > M
        ms = np.where(up, np.exp(np.where(up, M - s, f32(0))), f32(1)).astype(f32)
        vs = np.where(up, f32(1), np.exp(np.where(up, f32(0), s - M))).astype(f32)
        acc *= ms[:, None]
        S = S * ms + vs
    inv = np.zeros_like(S)
    np.divide(f32(1), S, out=inv, where=S != 0)
    acc *= inv[:, None]
    return acc.reshape(n_q, G, Dv)


# --- the tiled kernel, bit for bit (x86 AVX2 + FMA)
_ROWS = 4         # query rows whose scores are computed together (K's tile is read once for them)


@njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
def _fa_rows(q, kt, v, mask, scale, G, sinks, has_sinks, out):
    """Every query row (R = n_q * G rows, row r is position r // G, head r % G) as the tiled kernel computes it:
    scores by simd_gemm (a sequential FMA chain over the head dimension, from 0), times ``scale``, plus the mask;
    the tile's softmax by ggml_vec_soft_max_f32 (ggml_v_expf on groups of 8, each group's hsum added to a double);
    the rescale factor by the C library's expf; P V accumulated by simd_gemm straight into the running output (an
    FMA chain over the tile's 64 keys, masked ones contributing exact zeros). kt is K transposed (D, n_kv).

    Arranged for the vector units, each value's operations in ggml's order: the scores of _ROWS query rows at once
    (d outer, the tile's keys inner, K's tile row read once for them), the exponentials by the branch-free
    ``simd.expf_lane`` over the tile, P V over the value dimension; inner loops run over 1-D row views (numba
    vectorizes those, not 2-D indexing) and nothing is allocated per value (the bit casts of the first version
    allocated two arrays per exponential: 10x the time of the whole numpy attention it replaced)."""
    R, D = q.shape
    n_kv = kt.shape[1]
    Dv = v.shape[1]
    f32 = np.float32
    ninf = f32(-np.inf)
    kq = np.empty((_ROWS, KV_TILE), dtype=f32)
    acc = np.empty((_ROWS, Dv), dtype=f32)
    Ms = np.empty(_ROWS, dtype=f32)
    Ss = np.empty(_ROWS, dtype=f32)
    live = np.empty(_ROWS, dtype=np.bool_)
    for r0 in range(0, R, _ROWS):
        nr = min(_ROWS, R - r0)
        for i in range(nr):
            Ms[i] = ninf
            Ss[i] = f32(0.0)
            acc[i, :] = f32(0.0)
        for c0 in range(0, n_kv, KV_TILE):
            nj = min(KV_TILE, n_kv - c0)
            any_live = False
            for i in range(nr):
                mrow = mask[(r0 + i) // G, c0:c0 + nj]
                lv = False
                for j in range(nj):
                    if mrow[j] != ninf:
                        lv = True
                        break
                live[i] = lv
                any_live = any_live or lv
            if not any_live:
                continue                      # nothing of this tile for these rows (ggml: skipped, or P = 0)
            kq[:nr, :] = f32(0.0)
            D4 = D - D % 4
            for d in range(0, D4, 4):         # each row's FMA chain over d, vectorized over the tile's keys,
                k0 = kt[d, c0:c0 + nj]        # four steps of it per load and store of the running scores
                k1 = kt[d + 1, c0:c0 + nj]
                k2 = kt[d + 2, c0:c0 + nj]
                k3 = kt[d + 3, c0:c0 + nj]
                for i in range(nr):
                    qr = q[r0 + i]
                    q0 = qr[d]
                    q1 = qr[d + 1]
                    q2 = qr[d + 2]
                    q3 = qr[d + 3]
                    a = kq[i]
                    for j in range(nj):
                        a[j] = fma32(q3, k3[j], fma32(q2, k2[j], fma32(q1, k1[j], fma32(q0, k0[j], a[j]))))
            for d in range(D4, D):
                krow = kt[d, c0:c0 + nj]
                for i in range(nr):
                    qd = q[r0 + i, d]
                    a = kq[i]
                    for j in range(nj):
                        a[j] = fma32(qd, krow[j], a[j])
            for i in range(nr):
                if not live[i]:
                    continue
                a = kq[i]
                mrow = mask[(r0 + i) // G, c0:c0 + nj]
                for j in range(nj):
                    a[j] = a[j] * scale + mrow[j]
                for j in range(nj, KV_TILE):
                    a[j] = ninf
                tmax = ninf
                for j in range(KV_TILE):
                    if a[j] > tmax:
                        tmax = a[j]
                M = Ms[i]
                S = Ss[i]
                m_new = max(M, tmax)
                arow = acc[i]
                if m_new > M:
                    ms = np.float32(math.exp(M - m_new))      # expf (0 while M is -inf)
                    for d in range(Dv):
                        arow[d] *= ms
                    S *= ms
                M = m_new
                for j in range(KV_TILE):
                    a[j] = expf_lane(a[j] - M)
                tot = np.float64(0.0)
                for g0 in range(0, KV_TILE, 8):
                    h0 = a[g0] + a[g0 + 4]
                    h1 = a[g0 + 1] + a[g0 + 5]
                    h2 = a[g0 + 2] + a[g0 + 6]
                    h3 = a[g0 + 3] + a[g0 + 7]
                    tot += np.float64((h0 + h2) + (h1 + h3))
                Ss[i] = f32(np.float64(S) + tot)
                Ms[i] = M
                j = 0
                while j < nj:
                    if j + 4 <= nj and a[j] != f32(0.0) and a[j + 1] != f32(0.0) and a[j + 2] != f32(0.0) \
                            and a[j + 3] != f32(0.0):       # four steps of the chain per load and store
                        p0 = a[j]
                        p1 = a[j + 1]
                        p2 = a[j + 2]
                        p3 = a[j + 3]
                        v0 = v[c0 + j]
                        v1 = v[c0 + j + 1]
                        v2 = v[c0 + j + 2]
                        v3 = v[c0 + j + 3]
                        for d in range(Dv):
                            arow[d] = fma32(p3, v3[d], fma32(p2, v2[d], fma32(p1, v1[d], fma32(p0, v0[d], arow[d]))))
                        j += 4
                        continue
                    pj = a[j]
                    if pj != f32(0.0):           # an exact no-op in the FMA chain otherwise
                        vrow = v[c0 + j]
                        for d in range(Dv):
                            arow[d] = fma32(pj, vrow[d], arow[d])
                    j += 1
        for i in range(nr):
            r = r0 + i
            M = Ms[i]
            S = Ss[i]
            arow = acc[i]
            if has_sinks:
                sv = sinks[r % G]
                if sv > M:
                    ms = np.float32(math.exp(M - sv))
                    for d in range(Dv):
                        arow[d] *= ms
                    S = S * ms + f32(1.0)
                else:
                    S = S + np.float32(math.exp(sv - M))
            inv = f32(0.0) if S == f32(0.0) else f32(1.0) / S
            orow = out[r]
            for d in range(Dv):
                orow[d] = arow[d] * inv

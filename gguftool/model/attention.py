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
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .simd import IR_I32 as _I32
from .simd import IR_I64 as _I64
from .simd import IR_V8F as _V8F
from .simd import element_pointer, expf_lane, fma_v8f32, row_pointers

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
        # padded to whole tiles: rows to _ROWS (zero queries), keys to KV_TILE (zero keys and values, masked
        # out), value columns to _COLS (zero values); the padding adds exact zeros to nothing that is returned
        Rp = -(-R // _ROWS) * _ROWS
        n_kvp = -(-n_kv // KV_TILE) * KV_TILE
        Dvp = -(-Dv // _COLS) * _COLS
        n_qp = -(-Rp // G)
        qp = np.zeros((Rp, D), dtype=f32)
        qp[:R] = q.reshape(R, D)
        kt = np.zeros((D, n_kvp), dtype=f32)
        kt[:, :n_kv] = k.T
        vp = np.zeros((n_kvp, Dvp), dtype=f32)
        vp[:n_kv, :Dv] = v
        mp = np.full((n_qp, n_kvp), -np.inf, dtype=f32)
        mp[:n_q, :n_kv] = mask
        out = np.empty((Rp, Dvp), dtype=f32)
        has_sinks = sinks is not None
        sk = np.asarray(sinks, dtype=f32) if has_sinks else np.zeros(G, dtype=f32)
        _fa_rows(qp, kt, vp, mp, f32(scale), G, sk, has_sinks, out)
        return out[:R, :Dv].reshape(n_q, G, Dv)
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
_ROWS = 6         # query rows of a register tile (the scores' and P V's)
_COLS = 16        # columns of a register tile: keys of the scores, value dimensions of P V (two <8 x float>)


def _make_fma_tile(accumulate: bool):
    """An intrinsic ``tile(a, ia, lda, b, ib, ldb, n, c, ic, ldc)`` on flat float32 arrays: for the _ROWS x _COLS
    outputs ``c[ic + i * ldc + j]``, the FMA chain ``acc = fma(a[ia + i * lda + t], b[ib + t * ldb + j], acc)`` over
    t = 0 .. n-1 in order, from 0 (or, ``accumulate``, from c's values), stored into c. Each output is its own
    sequential chain (ggml's simd_gemm order); the tile keeps its _ROWS x 2 ``<8 x float>`` chains in registers
    (a's value broadcast, b's 16 values loaded as two vectors), where numba's loops went through memory."""
    def impl(typingctx, a, ia, lda, b, ib, ldb, n, c, ic, ldc):
        if not all(isinstance(x, types.Array) and x.dtype == types.float32 for x in (a, b, c)):
            return None

        def codegen(context, builder, signature, args):
            a_, ia_, lda_, b_, ib_, ldb_, n_, c_, ic_, ldc_ = args
            at, _, _, bt, _, _, _, ct = signature.args[:8]
            pb = element_pointer(builder, context, bt, b_)
            a_rows = row_pointers(builder, element_pointer(builder, context, at, a_), ia_, lda_, _ROWS)
            c_ptrs = [[builder.bitcast(builder.gep(r, [ir.Constant(_I64, 8 * h)]), _V8F.as_pointer()) for h in (0, 1)]
                      for r in row_pointers(builder, element_pointer(builder, context, ct, c_), ic_, ldc_, _ROWS)]
            zero = ir.Constant(_V8F, [0.0] * 8)
            init = [[builder.load(p, align=4) if accumulate else zero for p in row] for row in c_ptrs]
            fma = fma_v8f32(builder)
            entry = builder.block
            loop = builder.append_basic_block("fma_tile_t")
            done = builder.append_basic_block("fma_tile_done")
            builder.cbranch(builder.icmp_signed(">", n_, ir.Constant(_I64, 0)), loop, done)
            builder.position_at_end(loop)
            t = builder.phi(_I64)
            t.add_incoming(ir.Constant(_I64, 0), entry)
            phis = [[builder.phi(_V8F) for _ in (0, 1)] for _ in range(_ROWS)]
            for row, row_init in zip(phis, init):
                for p, v in zip(row, row_init):
                    p.add_incoming(v, entry)
            pb_t = builder.gep(pb, [builder.add(ib_, builder.mul(t, ldb_))])
            bv = [builder.load(builder.bitcast(builder.gep(pb_t, [ir.Constant(_I64, 8 * h)]), _V8F.as_pointer()),
                               align=4) for h in (0, 1)]
            new = []
            for i in range(_ROWS):
                s = builder.load(builder.gep(a_rows[i], [t]), align=4)
                splat = builder.shuffle_vector(builder.insert_element(ir.Constant(_V8F, ir.Undefined), s,
                                                                      ir.Constant(_I32, 0)),
                                               ir.Constant(_V8F, ir.Undefined), ir.Constant(ir.VectorType(_I32, 8),
                                                                                            [0] * 8))
                new.append([builder.call(fma, [splat, bv[h], phis[i][h]]) for h in (0, 1)])
            t_next = builder.add(t, ir.Constant(_I64, 1))
            t.add_incoming(t_next, loop)
            for row, row_new in zip(phis, new):
                for p, v in zip(row, row_new):
                    p.add_incoming(v, loop)
            builder.cbranch(builder.icmp_signed("<", t_next, n_), loop, done)
            builder.position_at_end(done)
            results = []
            for i in range(_ROWS):
                for h in (0, 1):
                    res = builder.phi(_V8F)
                    res.add_incoming(init[i][h], entry)
                    res.add_incoming(new[i][h], loop)
                    results.append((res, c_ptrs[i][h]))
            for res, ptr in results:
                builder.store(res, ptr, align=4)
            return context.get_dummy_value()

        return types.none(a, types.int64, types.int64, b, types.int64, types.int64, types.int64, c, types.int64,
                          types.int64), codegen

    impl.__name__ = impl.__qualname__ = "_fma_tile_acc" if accumulate else "_fma_tile"
    return intrinsic(impl)


_fma_tile = _make_fma_tile(accumulate=False)
_fma_tile_acc = _make_fma_tile(accumulate=True)


@njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
def _fa_rows(q, kt, v, mask, scale, G, sinks, has_sinks, out):
    """Every query row (R = n_q * G rows, row r is position r // G, head r % G) as the tiled kernel computes it:
    scores by simd_gemm (a sequential FMA chain over the head dimension, from 0), times ``scale``, plus the mask;
    the tile's softmax by ggml_vec_soft_max_f32 (ggml_v_expf on groups of 8, each group's hsum added to a double);
    the rescale factor by the C library's expf; P V accumulated by simd_gemm straight into the running output (an
    FMA chain over the tile's 64 keys, masked ones contributing exact zeros). kt is K transposed (D, n_kv).

    Shapes are whole tiles (the caller pads): R a multiple of _ROWS, n_kv of KV_TILE, v's columns of _COLS, mask
    (R / G rounded up, n_kv). The scores and P V run in register tiles (:func:`_make_fma_tile`), _ROWS query rows
    at a time; the softmax's exponentials by the branch-free ``simd.expf_lane`` over the tile."""
    R, D = q.shape
    n_kv = kt.shape[1]
    Dv = v.shape[1]
    f32 = np.float32
    ninf = f32(-np.inf)
    qf = q.reshape(-1)
    ktf = kt.reshape(-1)
    vf = v.reshape(-1)
    kq = np.empty((_ROWS, KV_TILE), dtype=f32)
    kqf = kq.reshape(-1)
    acc = np.empty((_ROWS, Dv), dtype=f32)
    accf = acc.reshape(-1)
    Ms = np.empty(_ROWS, dtype=f32)
    Ss = np.empty(_ROWS, dtype=f32)
    live = np.empty(_ROWS, dtype=np.bool_)
    for r0 in range(0, R, _ROWS):
        for i in range(_ROWS):
            Ms[i] = ninf
            Ss[i] = f32(0.0)
            acc[i, :] = f32(0.0)
        for c0 in range(0, n_kv, KV_TILE):
            any_live = False
            for i in range(_ROWS):
                mrow = mask[(r0 + i) // G, c0:c0 + KV_TILE]
                lv = False
                for j in range(KV_TILE):
                    if mrow[j] != ninf:
                        lv = True
                        break
                live[i] = lv
                any_live = any_live or lv
            if not any_live:
                continue                      # nothing of this tile for these rows (ggml: skipped, or P = 0)
            for j0 in range(0, KV_TILE, _COLS):
                _fma_tile(qf, r0 * D, D, ktf, c0 + j0, n_kv, D, kqf, j0, KV_TILE)
            for i in range(_ROWS):
                a = kq[i]
                if not live[i]:               # the tile is skipped for this row: P = 0 adds nothing below
                    a[:] = f32(0.0)
                    continue
                mrow = mask[(r0 + i) // G, c0:c0 + KV_TILE]
                for j in range(KV_TILE):
                    a[j] = a[j] * scale + mrow[j]
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
            for d0 in range(0, Dv, _COLS):
                _fma_tile_acc(kqf, 0, KV_TILE, vf, c0 * Dv + d0, Dv, KV_TILE, accf, d0, Dv)
        for i in range(_ROWS):
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

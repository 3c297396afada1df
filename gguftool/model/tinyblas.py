"""F16 / BF16 matrix products summed in the order of llama.cpp's tinyBLAS on x86 AVX2 (bit for bit).

Why: ggml's CPU matmul of an F16 or BF16 weight rounds the activations to the weight's type and hands both to
llamafile's tinyBLAS (``llamafile/sgemm.cpp``, ``tinyBLAS<8, __m256, __m256, T, T, float>`` on AVX2; AVX2 has no
BF16 dot-product instruction). Each output value there is: eight float32 lanes, lane ``t`` summing
``a[k] * b[k]`` for ``k = t, t+8, t+16, ...`` in order (``madd`` = FMA, but the product of two F16 or two BF16
values is exact in float32, so FMA and multiply-then-add round the same), then ``hsum``: lanes ``t`` and ``t+4``
added, then ``(0+2) + (1+3)`` of those. A float32 BLAS GEMM sums the same exact products in another order, which
changes the last bits of ~3/4 of the outputs; the next rounding of the activations to BF16 (2^-8 steps) or of K/V
to the float16 cache turns those last bits into whole-step differences now and then, and within two or three layers
the two passes have drifted apart by the noise of BF16 rounding itself (llama-imatrix's in_sum2 of a SmolLM2 BF16
model ~1.4e-3 relative L2 away, where the issue allows 1e-3). Summing as tinyBLAS does removes that seed.

Used when tinyBLAS takes the product (``tinyBLAS::matmul``): K a multiple of 8 and the weight's row count a
multiple of 4. Otherwise ggml falls back to ``ggml_vec_dot_f16/bf16`` (another order), which is not emulated: the
caller uses BLAS then.

How it is fast: as tinyBLAS itself, a register tile of activation rows x weight rows, one ``<8 x float>``
accumulator per output, loaded and widened in the loop from the operands' stored form: F16 through vcvtph2ps
(LLVM ``fpext`` of ``<8 x half>``), BF16 by a 16-bit shift, so that a F16 weight is read straight from the file's
memory map at half the bytes of float32 and never widened into a scratch buffer. The tile's loop over k is written
in LLVM IR (an intrinsic, :func:`_tile`): numba cannot express vector registers, and LLVM's own vectorizer
reassociates nothing here (every sum is an explicit lane-wise FMA chain), so the order is tinyBLAS's by
construction. One thread (nogil); the forward pass's workers call it on their own blocks of weight rows. Measured on
the 2-core EPYC (Zen 3, AVX2), M = 2048, K = 2048 and 8192, 512-2048 weight rows, one thread: F16 x F16 80-90
GFLOPS (4 x 2 tile; OpenBLAS sgemm on float32 of those shapes: 89-93), float32 x BF16 63-72 (3 x 4 tile; widening
BF16 costs two vector instructions a load), float32 x float32 ~55 (twice the bytes).

The operands' element format is told by their dtype: float32 values, uint16 F16 bits, int16 BF16 bits.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .simd import IR_I16 as _I16
from .simd import IR_I32 as _I32
from .simd import IR_I64 as _I64
from .simd import IR_V8F as _V8F
from .simd import element_pointer, fma_v8f32, row_pointers

__all__ = ["LANES", "tinyblas_applies", "tinyblas_matmul"]

LANES = 8          # __m256 float lanes (tinyBLAS's KN on AVX2)
BLOCK_BYTES = 1 << 18   # weight rows multiplied by all activation rows before the next ones: L2-sized


def tinyblas_applies(k: int, weight_rows: int) -> bool:
    """Whether tinyBLAS takes an F16/BF16 product with inner size k and a weight of ``weight_rows`` rows."""
    return k % LANES == 0 and weight_rows % 4 == 0


def _load_lanes(builder, dtype, ptr):
    """Eight consecutive elements at ``ptr`` as ``<8 x float>``: float32 loaded, F16 (uint16) widened by fpext
    (vcvtph2ps), BF16 (int16) zero-extended and shifted into the high half."""
    if dtype == types.float32:
        return builder.load(builder.bitcast(ptr, _V8F.as_pointer()), align=4)
    raw = builder.load(builder.bitcast(ptr, ir.VectorType(_I16, LANES).as_pointer()), align=2)
    if dtype == types.uint16:
        return builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), LANES)), _V8F)
    wide = builder.zext(raw, ir.VectorType(_I32, LANES))
    return builder.bitcast(builder.shl(wide, ir.Constant(ir.VectorType(_I32, LANES), [16] * LANES)), _V8F)


def _hsum(builder, v):
    """tinyBLAS's hsum(__m256): lanes t and t+4 added, then (0 + 2) + (1 + 3)."""
    def part(idx):
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 4), idx))
    s = builder.fadd(part([4, 5, 6, 7]), part([0, 1, 2, 3]))
    e = [builder.extract_element(s, ir.Constant(_I32, i)) for i in range(4)]
    return builder.fadd(builder.fadd(e[0], e[2]), builder.fadd(e[1], e[3]))


def _tile_shape_of(x_dtype, edge: bool) -> tuple[int, int]:
    """(activation rows, weight rows) of a tile: 4 x 2 when the activations are 16-bit (F16: 80-90 GFLOPS), 3 x 4
    when they are float32 (BF16: 63-72, where 4 x 2 gives ~50); 1 x 1 for the ``edge`` rows: the order of each
    output's sum does not depend on the tile, so any tile gives the same bits."""
    if edge:
        return 1, 1
    return (3, 4) if x_dtype == types.float32 else (4, 2)


def _make_tile(edge: bool):
    """An intrinsic ``tile(x, ix, ldx, w, iw, ldw, k) -> (nt * nr float32)``: the outputs of activation rows
    ``ix + i * ldx`` times weight rows ``iw + j * ldw`` (flat element offsets; k elements each, k % 8 == 0), in
    tinyBLAS's order, row-major (i, j); the tile shape (nt, nr) follows x's dtype (:func:`_tile_shape_of`), or is
    1 x 1 for ``edge``."""
    def impl(typingctx, x, ix, ldx, w, iw, ldw, k):
        ok = (types.float32, types.uint16, types.int16)
        if not (isinstance(x, types.Array) and isinstance(w, types.Array) and x.dtype in ok and w.dtype in ok):
            return None
        nt, nr = _tile_shape_of(x.dtype, edge)
        ret = types.UniTuple(types.float32, nt * nr)

        def codegen(context, builder, signature, args):
            xt, _, _, wt = signature.args[:4]
            x_, ix_, ldx_, w_, iw_, ldw_, k_ = args
            x_rows = row_pointers(builder, element_pointer(builder, context, xt, x_), ix_, ldx_, nt)
            w_rows = row_pointers(builder, element_pointer(builder, context, wt, w_), iw_, ldw_, nr)
            fma = fma_v8f32(builder)
            entry = builder.block
            loop = builder.append_basic_block("tile_k")
            done = builder.append_basic_block("tile_done")
            builder.branch(loop)
            builder.position_at_end(loop)
            kk = builder.phi(_I64)
            kk.add_incoming(ir.Constant(_I64, 0), entry)
            phis = []
            for _ in range(nt * nr):
                p = builder.phi(_V8F)
                p.add_incoming(ir.Constant(_V8F, [0.0] * LANES), entry)
                phis.append(p)
            acc = list(phis)
            xs = [_load_lanes(builder, xt.dtype, builder.gep(r, [kk])) for r in x_rows]
            for j, r in enumerate(w_rows):
                wv = _load_lanes(builder, wt.dtype, builder.gep(r, [kk]))
                for i in range(nt):
                    acc[i * nr + j] = builder.call(fma, [xs[i], wv, acc[i * nr + j]])
            nxt = builder.add(kk, ir.Constant(_I64, LANES))
            kk.add_incoming(nxt, loop)
            for p, v in zip(phis, acc):
                p.add_incoming(v, loop)
            builder.cbranch(builder.icmp_signed("<", nxt, k_), loop, done)
            builder.position_at_end(done)
            return context.make_tuple(builder, ret, [_hsum(builder, v) for v in acc])

        return ret(x, types.int64, types.int64, w, types.int64, types.int64, types.int64), codegen

    impl.__name__ = impl.__qualname__ = "_tile_edge" if edge else "_tile"
    return intrinsic(impl)


_tile = _make_tile(edge=False)
_tile_edge = _make_tile(edge=True)


@intrinsic
def _tile_shape(typingctx, x):
    """(nt, nr) of ``_tile`` for activations x, as compile-time constants."""
    nt, nr = _tile_shape_of(x.dtype, False)
    ret = types.UniTuple(types.int64, 2)

    def codegen(context, builder, signature, args):
        return context.make_tuple(builder, ret, [ir.Constant(_I64, nt), ir.Constant(_I64, nr)])

    return ret(x), codegen


@njit(cache=True, nogil=True, boundscheck=False)
def _tinyblas_rows(x, w, out, block):
    """out (M, R) = x (M, K) @ w (R, K).T, each value as tinyBLAS sums it; x, w C-contiguous (formats: module
    docstring), K % 8 == 0. Weight rows in blocks of ``block`` (L2-sized); within a block, activation tiles outer
    and weight tiles inner: the tile's activation rows stay in L1 while the block's weight rows come from L2."""
    M, K = x.shape
    R = w.shape[0]
    xf = x.reshape(-1)
    wf = w.reshape(-1)
    nt, nr = _tile_shape(x)
    mb = M - M % nt
    rb = R - R % nr
    for r0 in range(0, rb, block):
        r1 = min(rb, r0 + block)
        for t in range(0, mb, nt):
            for r in range(r0, r1, nr):
                s = _tile(xf, t * K, K, wf, r * K, K, K)
                for i in range(nt):
                    for j in range(nr):
                        out[t + i, r + j] = s[i * nr + j]
    for t in range(0, mb, nt):
        for r in range(rb, R):
            for i in range(nt):
                out[t + i, r] = _tile_edge(xf, (t + i) * K, K, wf, r * K, K, K)[0]
    for t in range(mb, M):
        for r in range(R):
            out[t, r] = _tile_edge(xf, t * K, K, wf, r * K, K, K)[0]


def tinyblas_matmul(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out[:] = x @ w.T summed as tinyBLAS does. x (M, K): float32 holding F16/BF16 values, or uint16 F16 bits;
    w (R, K): float32 holding F16/BF16 values, uint16 F16 bits or int16 BF16 bits; K % 8 == 0. ``out`` (M, R) float32
    may be a column slice of a bigger array."""
    if x.shape[1] % LANES:
        raise ValueError(f"tinyblas_matmul: K = {x.shape[1]} is not a multiple of {LANES}")
    block = max(4, BLOCK_BYTES // (x.shape[1] * w.itemsize) // 4 * 4)     # a multiple of both tiles' nr
    _tinyblas_rows(np.ascontiguousarray(x), np.ascontiguousarray(w), out, block)

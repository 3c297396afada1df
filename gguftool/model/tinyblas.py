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

The kernel runs in one thread (nogil); the forward pass's workers call it on their own blocks of weight rows.
Layout: the weight block is transposed into a scratch (K, rows) first, so that the innermost loop runs over
contiguous output columns and compiles to SIMD multiply-adds without reordering any sum.
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["LANES", "tinyblas_applies", "tinyblas_matmul"]

LANES = 8          # __m256 float lanes (tinyBLAS's KN on AVX2)
_COLS = 128        # output columns per accumulator tile: 4 rows x 8 lanes x 128 float32 = 16 KiB (L1)


def tinyblas_applies(k: int, weight_rows: int) -> bool:
    """Whether tinyBLAS takes an F16/BF16 product with inner size k and a weight of ``weight_rows`` rows."""
    return k % LANES == 0 and weight_rows % 4 == 0


@njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
def _tinyblas_rows(x, w, out):
    """out (M, R) = x (M, K) @ w (R, K).T, each value as tinyBLAS sums it (8 lanes over k, then hsum); x and w hold
    F16/BF16 values widened to float32, so every product is exact."""
    M, K = x.shape
    R = w.shape[0]
    wt = np.empty((K, R), dtype=np.float32)
    for j in range(R):
        for k in range(K):
            wt[k, j] = w[j, k]
    acc = np.empty((4, LANES, _COLS), dtype=np.float32)
    zero = np.float32(0.0)
    for r0 in range(0, M, 4):
        nr = min(4, M - r0)
        for j0 in range(0, R, _COLS):
            jn = min(_COLS, R - j0)
            acc[:] = zero
            for k in range(K):
                lane = k % LANES
                x0 = x[r0, k]
                x1 = x[r0 + 1, k] if nr > 1 else zero
                x2 = x[r0 + 2, k] if nr > 2 else zero
                x3 = x[r0 + 3, k] if nr > 3 else zero
                a0 = acc[0, lane]
                a1 = acc[1, lane]
                a2 = acc[2, lane]
                a3 = acc[3, lane]
                wr = wt[k, j0:j0 + jn]
                for j in range(jn):
                    wv = wr[j]
                    a0[j] += x0 * wv
                    a1[j] += x1 * wv
                    a2[j] += x2 * wv
                    a3[j] += x3 * wv
            for r in range(nr):
                a = acc[r]
                for j in range(jn):
                    # hsum(__m256): (l0+l4), (l1+l5), (l2+l6), (l3+l7); then (.0 + .2) + (.1 + .3)
                    out[r0 + r, j0 + j] = ((a[0, j] + a[4, j]) + (a[2, j] + a[6, j])) + \
                                          ((a[1, j] + a[5, j]) + (a[3, j] + a[7, j]))


def tinyblas_matmul(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out[:] = x @ w.T summed as tinyBLAS does (x (M, K), w (R, K) float32 holding F16/BF16 values; K % 8 == 0).
    ``out`` (M, R) may be a column slice of a bigger array."""
    _tinyblas_rows(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(w, dtype=np.float32), out)

"""The activations a matrix product sees in ggml's CPU backend, for each stored weight type.

A quantized (or F16/BF16) weight is multiplied on the CPU with the activations converted to the weight type's
``vec_dot_type`` (ggml-cpu.c type_traits_cpu): F16 / BF16 rounding, or 8-bit blocks (Q8_0 / Q8_1: 32 values,
scale max|x|/127 stored as fp16, round half to even as the AVX2 quantize_row_q8_0/q8_1; Q8_K: 256 values, scale
-127/max with the signed extreme value, quantize_row_q8_K_ref). The integer dot products that follow are exact,
so the dequantized weights times the dequantized activations in float32 give the same result - except for
Q4_1/Q5_1, whose block minimum multiplies Q8_1's block sum stored as fp16: that rounding is added separately.

What is emulated, and what is not (checked against ggml-cpu of llama.cpp 0.3.36's vendored source, x86 AVX2):
- F32 weights: no conversion (llamafile's tinyBLAS F32 kernel, or ggml's F32 dot product).
- BF16 / F16 weights: the activations are rounded to BF16 / F16 (src1 converted to vec_dot_type), then tinyBLAS
  on AVX2 widens both operands to float32 and sums with FMAs: emulated exactly, summation order included
  (model.tinyblas, when tinyBLAS takes the product: K % 8 == 0, rows % 4 == 0, two or more activation rows).
- Q4_0/Q5_0/Q8_0/IQ4_NL/MXFP4 -> Q8_0, Q4_1/Q5_1 -> Q8_1, K-quants and IQ types -> Q8_K blocks. The repacked
  CPU paths (CPU_REPACK on AVX2: Q4_0, Q4_K, Q5_K, Q6_K, Q2_K, IQ4_NL, MXFP4 in 8-row interleaved form) quantize
  the activations with ggml_quantize_mat_q8_K_4x8 / q8_0_4x8: the same values as quantize_row_q8_K / q8_0 (the
  scale's sign convention differs, the dequantized activations do not), so the same conversion serves.
- Not emulated: the order of the sums (ggml multiplies block scales d_w * d_a in float and adds per block; here
  dequantized values enter one float32 GEMM) - last-bit differences, which the activation rounding of the next
  product amplifies into the noise the tolerances allow (BF16 most: a last-bit change of a GEMM alone moved
  llama-imatrix-style in_sum2 by ~1e-3 relative on SmolLM2 BF16, hence model.tinyblas for F16/BF16).
- The importance matrix is collected from the activations before this conversion, as llama-imatrix collects
  the (float32) src1 of each matmul.
"""
from __future__ import annotations

import numpy as np
from numba import njit

# weight type -> the vec_dot type its activations are converted to
VEC_DOT = {
    "F16": "f16", "BF16": "bf16",
    "Q4_0": "q8_0", "Q5_0": "q8_0", "Q8_0": "q8_0", "IQ4_NL": "q8_0", "MXFP4": "q8_0",
    "Q4_1": "q8_1", "Q5_1": "q8_1",
    "Q2_K": "q8_K", "Q3_K": "q8_K", "Q4_K": "q8_K", "Q5_K": "q8_K", "Q6_K": "q8_K", "IQ2_XXS": "q8_K",
    "IQ2_XS": "q8_K", "IQ2_S": "q8_K", "IQ3_XXS": "q8_K", "IQ3_S": "q8_K", "IQ1_S": "q8_K", "IQ1_M": "q8_K",
    "IQ4_XS": "q8_K", "TQ1_0": "q8_K", "TQ2_0": "q8_K",
}
BLOCK_MIN_BYTES = {"Q4_1": 20, "Q5_1": 24}   # bytes per 32-value block; fp16 d then fp16 m at its start


@njit(cache=True, nogil=True, error_model="numpy")
def _q8_k_rows(x, out):
    """x (rows, k) float32, k a multiple of 256 -> out: each 256-value block as quantize_row_q8_K_ref makes it,
    dequantized: max = the first value of largest magnitude, iscale = -127/max, q = min(127, nearest(iscale*x)),
    value q * (1/iscale); an all-zero block stays zero. One pass, float32 throughout, nogil (the workers convert
    their rows at once)."""
    for r in range(x.shape[0]):
        for b0 in range(0, x.shape[1], 256):
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            for j in range(b0, b0 + 256):
                ax = abs(x[r, j])
                if ax > amax:
                    amax = ax
                    mx = x[r, j]
            if amax == np.float32(0.0):
                for j in range(b0, b0 + 256):
                    out[r, j] = np.float32(0.0)
                continue
            iscale = np.float32(-127.0) / mx
            d = np.float32(1.0) / iscale
            for j in range(b0, b0 + 256):
                q = np.rint(iscale * x[r, j])
                if q > np.float32(127.0):
                    q = np.float32(127.0)
                out[r, j] = q * d


def activations_as(x: np.ndarray, kind: str | None,
                   out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """x (rows, k) float32 after conversion to the vec_dot type ``kind`` (``f16_bits``: the F16 rounding as uint16
    bits); for q8_1 also the per-block correction fp16(d * sum(q)) - fp16(d) * sum(q) (rows, k/32) that the
    weights' block minima multiply. ``out``: a (rows, k) float32 (uint16 for f16_bits) array to write the converted
    values into (the caller's buffer: no temporary, no page faults of a
    fresh array), returned; else a new array (or x itself when nothing is converted)."""
    if kind is None:
        return _into(x, out), None
    if kind in ("f16", "bf16"):   # numba kernels (numpy's float16 cast is ~10 ns a value), bit-identical to it
        from .widen import round_bf16, round_f16
        return (round_f16(x, out) if kind == "f16" else round_bf16(x, out)).reshape(x.shape), None
    if kind == "f16_bits":        # the same rounding, as uint16 F16 bits (what model.tinyblas reads)
        from .widen import f16_bits
        return f16_bits(x, out).reshape(x.shape), None
    n, k = x.shape
    if kind in ("q8_0", "q8_1"):
        if k % 32:
            return _into(x, out), None
        b = x.reshape(n, k // 32, 32)
        amax = np.abs(b).max(axis=-1, keepdims=True)
        d32 = amax / np.float32(127.0)
        d = d32.astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
        q = np.rint(b * inv)
        xq = _into((q * d).reshape(n, k), out)
        if kind == "q8_0":
            return xq, None
        qs = q.sum(axis=-1)
        s16 = (d32[..., 0] * qs).astype(np.float16).astype(np.float32)
        return xq, (s16 - (q * d).sum(axis=-1, dtype=np.float32)).astype(np.float32)
    if kind == "q8_K":
        if k % 256:
            return _into(x, out), None
        xc = np.ascontiguousarray(x, dtype=np.float32)
        if out is None:
            out = np.empty_like(xc)
        _q8_k_rows(xc, out)
        return out, None
    return _into(x, out), None


def _into(x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return x
    out[...] = x
    return out


def block_minima(raw: np.ndarray, block_bytes: int, n_rows: int) -> np.ndarray:
    """The fp16 minimum ``m`` of every 32-value block of a Q4_1/Q5_1 tensor, (rows, blocks) float32."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, block_bytes)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    return m.reshape(n_rows, -1)

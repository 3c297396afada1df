"""The graph operations of the forward pass other than matrix products, computed as ggml's CPU kernels do.

- RMSNorm sums squares in double and scales by ``1/sqrtf(mean + eps)`` in float (ggml_compute_forward_rms_norm_f32);
- RoPE angles are built in float by repeated multiplication with ``powf(base, -2/n_dims)``
  (ggml_rope_cache_init), "normal" mode rotates adjacent pairs (llama), NEOX mode the two halves (qwen, gemma);
- gemma's GELU goes through ggml's float16 lookup table (input and output rounded to float16).
"""
from __future__ import annotations

import math

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    """ggml_rms_norm (double sum of squares, float scale) followed by the weight multiply."""
    x64 = x.astype(np.float64)
    mean = (np.einsum("...i,...i->...", x64, x64) / x.shape[-1]).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
    y = x * scale[..., None]
    if w is not None:
        y *= w
    return y


def yarn_corr_dims(n_dims: int, n_ctx_orig: int, base: float, beta_fast: float = 32.0,
                   beta_slow: float = 1.0) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims: the dimensions between which YaRN blends interpolation into extrapolation."""
    f32 = np.float32

    def corr_dim(n_rot):
        return f32(n_dims) * np.log(f32(n_ctx_orig) / (f32(n_rot) * f32(2) * f32(math.pi))) / (f32(2) * np.log(f32(base)))

    start, end = np.floor(corr_dim(beta_fast)), np.ceil(corr_dim(beta_slow))
    return float(max(f32(0), start)), float(min(f32(n_dims - 1), end))


def rope_cache(n_pos: int, n_dims: int, base: float, freq_scale: float,
               freq_factors: np.ndarray | None = None, mscale: float = 1.0,
               yarn_corr: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (n_pos, n_dims/2) built as ggml_rope_cache_init does (float32 angle recurrence; angles
    divided by the per-dimension ``freq_factors``; cos and sin multiplied by ``mscale``, the attention factor).
    ``yarn_corr``: YaRN (ext_factor 1) with these correction dimensions: per dimension a ramp blends the
    interpolated angle into the extrapolated one, and the magnitude gets 1 + 0.1 ln(1/freq_scale) (rope_yarn)."""
    theta_scale = np.float32(math.pow(np.float32(base), -2.0 / n_dims))
    half = n_dims // 2
    theta = np.empty((n_pos, half), dtype=np.float32)
    theta[:, 0] = np.arange(n_pos, dtype=np.float32)
    for i in range(1, half):
        theta[:, i] = theta[:, i - 1] * theta_scale
    if freq_factors is not None:
        theta = theta / freq_factors[:half].astype(np.float32)
    extrap = theta
    theta = theta * np.float32(freq_scale)
    mscale = np.float32(mscale)
    if yarn_corr is not None:
        low, high = (np.float32(v) for v in yarn_corr)
        y = (np.arange(half, dtype=np.float32) - low) / max(np.float32(0.001), high - low)
        ramp = (np.float32(1) - np.minimum(np.float32(1), np.maximum(np.float32(0), y))).astype(np.float32)
        theta = theta * (np.float32(1) - ramp) + extrap * ramp
        mscale = mscale * (np.float32(1) + np.float32(0.1) * np.log(np.float32(1) / np.float32(freq_scale)))
    t64 = theta.astype(np.float64)
    c, s_ = np.cos(t64).astype(np.float32), np.sin(t64).astype(np.float32)
    if mscale != 1.0:
        c, s_ = c * mscale, s_ * mscale
    return c, s_


def apply_rope(x: np.ndarray, c: np.ndarray, s: np.ndarray, n_dims: int, neox: bool) -> np.ndarray:
    """x: (..., H, D); c/s: cos/sin broadcastable to (..., H, n_dims/2). Rotates the first n_dims of each head."""
    out = x.copy()
    if neox:
        half = n_dims // 2
        x0 = x[..., :half]
        x1 = x[..., half:n_dims]
        out[..., :half] = x0 * c - x1 * s
        out[..., half:n_dims] = x0 * s + x1 * c
    else:
        x0 = x[..., 0:n_dims:2]
        x1 = x[..., 1:n_dims:2]
        out[..., 0:n_dims:2] = x0 * c - x1 * s
        out[..., 1:n_dims:2] = x0 * s + x1 * c
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


SWIGLU_VALUES = 1 << 15     # values per piece of swiglu_into: its temporary stays in L1/L2


def swiglu_into(g: np.ndarray, u: np.ndarray, out: np.ndarray) -> None:
    """out = silu(g) * u for 2-D (rows, n) arrays, bit for bit ``silu(g) * u`` (the same numpy ufuncs in the same
    order), computed a few rows at a time into one small reused temporary: the whole-array form makes five
    passes over (rows, n) buffers larger than the caches (~4x the CPU time on an FFN-sized activation)."""
    rows, n = g.shape
    step = max(1, SWIGLU_VALUES // max(n, 1))
    t = np.empty((min(step, rows), n), dtype=np.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        tt = t[:r1 - r0]
        gg = g[r0:r1]
        np.negative(gg, out=tt)
        np.exp(tt, out=tt)
        np.add(np.float32(1.0), tt, out=tt)
        np.divide(gg, tt, out=tt)
        np.multiply(tt, u[r0:r1], out=out[r0:r1])


def gelu_f16_table(x: np.ndarray) -> np.ndarray:
    """ggml's GELU (tanh form) through its float16 table: input and result rounded to float16 for |x| < 10."""
    xh = x.astype(np.float16).astype(np.float32)
    a = np.float32(0.7978845608028654)
    b = np.float32(0.044715)
    g = np.float32(0.5) * xh * (np.float32(1.0) + np.tanh(a * xh * (np.float32(1.0) + b * xh * xh)))
    g = g.astype(np.float16).astype(np.float32)
    g = np.where(x <= -10.0, np.float32(0.0), np.where(x >= 10.0, x, g))
    return g.astype(np.float32)

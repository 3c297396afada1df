"""The graph operations of the forward pass other than matrix products, computed as ggml's CPU kernels do.

- RMSNorm squares in float, sums in double and scales by ``1/sqrtf(mean + eps)`` in float (ggml_compute_forward_rms_norm_f32);
- RoPE angles are built in float by repeated multiplication with ``powf(base, -2/n_dims)``
  (ggml_rope_cache_init), "normal" mode rotates adjacent pairs (llama), NEOX mode the two halves (qwen, gemma);
- gemma's GELU goes through ggml's float16 lookup table (input and output rounded to float16).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .simd import expf_lane, fma32, round_f16_lanes


def rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    """ggml_rms_norm (squares in float, summed in double, float scale) followed by the weight multiply. The
    squares are rounded to float as ggml's ``(ggml_float)(x*x)`` does: squared in double instead, ~0.4 % of a
    SmolLM2 row's outputs came out one ulp away, a seed the BF16 rounding of the next product amplifies."""
    sq = np.square(x).astype(np.float64)
    mean = (sq.sum(axis=-1) / x.shape[-1]).astype(np.float32)
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
    c, s_ = _cos_sin_f32(np.ascontiguousarray(theta, dtype=np.float32))
    if mscale != 1.0:
        c, s_ = c * mscale, s_ * mscale
    return c, s_


@njit(cache=True, nogil=True)
def _cos_sin_f32(theta):
    """cosf / sinf of float32 angles: numba lowers math.cos on float32 to the C library's cosf (glibc on Linux),
    the function ggml's rope_yarn calls; numpy's float64 cos rounded to float differs in ~1 % of the entries."""
    c = np.empty_like(theta)
    s = np.empty_like(theta)
    for i in range(theta.shape[0]):
        for j in range(theta.shape[1]):
            c[i, j] = math.cos(theta[i, j])
            s[i, j] = math.sin(theta[i, j])
    return c, s


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fma(a, b, c): the product is exact in double, the sum rounded to double then to float (a double
    rounding that differs from one rounding only when the double lands exactly half-way: ~2^-29 of the cases)."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def apply_rope(x: np.ndarray, c: np.ndarray, s: np.ndarray, n_dims: int, neox: bool) -> np.ndarray:
    """x: (..., H, D); c/s: cos/sin broadcastable to (..., H, n_dims/2). Rotates the first n_dims of each head.

    As ggml's rotate_pairs compiled for x86-64 with FMA (GCC contracts ``x0*cos - x1*sin`` into
    ``fma(x0, cos, -(x1*sin))`` and ``x0*sin + x1*cos`` into ``fma(x0, sin, x1*cos)``): bit for bit with the
    native llama.cpp build on SmolLM2 (plain multiply-then-add differs in ~20 % of the values)."""
    out = x.copy()
    if neox:
        half = n_dims // 2
        x0 = x[..., :half]
        x1 = x[..., half:n_dims]
        out[..., :half] = _fma(x0, c, -(x1 * s))
        out[..., half:n_dims] = _fma(x0, s, x1 * c)
    else:
        x0 = x[..., 0:n_dims:2]
        x1 = x[..., 1:n_dims:2]
        out[..., 0:n_dims:2] = _fma(x0, c, -(x1 * s))
        out[..., 1:n_dims:2] = _fma(x0, s, x1 * c)
    return out


@njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
def _rope_kernel(x, pos, cos, sin, n_dims, neox, f16, out, table):
    """out[r, h] = x[r, h] rotated at position pos[r] (apply_rope's arithmetic with one-rounding FMAs, see there);
    the dimensions past n_dims copied. ``f16``: the result rounded to float16 and back (the KV cache) as
    widen.round_f16 rounds (``table``: model.widen's F16 table)."""
    half = n_dims // 2
    D = x.shape[2]
    for r in range(x.shape[0]):
        c = cos[pos[r]]
        s = sin[pos[r]]
        for h in range(x.shape[1]):
            xr = x[r, h]
            orow = out[r, h]
            if neox:
                for i in range(half):
                    x0 = xr[i]
                    x1 = xr[i + half]
                    orow[i] = fma32(x0, c[i], -(x1 * s[i]))
                    orow[i + half] = fma32(x0, s[i], x1 * c[i])
            else:
                for i in range(half):
                    x0 = xr[2 * i]
                    x1 = xr[2 * i + 1]
                    orow[2 * i] = fma32(x0, c[i], -(x1 * s[i]))
                    orow[2 * i + 1] = fma32(x0, s[i], x1 * c[i])
            for i in range(n_dims, D):
                orow[i] = xr[i]
            if f16:
                round_f16_lanes(orow, table)


def rope_into(x: np.ndarray, pos: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_dims: int, neox: bool,
              out: np.ndarray, f16: bool = False) -> None:
    """out = apply_rope(x, cos[pos], sin[pos]) (x, out: (rows, H, D); out may be x), optionally rounded to
    float16 and back (K for the float16 KV cache): one pass, no temporaries, nogil (the workers run their rows)."""
    from .widen import _F16_TABLE
    _rope_kernel(x, pos, cos, sin, n_dims, neox, f16, out, _F16_TABLE)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def gelu_f16_table(x: np.ndarray) -> np.ndarray:
    """ggml's GELU (tanh form) through its float16 table: input and result rounded to float16 for |x| < 10."""
    xh = x.astype(np.float16).astype(np.float32)
    a = np.float32(0.7978845608028654)
    b = np.float32(0.044715)
    g = np.float32(0.5) * xh * (np.float32(1.0) + np.tanh(a * xh * (np.float32(1.0) + b * xh * xh)))
    g = g.astype(np.float16).astype(np.float32)
    g = np.where(x <= -10.0, np.float32(0.0), np.where(x >= 10.0, x, g))
    return g.astype(np.float32)


# --- ggml's vectorized expf and SwiGLU (x86 AVX2 + FMA)
_fma32 = fma32      # float32 fused multiply-add (model.simd)


@njit(cache=True, nogil=True)
def _ggml_v_expf(x):
    """One lane of ggml_v_expf(__m256) (ggml-cpu/vec.h, AVX2 with FMA): model.simd.expf_lane."""
    return expf_lane(np.float32(x))


@njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
def _swiglu_rows(g, u, out):
    """out = silu(g) * u as ggml_vec_swiglu_f32 on AVX2: silu = x / (1 + ggml_v_expf(0 - x)) for the groups of 8,
    the C library's expf for a row's last n % 8 values (ggml_silu_f32). Over 1-D row views with the branch-free
    lane function, so the loop vectorizes."""
    f32 = np.float32
    n = g.shape[1]
    n8 = n - n % 8
    for r in range(g.shape[0]):
        gr = g[r]
        ur = u[r]
        orow = out[r]
        for i in range(n8):
            a = gr[i]
            orow[i] = (a / (f32(1.0) + expf_lane(f32(0.0) - a))) * ur[i]
        for i in range(n8, n):
            a = gr[i]
            orow[i] = (a / (f32(1.0) + np.exp(-a))) * ur[i]


def swiglu_into(g: np.ndarray, u: np.ndarray, out: np.ndarray) -> None:
    """out = silu(g) * u (rows, n), bit for bit as ggml's fused SwiGLU on x86 AVX2 (nogil: the workers run their
    rows at once)."""
    _swiglu_rows(g, u, out)

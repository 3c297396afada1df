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
@njit(cache=True, nogil=True, inline="always")
def _fma32(a, b, c):
    """float32 fma through double: the product is exact, the sum is rounded twice (double, then float), which
    differs from one rounding only when the double lands exactly half-way between two floats."""
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


# ggml_v_expf's constants, as written there (hexadecimal float literals)
_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))
_SHIFT = np.float32(float.fromhex("0x1.8p23"))
_LN2_HI = np.float32(float.fromhex("0x1.62e4p-1"))
_LN2_LO = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_C5 = np.float32(float.fromhex("0x1.0e4020p-7"))
_C4 = np.float32(float.fromhex("0x1.573e2ep-5"))
_C3 = np.float32(float.fromhex("0x1.555e66p-3"))
_C2 = np.float32(float.fromhex("0x1.fffdb6p-2"))
_C1 = np.float32(float.fromhex("0x1.ffffecp-1"))


@njit(cache=True, nogil=True)
def _bits_f32(i):
    return np.array([np.int32(i)]).view(np.float32)[0]


@njit(cache=True, nogil=True)
def _ggml_v_expf(x):
    """One lane of ggml_v_expf(__m256) (ggml-cpu/vec.h, AVX2 with FMA): the ARM optimized-routines expf
    (round-to-nearest 2^n by the 0x1.8p23 trick, a degree-5 polynomial of the remainder, scale by 2^n with the
    over/underflow branches), with the same constants and the same fused multiply-adds."""
    f32 = np.float32
    z = _fma32(x, _LOG2E, _SHIFT)
    n = z - _SHIFT
    b = _fma32(-n, _LN2_LO, _fma32(-n, _LN2_HI, x))
    e = np.int32(np.array([z]).view(np.int32)[0] << np.int32(23))
    k = _bits_f32(e + np.int32(0x3F800000))
    u = b * b
    j = _fma32(_fma32(_fma32(_C5, b, _C4), u, _fma32(_C3, b, _C2)), u, _C1 * b)
    if not abs(n) > f32(126.0):
        return _fma32(k, j, k)
    g = np.int32(-2113929216) if n <= f32(0.0) else np.int32(0)        # 0x82000000 where n <= 0
    s1 = _bits_f32(g + np.int32(0x7F000000))
    s2 = _bits_f32(e - g)
    if abs(n) > f32(192.0):
        return s1 * s1
    return _fma32(s2, j, s2) * s1


@njit(cache=True, nogil=True, error_model="numpy")
def _swiglu_rows(g, u, out):
    """out = silu(g) * u as ggml_vec_swiglu_f32 on AVX2: silu = x / (1 + ggml_v_expf(0 - x)) for the groups of 8,
    the C library's expf for a row's last n % 8 values (ggml_silu_f32). ggml_v_expf is _ggml_v_expf, written
    here over a row with its bit casts as array views (no branch in the common path, so it vectorizes)."""
    f32 = np.float32
    n = g.shape[1]
    n8 = n - n % 8
    zb = np.empty(n8, dtype=np.float32)
    kb = np.empty(n8, dtype=np.int32)
    zi = zb.view(np.int32)
    kf = kb.view(np.float32)
    for r in range(g.shape[0]):
        for i in range(n8):
            zb[i] = _fma32(f32(0.0) - g[r, i], _LOG2E, _SHIFT)
        for i in range(n8):
            kb[i] = np.int32(zi[i] << np.int32(23)) + np.int32(0x3F800000)
        for i in range(n8):
            x = f32(0.0) - g[r, i]
            nn = zb[i] - _SHIFT
            b = _fma32(-nn, _LN2_LO, _fma32(-nn, _LN2_HI, x))
            uu = b * b
            j = _fma32(_fma32(_fma32(_C5, b, _C4), uu, _fma32(_C3, b, _C2)), uu, _C1 * b)
            k = kf[i]
            ex = _fma32(k, j, k)
            if abs(nn) > f32(126.0):        # over/underflow: the scalar lane function's branches
                ex = _ggml_v_expf(x)
            out[r, i] = (g[r, i] / (f32(1.0) + ex)) * u[r, i]
        for i in range(n8, n):
            a = g[r, i]
            out[r, i] = (a / (f32(1.0) + np.exp(-a))) * u[r, i]


def swiglu_into(g: np.ndarray, u: np.ndarray, out: np.ndarray) -> None:
    """out = silu(g) * u (rows, n), bit for bit as ggml's fused SwiGLU on x86 AVX2 (nogil: the workers run their
    rows at once)."""
    _swiglu_rows(g, u, out)

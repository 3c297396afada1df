"""F16 and BF16 rows: plain per-element conversions, no blocks, no imatrix.

Mirrors ggml_quantize_chunk's F16 case (ggml_fp32_to_fp16_row -> GGML_FP32_TO_FP16, ggml-impl.h's
ggml_compute_fp32_to_fp16: IEEE round-to-nearest-even, NaN -> 0x7E00 with the sign) and its BF16 case
(ggml_fp32_to_bf16_row_ref -> ggml_compute_fp32_to_bf16: round-to-nearest-even on the bits, NaN forced
quiet by setting bit 6 of the truncated pattern, subnormals kept).

The conversions work on the integer bit patterns (rows viewed as uint32 / uint16) so they vectorise; the
F16 one is checked against gguftool.quants.common.fp32_to_fp16_bits (the verified scalar reference).

Each type is exposed as a namespace with the interface of a type module (GGML_TYPE, USES_IMATRIX,
quantize_rows, dequantize_rows): ``float_types.F16`` and ``float_types.BF16``.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..gguf.constants import GGMLType

F32 = np.float32
U32 = np.uint32


# --- scalar bit casts (an LLVM bitcast: free, and unlike array views usable on a single value)
@intrinsic
def f32_as_u32(typingctx, f):
    """The bit pattern of a float32 scalar as uint32."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def u32_as_f32(typingctx, u):
    """The float32 whose bit pattern is the uint32 scalar u."""
    if u != types.uint32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


# --- F16
@njit(cache=True, inline="always")
def f32_bits_to_f16_bits(u):
    """binary32 bit pattern (uint32) -> binary16 bit pattern, round to nearest even."""
    sign = (u >> U32(16)) & U32(0x8000)
    a = u & U32(0x7FFFFFFF)
    if a > U32(0x7F800000):                      # NaN
        return sign | U32(0x7E00)
    if a >= U32(0x477FF000):                     # >= 65520: rounds to infinity
        return sign | U32(0x7C00)
    if a >= U32(0x38800000):                     # >= 2^-14: normal half
        # rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even;
        # a mantissa carry moves into the exponent field by itself
        return sign | ((a - U32(0x38000000) + U32(0x0FFF) + ((a >> U32(13)) & U32(1))) >> U32(13))
    if a < U32(0x33000001):                      # <= 2^-25: rounds to zero (2^-25 is a tie, to even 0)
        return sign
    # subnormal half: value = m * 2^(e-150) with the implicit bit; the half unit is 2^-24
    e = a >> U32(23)
    m = (a & U32(0x7FFFFF)) | U32(0x800000)
    shift = U32(126) - e                         # in [14, 24]: bits dropped to reach units of 2^-24
    q = m >> shift
    rem = m & ((U32(1) << shift) - U32(1))
    half = U32(1) << (shift - U32(1))
    if rem > half or (rem == half and (q & U32(1))):
        q += U32(1)
    return sign | q


@njit(cache=True, inline="always")
def f16_bits_to_f32_bits(h):
    """binary16 bit pattern (uint32 holding 16 bits) -> binary32 bit pattern (exact)."""
    sign = (h & U32(0x8000)) << U32(16)
    e = (h >> U32(10)) & U32(0x1F)
    m = h & U32(0x3FF)
    if e == U32(31):
        return sign | U32(0x7F800000) | (m << U32(13))
    if e != U32(0):
        return sign | ((e + U32(112)) << U32(23)) | (m << U32(13))
    if m == U32(0):
        return sign
    # subnormal half: normalise the mantissa
    e2 = U32(113)
    while (m & U32(0x400)) == U32(0):
        m <<= U32(1)
        e2 -= U32(1)
    return sign | (e2 << U32(23)) | ((m & U32(0x3FF)) << U32(13))


@njit(cache=True, inline="always")
def f32_to_f16_bits_fast(f, u):
    """f32_bits_to_f16_bits without branches (vectorises): every case computed, the right one selected.

    Subnormal halves come from rint(|f| * 2^24) in float32 (exact scaling, round-to-nearest-even), as in
    quants.common.fp32_to_fp16_bits; the operand is clamped so the unselected cases stay well defined.
    """
    sign = (u >> U32(16)) & U32(0x8000)
    a = u & U32(0x7FFFFFFF)
    norm = (a - U32(0x38000000) + U32(0x0FFF) + ((a >> U32(13)) & U32(1))) >> U32(13)
    s = abs(f) * F32(16777216.0)
    s = s if s < F32(2048.0) else F32(2048.0)
    sub = U32(np.int32(np.rint(s)))
    h = sub if a < U32(0x38800000) else norm
    h = U32(0x7C00) if a >= U32(0x477FF000) else h
    h = U32(0x7E00) if a > U32(0x7F800000) else h
    return sign | h


@njit(cache=True, inline="always")
def fp32_to_fp16_fast(f):
    """GGML_FP32_TO_FP16 of a float32 scalar as uint32 bits (same results as quants.common.fp32_to_fp16_bits,
    checked over all 2^32 inputs, at a fraction of the cost)."""
    f = F32(f)
    return U32(f32_bits_to_f16_bits(f32_as_u32(f)))


@njit(cache=True, inline="always")
def fp16_to_fp32_fast(h):
    """GGML_FP16_TO_FP32 of 16 bits (any integer type) as float32."""
    return u32_as_f32(U32(f16_bits_to_f32_bits(U32(h))))


@njit(cache=True, parallel=True)
def f16_dequantize_rows(data, out):
    n = out.shape[1]
    for r in prange(out.shape[0]):
        hu = data[r].view(np.uint16)
        ou = out[r].view(np.uint32)
        for j in range(n):
            ou[j] = f16_bits_to_f32_bits(U32(hu[j]))


# --- BF16
@njit(cache=True, inline="always")
def f32_bits_to_bf16_bits(u):
    """ggml_compute_fp32_to_bf16 on the bit pattern."""
    rounded = (u + (U32(0x7FFF) + ((u >> U32(16)) & U32(1)))) >> U32(16)
    quiet_nan = (u >> U32(16)) | U32(64)                # NaN: truncate and force quiet
    return quiet_nan if (u & U32(0x7FFFFFFF)) > U32(0x7F800000) else rounded


@njit(cache=True, parallel=True)
def bf16_dequantize_rows(data, out):
    n = out.shape[1]
    for r in prange(out.shape[0]):
        hu = data[r].view(np.uint16)
        ou = out[r].view(np.uint32)
        for j in range(n):
            ou[j] = U32(hu[j]) << U32(16)


# --- conversions fused with the NaN/Inf screen
# For these memory-bound conversions a separate screening pass costs as much as the conversion itself, so
# the API calls these variants instead: bad[r] = 1 when row r holds a NaN or an Inf (its bytes are then
# meaningless; the API raises before returning them).
@njit(cache=True, parallel=True)
def f16_quantize_rows_screened(x, out, bad):
    n = x.shape[1]
    for r in prange(x.shape[0]):
        xr = x[r]
        xu = xr.view(np.uint32)
        ou = out[r].view(np.uint16)
        m = U32(0)
        for j in range(n):
            u = xu[j]
            e = u & U32(0x7F800000)
            m = e if e > m else m
            ou[j] = np.uint16(f32_to_f16_bits_fast(xr[j], u))
        bad[r] = m == U32(0x7F800000)


@njit(cache=True, parallel=True)
def bf16_quantize_rows_screened(x, out, bad):
    n = x.shape[1]
    for r in prange(x.shape[0]):
        xu = x[r].view(np.uint32)
        ou = out[r].view(np.uint16)
        m = U32(0)
        for j in range(n):
            u = xu[j]
            e = u & U32(0x7F800000)
            m = e if e > m else m
            ou[j] = np.uint16(f32_bits_to_bf16_bits(u))
        bad[r] = m == U32(0x7F800000)


# the registry's row drivers (imatrix ignored): the screened conversions, flags discarded (x is finite)
def f16_quantize_rows(x, imatrix, out):
    f16_quantize_rows_screened(x, out, np.zeros(x.shape[0], np.bool_))


def bf16_quantize_rows(x, imatrix, out):
    bf16_quantize_rows_screened(x, out, np.zeros(x.shape[0], np.bool_))


# --- the two "type modules" (quantize_rows_screened: optional fused variant the API prefers)
F16 = SimpleNamespace(GGML_TYPE=GGMLType.F16, USES_IMATRIX=False,
                      quantize_rows=f16_quantize_rows, dequantize_rows=f16_dequantize_rows,
                      quantize_rows_screened=f16_quantize_rows_screened)
BF16 = SimpleNamespace(GGML_TYPE=GGMLType.BF16, USES_IMATRIX=False,
                       quantize_rows=bf16_quantize_rows, dequantize_rows=bf16_dequantize_rows,
                       quantize_rows_screened=bf16_quantize_rows_screened)

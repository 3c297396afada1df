"""Scalar bit helpers shared by every kernel: numpy scalar types, LLVM bit casts, ggml's nearest_int, the
fp16 conversions and little-endian fields inside a uint8 block buffer. One of each, numba-compiled.

    F32, U32, U64, FLT_MAX          numpy scalar types and C's FLT_MAX (U64 indices let numba drop its
                                    negative-index wraparound, so loops vectorise); GROUP_MAX_EPS (ggml's)
    f32_as_u32(f) / u32_as_f32(u)   float32 <-> its bit pattern (an LLVM bitcast: free, and usable on a scalar)
    select_f32(c, a, b)             ``a if c else b`` as one LLVM select (branch-free, so lane loops vectorise)
    bit_select_f32(u, k, a, b)      ``b if bit k of the uint32 u is set else a``: a shift, a sign test, a select
                                    (32-bit lanes: numba's own integer arithmetic would widen to 64 bits)
    nearest_int_c(f) -> int         ggml's nearest_int bit for bit, also outside its |f| <= 4194303 range
    fp16_bits_from_f32(f, u)        GGML_FP32_TO_FP16 of float32 f with bit pattern u -> uint32 holding 16 bits
    fp32_to_fp16_bits(f)            the same for a scalar (the bits are taken here)
    f16_bits_to_f32_bits(h)         binary16 bits -> binary32 bits (exact)
    fp16_bits_to_fp32(h)            binary16 bits -> float32 (exact)
    put_fp16(y, off, f)             store GGML_FP32_TO_FP16(f), a float, little-endian at y[off:off+2]
    get_fp16(y, off) -> float32     GGML_FP16_TO_FP32 of the half at y[off:off+2]
    put_u32(y, off, v) / get_u32    a uint32 little-endian (memcpy of a qh field on x86-64)

The fp16 conversions are IEEE round-to-nearest-even like F16C's _cvtss_sh(x, 0) and ggml's software path;
NaN encodes as 0x7E00 with its sign. They work on bit patterns and have no branches, so they vectorise in
the F16 row loops; tests/test_quants_legacy.py checks them against an arithmetic reference and numpy.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

F32 = np.float32
U32 = np.uint32
U64 = np.uint64
FLT_MAX = np.float32(3.4028234663852886e38)
GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c: a group whose largest magnitude is below this is all zero


# --- LLVM bit casts and selects
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


@intrinsic
def select_f32(typingctx, c, a, b):
    """``a if c else b`` for float32 as one LLVM select (branch-free, so the lane loops vectorise)."""
    if a != types.float32 or b != types.float32 or c != types.boolean:
        return None

    def codegen(context, builder, signature, args):
        return builder.select(args[0], args[1], args[2])

    return types.float32(types.boolean, types.float32, types.float32), codegen


@intrinsic
def bit_select_f32(typingctx, u, k, a, b):
    """``b if (u >> k) & 1 else a`` for a uint32 u (k in 0..31): u shifted left so that bit k is the sign bit,
    a signed compare with 0 and one LLVM select, all in 32 bits, so a lane loop over uint32 words vectorises
    with 8 lanes (AVX2 blends on the sign bit directly)."""
    if u != types.uint32 or not isinstance(k, types.Integer) or a != types.float32 or b != types.float32:
        return None

    def codegen(context, builder, signature, args):
        uv, kv, av, bv = args
        i32 = ir.IntType(32)
        kk = builder.trunc(kv, i32) if kv.type.width > 32 else kv
        shifted = builder.shl(uv, builder.sub(ir.Constant(i32, 31), kk))
        return builder.select(builder.icmp_signed("<", shifted, ir.Constant(i32, 0)), bv, av)

    return types.float32(u, k, a, b), codegen


# --- rounding
@njit(cache=True, inline="always", error_model="numpy")
def nearest_int_c(f):
    """ggml-quants.c nearest_int: the low 23 mantissa bits of ``f + 12582912.f`` (1.5 * 2^23) minus 0x400000.

    For |f| <= 4194303 that is round-half-even (rint in float32). Outside that range (the assert is compiled
    out in llama.cpp's release builds) the searches reach it when sums are tiny, overflowed or NaN: NaN gives 0
    (x86's default NaN has mantissa 0x400000), +-Inf -4194304. Branch-free (a float32 -> int bitcast).
    """
    b = f32_as_u32(F32(F32(f) + F32(12582912.0)))
    return (int(b) & 0x7FFFFF) - 0x400000


# --- fp16 (IEEE binary16)
@njit(cache=True, inline="always")
def fp16_bits_from_f32(f, u):
    """GGML_FP32_TO_FP16 of the float32 f whose bit pattern is u (uint32), as uint32 holding 16 bits.

    Every case is computed and the right one selected (no branches). Normal halves: rebias the exponent
    (127 -> 15) and round the 13 dropped mantissa bits to nearest even, a carry moving into the exponent field
    by itself. Subnormal halves: rint(|f| * 2^24) in float32 (exact scaling, round-to-nearest-even), the
    operand clamped so the unselected cases stay well defined. >= 65520 rounds to infinity; NaN -> 0x7E00.
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
def fp32_to_fp16_bits(f):
    """GGML_FP32_TO_FP16 of a scalar (cast to float32 first) as uint32 holding the 16 bits."""
    f = F32(f)
    return fp16_bits_from_f32(f, f32_as_u32(f))


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
def fp16_bits_to_fp32(h):
    """GGML_FP16_TO_FP32 of 16 bits (any integer type) as float32."""
    return u32_as_f32(U32(f16_bits_to_f32_bits(U32(h))))


# --- little-endian fields of a block buffer (uint8 array)
@njit(cache=True, inline="always")
def put_fp16(y, off, f):
    """Store GGML_FP32_TO_FP16(f) (f a float) little-endian at y[off:off+2]."""
    h = fp32_to_fp16_bits(f)
    y[off] = h & U32(0xFF)
    y[off + 1] = (h >> U32(8)) & U32(0xFF)


@njit(cache=True, inline="always")
def get_fp16(y, off):
    """GGML_FP16_TO_FP32 of the little-endian half at y[off:off+2], as float32 (exact)."""
    return fp16_bits_to_fp32(U32(y[off]) | (U32(y[off + 1]) << U32(8)))


@njit(cache=True, inline="always")
def put_u32(y, off, v):
    """Store a uint32 little-endian (memcpy of qh on x86-64)."""
    y[off] = v & 0xFF
    y[off + 1] = (v >> 8) & 0xFF
    y[off + 2] = (v >> 16) & 0xFF
    y[off + 3] = (v >> 24) & 0xFF


@njit(cache=True, inline="always")
def get_u32(y, off):
    return (U32(y[off]) | (U32(y[off + 1]) << U32(8))
            | (U32(y[off + 2]) << U32(16)) | (U32(y[off + 3]) << U32(24)))

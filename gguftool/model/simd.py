"""Scalar building blocks for the forward pass's numba kernels that LLVM vectorizes: float32 bit casts and
ggml_v_expf as one branch-free lane function.

Bit casts through a one-element array (``np.array([x]).view(np.int32)[0]``) allocate on every call: in the
attention kernel's softmax (hundreds of millions of exponentials a pass) that allocation, not the arithmetic, was
the time, and it stops the loops around it from being vectorized. ``as_i32`` / ``as_f32`` are LLVM bitcasts
instead (no instruction at all in the vector code).

``fma32`` is the float32 fused multiply-add as ``model.ops`` has always computed it: the product (exact in
double) plus the addend, rounded to double and then to float. That double rounding differs from a hardware FMA's
single rounding only when the double lands exactly half-way between two floats, and it is kept so that the
results stay the same bits as before; it vectorizes as 4-lane double arithmetic.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["as_f32", "as_i32", "expf_lane", "fma32"]


@intrinsic
def as_i32(typingctx, x):
    """The bits of a float32 as an int32 (an LLVM bitcast)."""
    if x != types.float32:
        return None
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def as_f32(typingctx, i):
    """The float32 whose bits are the int32 ``i`` (an LLVM bitcast)."""
    if i != types.int32:
        return None
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def fma32(typingctx, a, b, c):
    """float32 fused multiply-add, one rounding: LLVM's llvm.fma.f32, a vfmadd instruction on x86 with FMA (what
    ggml's _mm256_fmadd_ps computes), 8 lanes to a vector in vectorized loops."""
    if not (a == types.float32 and b == types.float32 and c == types.float32):
        return None
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f], ir.FunctionType(f, [f, f, f]))
        return builder.call(fn, args)

    return sig, codegen


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


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def expf_lane(x):
    """One lane of ggml_v_expf(__m256) (ggml-cpu/vec.h, AVX2 with FMA): the ARM optimized-routines expf
    (round-to-nearest 2^n by the 0x1.8p23 trick, a degree-5 polynomial of the remainder, scale by 2^n with the
    over/underflow cases), with the same constants and the same fused multiply-adds. Branch-free: every case is
    computed and one selected, as the vector code's blends do, so loops over it vectorize."""
    f32 = np.float32
    z = fma32(x, _LOG2E, _SHIFT)
    n = z - _SHIFT
    b = fma32(-n, _LN2_LO, fma32(-n, _LN2_HI, x))
    e = np.int32(as_i32(z) << np.int32(23))
    k = as_f32(np.int32(e + np.int32(0x3F800000)))
    u = b * b
    j = fma32(fma32(fma32(_C5, b, _C4), u, fma32(_C3, b, _C2)), u, _C1 * b)
    common = fma32(k, j, k)
    an = abs(n)
    g = np.int32(-2113929216) if n <= f32(0.0) else np.int32(0)        # 0x82000000 where n <= 0
    s1 = as_f32(np.int32(g + np.int32(0x7F000000)))
    s2 = as_f32(np.int32(e - g))
    big = s1 * s1 if an > f32(192.0) else fma32(s2, j, s2) * s1
    return big if an > f32(126.0) else common

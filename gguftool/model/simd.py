"""Scalar building blocks for the forward pass's numba kernels that LLVM vectorizes: float32 bit casts and
ggml_v_expf as one branch-free lane function; and the LLVM IR pieces of the register-tile intrinsics
(model.tinyblas, model.attention): IR types, an array's element pointer, strided row pointers, the 8-lane FMA.

Bit casts through a one-element array (``np.array([x]).view(np.int32)[0]``) allocate on every call: in the
attention kernel's softmax (hundreds of millions of exponentials a pass) that allocation, not the arithmetic, was
the time, and it stops the loops around it from being vectorized. ``as_i32`` / ``as_f32`` are LLVM bitcasts
instead (no instruction at all in the vector code).

``fma32`` is the float32 fused multiply-add with one rounding (LLVM's ``llvm.fma.f32``: one vfmadd instruction on
x86 with FMA, eight lanes to a vector), what ggml's ``_mm256_fmadd_ps`` and GCC's contracted ``a*b + c`` compute.
The first exact kernels emulated it in double (the product is exact, the sum rounded to double, then to float):
that differs from one rounding only where the double lands exactly half-way between two floats (about 2^-29 of
the sums; none in 2e7 random triples) and it vectorizes as 4-lane double arithmetic with conversions, at a
quarter of the speed or less.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..quants.bits import f32_as_u32, u32_as_f32

__all__ = ["F16C", "IR_F32", "IR_I16", "IR_I32", "IR_I64", "IR_V8F", "as_f32", "as_i32", "element_pointer",
           "expf_lane", "f16_bits_lane", "fma32", "fma_v8f32", "round_f16_lane", "round_f16_lanes", "row_pointers",
           "widen_f16_lane"]

IR_F32, IR_I16, IR_I32, IR_I64 = ir.FloatType(), ir.IntType(16), ir.IntType(32), ir.IntType(64)
IR_V8F = ir.VectorType(IR_F32, 8)        # __m256


def element_pointer(builder, context, array_type, array):
    """The data pointer of a numba array: float* for float32, i16* for the 16-bit formats (F16 / BF16 bits)."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(data, (IR_F32 if array_type.dtype == types.float32 else IR_I16).as_pointer())


def row_pointers(builder, ptr, start, stride, n: int) -> list:
    """Pointers to ``ptr[start + i * stride]`` for i < n (IR int64 start and stride): the rows of a register tile."""
    return [builder.gep(ptr, [builder.add(start, builder.mul(ir.Constant(IR_I64, i), stride))]) for i in range(n)]


def fma_v8f32(builder):
    """LLVM's ``llvm.fma.v8f32`` (one vfmadd231ps on 8 float lanes, one rounding each), declared in the module."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(IR_V8F, [IR_V8F] * 3), "llvm.fma.v8f32")


def _scalar_op(name: str, src, dst, build, doc: str):
    """An intrinsic taking one ``src`` scalar to ``dst`` by ``build(builder, value)`` (a few LLVM instructions that
    LLVM vectorizes with the loop around them)."""
    def impl(typingctx, x):
        if x != src:
            return None

        def codegen(context, builder, signature, args):
            return build(builder, args[0])

        return dst(src), codegen

    impl.__name__ = impl.__qualname__ = name
    impl.__doc__ = doc
    return intrinsic(impl)


# the unsigned casts are quants.bits' f32_as_u32 / u32_as_f32
as_i32 = _scalar_op("as_i32", types.float32, types.int32, lambda b, v: b.bitcast(v, ir.IntType(32)),
                    "The bits of a float32 as an int32 (an LLVM bitcast: no instruction).")
as_f32 = _scalar_op("as_f32", types.int32, types.float32, lambda b, v: b.bitcast(v, ir.FloatType()),
                    "The float32 whose bits are the int32 i (an LLVM bitcast: no instruction).")


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


def _host_f16c() -> bool:
    """True when numba compiles for this machine's CPU and it has F16C (vcvtps2ph / vcvtph2ps: every x86-64 CPU with
    AVX2 has them). Without F16C, LLVM would lower half-precision conversions to library calls numba's JIT may not
    link, so the portable bit-twiddling lanes below are used instead."""
    import numba
    from llvmlite import binding
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:      # compiling for another CPU than this one
        return False
    try:
        return bool(binding.get_host_cpu_features().get("f16c", False))
    except RuntimeError:
        return False


F16C = _host_f16c()


_f16_bits_hw = _scalar_op(
    "_f16_bits_hw", types.float32, types.uint16,
    lambda b, v: b.bitcast(b.fptrunc(v, ir.HalfType()), ir.IntType(16)),
    "The F16 bits (uint16) of float32 ``x`` as LLVM fptrunc: vcvtps2ph, round to nearest even (what ggml's "
    "fp32_to_fp16 does with F16C), eight lanes to an instruction in vectorized loops.")
_f16_widen_hw = _scalar_op(
    "_f16_widen_hw", types.uint16, types.float32,
    lambda b, v: b.fpext(b.bitcast(v, ir.HalfType()), ir.FloatType()),
    "The float32 value of F16 bits ``u`` (uint16): bitcast to half, LLVM fpext (vcvtph2ps).")


@njit(cache=True, nogil=True, inline="always")
def _f16_bits_lane_portable(f):
    """f16_bits_lane without F16C: ggml's scalar fp32_to_fp16 bit manipulation."""
    u32 = np.uint32
    w = f32_as_u32(f)
    base = (abs(f) * np.float32(5.192296858534828e+33)) * np.float32(7.703719777548943e-34)   # 2^112, 2^-110
    shl1_w = u32(w + w)
    sign = u32(w & u32(0x80000000))
    bias = u32(shl1_w & u32(0xFF000000))
    if bias < u32(0x71000000):
        bias = u32(0x71000000)
    bits = f32_as_u32(u32_as_f32(u32((bias >> u32(1)) + u32(0x07800000))) + base)
    nonsign = u32(((bits >> u32(13)) & u32(0x00007C00)) + (bits & u32(0x00000FFF)))
    h = u32(0x7E00) if shl1_w > u32(0xFF000000) else nonsign
    return np.uint16((sign >> u32(16)) | h)


@njit(cache=True, nogil=True, inline="always")
def _widen_f16_lane_table(u, table):
    return u32_as_f32(table[u])


@njit(cache=True, nogil=True, inline="always")
def _widen_f16_lane_f16c(u, table):
    return _f16_widen_hw(u)


# the F16 bits (uint16) of float32 ``f``: ggml's fp32_to_fp16 (round to nearest even, NaN -> a quiet NaN,
# overflow -> inf)
f16_bits_lane = _f16_bits_hw if F16C else _f16_bits_lane_portable
# the float32 value of F16 bits ``u`` (uint16), exact; ``table``: the F16 bits -> float32 bits table (unused with
# F16C)
widen_f16_lane = _widen_f16_lane_f16c if F16C else _widen_f16_lane_table


@njit(cache=True, nogil=True, inline="always")
def round_f16_lane(f, table):
    """float32 ``f`` rounded to float16 and back, as model.widen.round_f16 (``table`` as for widen_f16_lane)."""
    return widen_f16_lane(f16_bits_lane(f), table)


@njit(cache=True, nogil=True, boundscheck=False)
def round_f16_lanes(row, table):
    """A 1-D float32 array rounded to float16 precision in place (round_f16_lane on each value)."""
    for i in range(row.shape[0]):
        row[i] = round_f16_lane(row[i], table)

"""F16 and BF16 rows widened to float32: numba kernels that release the GIL, so the forward pass's worker threads
widen their own slabs of a weight at the same time (numpy's float16 cast runs at ~10 ns a value here, too slow to
repeat per batch; these run at memory speed).

Both conversions are exact: BF16 is the top half of a float32; an F16 value is converted by the CPU's F16C
instruction (vcvtph2ps, as ggml's fp16_to_fp32 on x86) or, without F16C, looked up in a 65536-entry table made by
numpy's IEEE conversion (subnormals, infinities and NaN included).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..quants.bits import f32_as_u32, u32_as_f32
from ..quants.decode import F16_TABLE, bf16_rows
from .simd import f16_bits_lane, round_f16_lane, widen_f16_lane

__all__ = ["bf16_rows", "f16_bits", "f16_rows", "round_bf16", "round_f16"]

# BF16 widening and the F16 table are quants.decode's (the pipeline's slab reader shares them); F16 widening is
# this module's own, with F16C where the CPU has it
_F16_TABLE = F16_TABLE


@njit(cache=True, nogil=True, boundscheck=False)
def _f16_rows(src, out, table):
    """src: (rows, n) uint16 F16 words; out: (rows, n) uint32 view of the float32 result (simd.widen_f16_lane)."""
    for r in range(src.shape[0]):
        srow = src[r]
        orow = out[r]
        for i in range(src.shape[1]):
            orow[i] = f32_as_u32(widen_f16_lane(srow[i], table))


def f16_rows(src: np.ndarray, out: np.ndarray) -> None:
    """src: (rows, n) uint16 F16 words; out: (rows, n) uint32 view of the float32 result."""
    _f16_rows(src, out, _F16_TABLE)


# --- rounding float32 activations to F16 / BF16 and back (what ggml's matmul does to src1 for such weights)
@njit(cache=True, nogil=True, boundscheck=False)
def _round_f16_rows(x, out, table):
    """out = float32(fp16(x)) for (rows, n) arrays, fp16 as ggml's fp32_to_fp16 (simd.round_f16_lane)."""
    for r in range(x.shape[0]):
        xr = x[r]
        orow = out[r]
        for i in range(x.shape[1]):
            orow[i] = round_f16_lane(xr[i], table)


@njit(cache=True, nogil=True, boundscheck=False)
def _f16_bits_rows(x, out):
    """out = the F16 bits of x for (rows, n) arrays (out uint16), as ggml's fp32_to_fp16 (simd.f16_bits_lane)."""
    for r in range(x.shape[0]):
        xr = x[r]
        orow = out[r]
        for i in range(x.shape[1]):
            orow[i] = f16_bits_lane(xr[i])


@njit(cache=True, nogil=True, boundscheck=False)
def _round_bf16_rows(x, out):
    """out = float32(bf16(x)) as ggml_compute_fp32_to_bf16: round to nearest even, NaN kept quiet. Branch-free
    over 1-D rows (both cases computed, one selected), so the loop vectorizes."""
    u32 = np.uint32
    for r in range(x.shape[0]):
        xr = x[r]
        orow = out[r]
        for i in range(x.shape[1]):
            u = f32_as_u32(xr[i])
            nan = u32(((u >> u32(16)) | u32(64)) << u32(16))
            rne = u32((u32(u + u32(0x7FFF) + ((u >> u32(16)) & u32(1))) >> u32(16)) << u32(16))
            orow[i] = u32_as_f32(nan if (u & u32(0x7FFFFFFF)) > u32(0x7F800000) else rne)


def round_f16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, n) -> float32 rounded to F16 precision (into ``out``, rows x n float32, or a new array)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    if out is None:
        out = np.empty_like(x)
    _round_f16_rows(x, out, _F16_TABLE)
    return out


def f16_bits(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, n) -> its F16 bits, uint16 (rows, n) (into ``out`` or a new array): the activations of an F16
    product as tinyBLAS reads them (model.tinyblas)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    if out is None:
        out = np.empty(x.shape, np.uint16)
    _f16_bits_rows(x, out)
    return out


def round_bf16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, n) -> float32 rounded to BF16 precision (into ``out``, rows x n float32, or a new array)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    if out is None:
        out = np.empty_like(x)
    _round_bf16_rows(x, out)
    return out

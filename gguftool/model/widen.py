"""F16 and BF16 rows widened to float32: numba kernels that release the GIL, so the forward pass's worker threads
widen their own slabs of a weight at the same time (numpy's float16 cast runs at ~10 ns a value here, too slow to
repeat per batch; these run at memory speed).

Both conversions are exact: BF16 is the top half of a float32; an F16 value is looked up in a 65536-entry table
made by numpy's IEEE conversion (subnormals, infinities and NaN payloads included).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..quants.bits import f32_as_u32, u32_as_f32
from ..quants.decode import F16_TABLE, bf16_rows, f16_rows

__all__ = ["bf16_rows", "f16_rows", "round_bf16", "round_f16"]

# the widening kernels live with the dequantizing drivers (gguftool.quants.decode), which the pipeline's slab reader
# shares; this module keeps their names for the forward pass
_F16_TABLE = F16_TABLE


# --- rounding float32 activations to F16 / BF16 and back (what ggml's matmul does to src1 for such weights)
@njit(cache=True, nogil=True)
def _round_f16_rows(x, xu, out, table):
    """out = float32(fp16(x)), fp16 as ggml's fp32_to_fp16 (round to nearest even; NaN -> quiet NaN; overflow ->
    inf): the float32 arithmetic trick of FP16's reference conversion, then the F16 table back to float32.
    x: (rows, n) float32, xu: its uint32 view, out: (rows, n) uint32 view of the float32 result."""
    tmp = np.empty(1, np.float32)
    tmpu = tmp.view(np.uint32)
    to_inf = np.float32(5.192296858534828e+33)     # 2^112
    to_zero = np.float32(7.703719777548943e-34)    # 2^-110
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            f = x[r, i]
            w = xu[r, i]
            base = (abs(f) * to_inf) * to_zero
            shl1_w = np.uint32(w + w)
            sign = w & np.uint32(0x80000000)
            bias = shl1_w & np.uint32(0xFF000000)
            if bias < np.uint32(0x71000000):
                bias = np.uint32(0x71000000)
            tmpu[0] = np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000))
            tmp[0] = tmp[0] + base
            bits = tmpu[0]
            nonsign = ((bits >> np.uint32(13)) & np.uint32(0x00007C00)) + (bits & np.uint32(0x00000FFF))
            h = np.uint32(0x7E00) if shl1_w > np.uint32(0xFF000000) else nonsign
            out[r, i] = table[(sign >> np.uint32(16)) | h]


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
    _round_f16_rows(x, x.view(np.uint32), out.view(np.uint32), _F16_TABLE)
    return out


def round_bf16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, n) -> float32 rounded to BF16 precision (into ``out``, rows x n float32, or a new array)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    if out is None:
        out = np.empty_like(x)
    _round_bf16_rows(x, out)
    return out

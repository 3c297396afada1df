"""F16 and BF16 rows widened to float32: numba kernels that release the GIL, so the forward pass's worker threads
widen their own slabs of a weight at the same time (numpy's float16 cast runs at ~10 ns a value here, too slow to
repeat per batch; these run at memory speed).

Both conversions are exact: BF16 is the top half of a float32; an F16 value is looked up in a 65536-entry table
made by numpy's IEEE conversion (subnormals, infinities and NaN payloads included).
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["bf16_rows", "f16_rows"]

_F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)


@njit(cache=True, nogil=True)
def _bf16_rows(src, out):
    for r in range(src.shape[0]):
        for i in range(src.shape[1]):
            out[r, i] = np.uint32(src[r, i]) << np.uint32(16)


@njit(cache=True, nogil=True)
def _f16_rows(src, out, table):
    for r in range(src.shape[0]):
        for i in range(src.shape[1]):
            out[r, i] = table[src[r, i]]


def bf16_rows(src: np.ndarray, out: np.ndarray) -> None:
    """src: (rows, n) uint16 BF16 words; out: (rows, n) uint32 view of the float32 result."""
    _bf16_rows(src, out)


def f16_rows(src: np.ndarray, out: np.ndarray) -> None:
    """src: (rows, n) uint16 F16 words; out: (rows, n) uint32 view of the float32 result."""
    _f16_rows(src, out, _F16_TABLE)

"""Quantized rows dequantized to float32 by nogil numba kernels, one thread each: the forward pass's product jobs
dequantize their own block of a weight's rows into their thread's scratch right before its GEMM, on all worker
threads at once, as F16/BF16 rows are widened (:mod:`.widen`).

The quants modules' row drivers (``dequantize_rows``) are numba-parallel and hold the GIL: called per block from
the worker threads they would serialize the workers and start numba's own thread pool on top of them. These drivers
run the same block functions (``dequantize_block`` of each type's module: the same values, bit for bit) in a
plain loop. Only the types of the common quant mixes (Q2_K..Q6_K, Q8_0) have one; :func:`driver` returns None
for the others, which the forward pass dequantizes a slab at a time with the parallel drivers.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from numba import njit

from ..gguf.constants import GGMLType
from ..quants import q2_k, q3_k, q4_k, q5_k, q6_k, q8_0

QK_K = 256
QK8_0 = 32


@njit(cache=True, nogil=True, error_model="numpy")
def _q2_k_rows(raw, out):
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK_K):
            q2_k.dequantize_block(raw[r, b * 84:(b + 1) * 84], out[r, b * QK_K:(b + 1) * QK_K])


@njit(cache=True, nogil=True, error_model="numpy")
def _q3_k_rows(raw, out):
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK_K):
            q3_k.dequantize_block(raw[r, b * 110:(b + 1) * 110], out[r, b * QK_K:(b + 1) * QK_K])


@njit(cache=True, nogil=True, error_model="numpy")
def _q4_k_rows(raw, out):
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK_K):
            q4_k.dequantize_block(raw[r, b * 144:(b + 1) * 144], out[r, b * QK_K:(b + 1) * QK_K])


@njit(cache=True, nogil=True, error_model="numpy")
def _q5_k_rows(raw, out):
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK_K):
            q5_k.dequantize_block(raw[r, b * 176:(b + 1) * 176], out[r, b * QK_K:(b + 1) * QK_K])


@njit(cache=True, nogil=True, error_model="numpy")
def _q6_k_rows(raw, out):
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK_K):
            q6_k.dequantize_block(raw[r, b * 210:(b + 1) * 210], out[r, b * QK_K:(b + 1) * QK_K])


@njit(cache=True, nogil=True, error_model="numpy")
def _q8_0_rows(raw, out):
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK8_0):
            q8_0.dequantize_block(raw[r, b * 34:(b + 1) * 34], out[r, b * QK8_0:(b + 1) * QK8_0])


_DRIVERS: dict[GGMLType, Callable[[np.ndarray, np.ndarray], None]] = {
    GGMLType.Q2_K: _q2_k_rows, GGMLType.Q3_K: _q3_k_rows, GGMLType.Q4_K: _q4_k_rows,
    GGMLType.Q5_K: _q5_k_rows, GGMLType.Q6_K: _q6_k_rows, GGMLType.Q8_0: _q8_0_rows,
}


def driver(ttype: GGMLType) -> Callable[[np.ndarray, np.ndarray], None] | None:
    """The nogil single-thread row driver of ``ttype`` (raw (rows, row_bytes) uint8, out (rows, n) float32), or
    None when the type has none."""
    return _DRIVERS.get(ttype)

"""Stored rows decoded to float32 by numba kernels that release the GIL, on as many threads as asked.

Two users decode stored rows on their own threads: the pipeline's slab reader (a quantized, F16 or BF16 input
tensor decoded straight into the float32 buffer the quantizer reads next, ``quantize --allow-requantize`` and
F16/BF16 GGUF inputs) and the forward pass (each product job decodes its own block of weight rows next to its GEMM,
gguftool.model.weights). The type modules' row drivers (``dequantize_rows``) are numba-parallel and hold the GIL:
called from those threads they would serialize them, and block a background read behind the kernels. The
drivers here run the same block functions (``dequantize_block`` of each type's module: the same values, bit for
bit) in a plain loop over the rows they are given, without the GIL; :func:`decode_rows` cuts the rows between
threads.

Types with a driver: F16 and BF16 (exact widening: BF16 is the top half of a float32; F16 through a 65536-entry
table made by numpy's IEEE conversion, subnormals, infinities and NaN payloads included), Q8_0, the legacy
Q4_0/Q4_1/Q5_0/Q5_1 and the K-quants Q2_K..Q6_K. :func:`driver` returns None for the others (IQ, TQ, MXFP4):
:func:`decode_rows` runs their parallel driver instead.

One driver per type, each calling its own module's block function directly: numba's on-disk cache cannot store a
driver that takes the block function as an argument (see registry.py).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
from numba import njit

from ..gguf.constants import GGMLType
from . import q2_k, q3_k, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0

__all__ = ["decode_rows", "driver", "bf16_rows", "f16_rows", "F16_TABLE"]

# F16 bits -> the float32 bits of the same value (numpy's IEEE conversion)
F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)

QK_K = 256


# --- single-thread nogil drivers: raw (rows, row_bytes) uint8 (read-only views of a map welcome), out (rows, n)
@njit(cache=True, nogil=True)
def _bf16_rows(src, out):
    """src: (rows, n) uint16 BF16 words; out: (rows, n) uint32 view of the float32 result."""
    for r in range(src.shape[0]):
        for i in range(src.shape[1]):
            out[r, i] = np.uint32(src[r, i]) << np.uint32(16)


@njit(cache=True, nogil=True)
def _f16_rows(src, out, table):
    """src: (rows, n) uint16 F16 words; out: (rows, n) uint32 view of the float32 result."""
    for r in range(src.shape[0]):
        for i in range(src.shape[1]):
            out[r, i] = table[src[r, i]]


def bf16_rows(src: np.ndarray, out: np.ndarray) -> None:
    """src: (rows, n) uint16 BF16 words; out: (rows, n) uint32 view of the float32 result."""
    _bf16_rows(src, out)


def f16_rows(src: np.ndarray, out: np.ndarray) -> None:
    """src: (rows, n) uint16 F16 words; out: (rows, n) uint32 view of the float32 result."""
    _f16_rows(src, out, F16_TABLE)


def _widen_bf16(raw: np.ndarray, out: np.ndarray) -> None:
    _bf16_rows(raw.view(np.uint16), out.view(np.uint32))


def _widen_f16(raw: np.ndarray, out: np.ndarray) -> None:
    _f16_rows(raw.view(np.uint16), out.view(np.uint32), F16_TABLE)


@njit(cache=True, nogil=True, error_model="numpy")
def _q8_0_rows(raw, out):
    nb = q8_0.BLOCK_BYTES
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // 32):
            q8_0.dequantize_block(raw[r, b * nb:(b + 1) * nb], out[r, b * 32:(b + 1) * 32])


@njit(cache=True, nogil=True, error_model="numpy")
def _q4_0_rows(raw, out):
    nb = q4_0.BLOCK_BYTES
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // 32):
            q4_0.dequantize_block(raw[r, b * nb:(b + 1) * nb], out[r, b * 32:(b + 1) * 32])


@njit(cache=True, nogil=True, error_model="numpy")
def _q4_1_rows(raw, out):
    nb = q4_1.BLOCK_BYTES
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // 32):
            q4_1.dequantize_block(raw[r, b * nb:(b + 1) * nb], out[r, b * 32:(b + 1) * 32])


@njit(cache=True, nogil=True, error_model="numpy")
def _q5_0_rows(raw, out):
    nb = q5_0.BLOCK_BYTES
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // 32):
            q5_0.dequantize_block(raw[r, b * nb:(b + 1) * nb], out[r, b * 32:(b + 1) * 32])


@njit(cache=True, nogil=True, error_model="numpy")
def _q5_1_rows(raw, out):
    nb = q5_1.BLOCK_BYTES
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // 32):
            q5_1.dequantize_block(raw[r, b * nb:(b + 1) * nb], out[r, b * 32:(b + 1) * 32])


@njit(cache=True, nogil=True, error_model="numpy")
def _q2_k_rows(raw, out):
    nb = q2_k.BLOCK_BYTES
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK_K):
            q2_k.dequantize_block(raw[r, b * nb:(b + 1) * nb], out[r, b * QK_K:(b + 1) * QK_K])


@njit(cache=True, nogil=True, error_model="numpy")
def _q3_k_rows(raw, out):
    nb = q3_k.BLOCK_BYTES
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK_K):
            q3_k.dequantize_block(raw[r, b * nb:(b + 1) * nb], out[r, b * QK_K:(b + 1) * QK_K])


@njit(cache=True, nogil=True, error_model="numpy")
def _q4_k_rows(raw, out):
    nb = q4_k.BLOCK_BYTES
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK_K):
            q4_k.dequantize_block(raw[r, b * nb:(b + 1) * nb], out[r, b * QK_K:(b + 1) * QK_K])


@njit(cache=True, nogil=True, error_model="numpy")
def _q5_k_rows(raw, out):
    nb = q5_k.BLOCK_BYTES
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK_K):
            q5_k.dequantize_block(raw[r, b * nb:(b + 1) * nb], out[r, b * QK_K:(b + 1) * QK_K])


@njit(cache=True, nogil=True, error_model="numpy")
def _q6_k_rows(raw, out):
    nb = q6_k.BLOCK_BYTES
    for r in range(raw.shape[0]):
        for b in range(out.shape[1] // QK_K):
            q6_k.dequantize_block(raw[r, b * nb:(b + 1) * nb], out[r, b * QK_K:(b + 1) * QK_K])


_DRIVERS: dict[GGMLType, Callable[[np.ndarray, np.ndarray], None]] = {
    GGMLType.F16: _widen_f16, GGMLType.BF16: _widen_bf16,
    GGMLType.Q8_0: _q8_0_rows, GGMLType.Q4_0: _q4_0_rows, GGMLType.Q4_1: _q4_1_rows,
    GGMLType.Q5_0: _q5_0_rows, GGMLType.Q5_1: _q5_1_rows,
    GGMLType.Q2_K: _q2_k_rows, GGMLType.Q3_K: _q3_k_rows, GGMLType.Q4_K: _q4_k_rows,
    GGMLType.Q5_K: _q5_k_rows, GGMLType.Q6_K: _q6_k_rows,
}


def driver(ttype: GGMLType) -> Callable[[np.ndarray, np.ndarray], None] | None:
    """The nogil single-thread row driver of ``ttype`` (raw (rows, row_bytes) uint8, out (rows, n) float32), or
    None when the type has none."""
    return _DRIVERS.get(ttype)


# --- several threads
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _workers(n: int) -> ThreadPoolExecutor:
    """A pool of at least ``n`` threads, kept for the process (its threads idle between calls)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            old = _pool
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gguftool-decode")
            _pool_size = n
            if old is not None:
                old.shutdown(wait=False)
        return _pool


# below this many float32 values a second thread costs more than it saves
_MIN_SPLIT = 1 << 16


def decode_rows(ttype: GGMLType, raw: np.ndarray, out: np.ndarray, threads: int = 1) -> np.ndarray:
    """Stored rows ``raw`` (rows, row_bytes) uint8 of type ``ttype`` decoded into ``out`` (rows, n) float32, on
    ``threads`` threads (the calling one included); returns ``out``.

    ``raw`` may be a read-only view (of a file's map): nothing is copied. Types without a nogil driver are decoded
    by their module's parallel driver with ``threads`` numba threads (``raw`` copied if it is read-only: one
    compilation of that driver, not two); QuantError for a type gguftool cannot decode."""
    rows = raw.shape[0]
    if rows == 0:
        return out
    fn = _DRIVERS.get(ttype)
    if fn is None:
        from . import dequantize
        return dequantize(raw, ttype, out.shape[1], threads=threads, out=out)
    n = max(1, min(int(threads), rows, out.size // _MIN_SPLIT or 1))
    if n == 1:
        fn(raw, out)
        return out
    cuts = [rows * i // n for i in range(n + 1)]
    pool = _workers(n - 1)
    futs: list[Future] = [pool.submit(fn, raw[cuts[i]:cuts[i + 1]], out[cuts[i]:cuts[i + 1]]) for i in range(1, n)]
    try:
        fn(raw[:cuts[1]], out[:cuts[1]])
    finally:
        for f in futs:
            f.result()
    return out

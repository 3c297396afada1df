"""Public quantization API: float32 rows -> ggml blocks and back, byte-identical to llama.cpp.

    quantize(x, qtype, imatrix=None, threads=None) -> uint8 (rows, row_bytes)
    dequantize(data, qtype, n_per_row, threads=None) -> float32 (rows, n_per_row)
    SUPPORTED_TYPES           the types quantize can produce
    can_dequantize(qtype)     whether dequantize handles a type

The numerics live in one module per type, all with the same interface (block functions and row drivers,
documented in registry.py); this module validates input (shape, dtype, row length, NaN/Inf, imatrix) and
runs the type's numba row driver with the requested number of threads. As in
llama.cpp's ggml_quantize_chunk, an imatrix selects the importance-weighted path (quantize_row_*_impl) of the
types that have one and is ignored by F16, BF16 and Q8_0.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np
from numba import njit

from ..errors import QuantError
from ..gguf.constants import GGMLType
from . import cache, registry

cache.configure()  # before the first cached kernel is defined (this module's own, then every type module's)

__all__ = ["quantize", "dequantize", "SUPPORTED_TYPES", "can_dequantize", "QuantError"]

# F32 is a plain copy (ggml_quantize_chunk's F32 case); everything else has a kernel module.
SUPPORTED_TYPES: tuple[GGMLType, ...] = (GGMLType.F32,) + registry.KERNEL_TYPES

# plain element types gguftool can widen to float32 without a kernel
_PLAIN_DTYPES: dict[GGMLType, np.dtype] = {
    GGMLType.F32: np.dtype("<f4"),
    GGMLType.F64: np.dtype("<f8"),
    GGMLType.I8: np.dtype("i1"),
    GGMLType.I16: np.dtype("<i2"),
    GGMLType.I32: np.dtype("<i4"),
    GGMLType.I64: np.dtype("<i8"),
}

_EMPTY_IMATRIX = np.empty(0, dtype=np.float32)
_thread_lock = threading.Lock()  # numba's thread count is per process: serialise changes to it


# --- type resolution
def _parse_type(qtype) -> GGMLType:
    if isinstance(qtype, GGMLType):
        return qtype
    if isinstance(qtype, (bool, np.bool_)) or not isinstance(qtype, (str, int, np.integer)):
        raise QuantError(f"unknown ggml type {qtype!r}")
    try:
        return GGMLType.parse(int(qtype) if isinstance(qtype, np.integer) else qtype)
    except ValueError:
        raise QuantError(f"unknown ggml type {qtype!r}") from None


def can_dequantize(qtype) -> bool:
    """True if dequantize() handles qtype (a name, id or GGMLType); False for unknown names too."""
    try:
        t = _parse_type(qtype)
    except QuantError:
        return False
    return t in _PLAIN_DTYPES or registry.has_kernel(t)


# --- validation kernels
@njit(cache=True)
def _first_nonfinite(x):
    """(row, kind) of the first non-finite value in row-major order: kind 1 = NaN, 2 = Inf; (-1, 0) if none.

    Each row is screened with an integer max over the exponent fields (vectorises; all ones means NaN or
    Inf); only a row that fails is scanned element by element.
    """
    rows, n = x.shape
    exp_mask = np.uint32(0x7F800000)
    for r in range(rows):
        xu = x[r].view(np.uint32)
        m = np.uint32(0)
        for j in range(n):
            e = xu[j] & exp_mask
            m = e if e > m else m
        if m == exp_mask:
            for j in range(n):
                v = x[r, j]
                if v - v != 0:  # NaN - NaN and Inf - Inf are NaN
                    return r, (1 if v != v else 2)
    return -1, 0


def load_runtime() -> None:
    """Load numba's runtime now rather than at the first kernel: its target context (every implementation numba
    registers) and one small cached kernel. A command calls this during its start-up (gguftool.cli.startup)."""
    _first_nonfinite(np.zeros((1, 1), dtype=np.float32))


def _check_finite(x: np.ndarray, first_row: int) -> None:
    row, kind = _first_nonfinite(x)
    if row >= 0:
        raise QuantError(f"row {first_row + row} contains {'NaN' if kind == 1 else 'Inf'}")


def _check_row_length(t: GGMLType, n_per_row: int) -> None:
    bs = t.block_size
    if n_per_row <= 0 or n_per_row % bs:
        raise QuantError(f"{t.name} needs a row length that is a multiple of {bs}, got {n_per_row}")


def _as_rows(x) -> np.ndarray:
    """x as C-contiguous float32 of shape (rows, n_per_row); a 1-D array is one row."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise QuantError(f"cannot quantize an array of dtype {a.dtype}: expected float32 (or another real dtype)")
    if a.ndim == 1:
        a = a.reshape(1, -1)
    elif a.ndim != 2:
        raise QuantError(f"cannot quantize an array of shape {a.shape}: expected (rows, n_per_row) or one row")
    a = np.ascontiguousarray(a, dtype=np.float32)
    # numba types read-only arrays (mmaps) separately: one more compilation per kernel. Copy instead.
    return a if a.flags.writeable else a.copy()


def _as_imatrix(imatrix, n_per_row: int) -> np.ndarray:
    w = np.asarray(imatrix)
    if w.dtype.kind not in "fiu":
        raise QuantError(f"imatrix must hold real numbers, got dtype {w.dtype}")
    if w.ndim > 1 or w.size != n_per_row:
        got = np.asarray(imatrix).shape
        raise QuantError(f"imatrix must have one weight per column ({n_per_row}), got shape {got}")
    w = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    bad = np.flatnonzero(~(np.isfinite(w) & (w >= 0)))
    if bad.size:
        i = int(bad[0])
        raise QuantError(f"imatrix weight {i} is {float(w[i])}: weights must be finite and non-negative")
    return w


@contextlib.contextmanager
def _threads(threads):
    """Run the numba parallel drivers inside with `threads` threads (None: all), then restore the setting."""
    import numba

    n = numba.config.NUMBA_NUM_THREADS if threads is None else int(threads)
    if n < 1:
        raise QuantError(f"threads must be at least 1, got {threads}")
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    with _thread_lock:
        previous = numba.get_num_threads()
        numba.set_num_threads(n)
        try:
            yield
        finally:
            numba.set_num_threads(previous)


# --- public API
def quantize(x, qtype, imatrix=None, threads=None) -> np.ndarray:
    """Quantize float32 rows to ggml type `qtype` exactly as llama.cpp's ggml_quantize_chunk does.

    x: (rows, n_per_row) array (a 1-D array is one row; other real dtypes and non-contiguous arrays are
    converted to contiguous float32). qtype: a type name in any case ("q4_k") or a GGMLType.
    imatrix: optional per-column importance weights (n_per_row non-negative finite values); selects the
    importance-weighted search for the types that use one. threads: numba threads, None = all cores.
    Returns uint8 of shape (rows, row_bytes). Raises QuantError on an unknown or unsupported type, a row
    length that is not a multiple of the block size, NaN/Inf in a row, or a bad imatrix.
    """
    t = _parse_type(qtype)
    if t not in SUPPORTED_TYPES:
        names = ", ".join(s.name for s in SUPPORTED_TYPES)
        raise QuantError(f"cannot quantize to {t.name}: supported types are {names}")
    a = _as_rows(x)
    rows, n_per_row = a.shape
    _check_row_length(t, n_per_row)
    w = None if imatrix is None else _as_imatrix(imatrix, n_per_row)
    if t == GGMLType.F32:
        _check_finite(a, 0)
        return a.view(np.uint8).copy()
    out = np.empty((rows, t.row_bytes(n_per_row)), dtype=np.uint8)
    if rows == 0:
        return out
    mod = registry.kernels(t)
    if w is None or not mod.USES_IMATRIX:
        w = _EMPTY_IMATRIX
    # One screen over the whole tensor, then one parallel call. (Screening and quantizing in cache-sized
    # chunks saves a trip to memory but costs a thread barrier per chunk, which a busy machine punishes.)
    # quantize_rows_screened(x, out, bad): the reference path with the screen fused in, where a type has one
    screened = mod.quantize_rows_screened if w.size == 0 else None
    with _threads(threads):
        if screened is not None:  # the legacy and float types: the screen is fused into the conversion
            bad = np.zeros(rows, dtype=np.bool_)
            screened(a, out, bad)
            if bad.any():
                r = int(np.argmax(bad))
                _check_finite(a[r:r + 1], r)
            return out
        _check_finite(a, 0)
        mod.quantize_rows(a, w, out)
    return out


def dequantize(data, qtype, n_per_row: int, threads=None, out: np.ndarray | None = None) -> np.ndarray:
    """Decode ggml-encoded rows of type `qtype` to float32 of shape (rows, n_per_row).

    data: uint8 of shape (rows, row_bytes), or any flat bytes-like / array whose bytes are whole rows.
    Handles F32, the plain integer/F64 types and every type quantize() produces; any other type raises
    QuantError naming it. out: a C-contiguous float32 array of shape (rows, n_per_row) to decode into (and
    return) instead of a new one.
    """
    t = _parse_type(qtype)
    if not can_dequantize(t):
        raise QuantError(f"cannot dequantize {t.name} tensors (no decoder for this type)")
    n_per_row = int(n_per_row)
    _check_row_length(t, n_per_row)
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(data, dtype=np.uint8)
    else:
        raw = np.ascontiguousarray(data)
        raw = raw.reshape(-1).view(np.uint8)
    row_bytes = t.row_bytes(n_per_row)
    if raw.size % row_bytes:
        raise QuantError(f"{raw.size} bytes of {t.name} data are not a whole number of rows of "
                         f"{n_per_row} elements ({row_bytes} bytes each)")
    rows = raw.size // row_bytes
    if out is not None and (out.shape != (rows, n_per_row) or out.dtype != np.float32
                            or not out.flags.c_contiguous or not out.flags.writeable):
        raise QuantError(f"out must be writeable C-contiguous float32 of shape {(rows, n_per_row)}, got "
                         f"{out.dtype} {out.shape}")
    if t in _PLAIN_DTYPES:
        with np.errstate(over="ignore"):  # F64 beyond float32's range becomes +-inf, as a C cast would
            plain = raw.view(_PLAIN_DTYPES[t]).reshape(rows, n_per_row)
            if out is None:
                return plain.astype(np.float32)
            out[...] = plain
            return out
    blocks = np.ascontiguousarray(raw.reshape(rows, row_bytes))
    if not blocks.flags.writeable:  # see _as_rows: avoid a separate compilation for read-only input
        blocks = blocks.copy()
    if out is None:
        out = np.empty((rows, n_per_row), dtype=np.float32)
    if rows:
        with _threads(threads):
            registry.kernels(t).dequantize_rows(blocks, out)
    return out

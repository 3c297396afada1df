"""Live llama.cpp oracle for the quantization kernels: ggml_quantize_chunk from llama-cpp-python's
libggml-base.so through ctypes. Generic over the ggml type.

Use from a test module (tests/ is on sys.path: pyproject.toml's pytest pythonpath setting):

    from llama_oracle import oracle_or_skip, adversarial_rows, first_diff_block

    ggml = oracle_or_skip()                        # pytest.skip with the reason when llama_cpp is absent
    ref = ggml.quantize("Q4_K", x, imatrix)        # uint8 (rows, row_bytes); imatrix None -> NULL
    ggml.row_size("Q4_K", 256)                     # ggml_row_size
    back = ggml.dequantize("Q4_K", ref, 256)       # the type's to_float (float32 (rows, n_per_row))

``load_oracle()`` returns ``(oracle, None)`` or ``(None, reason)`` without touching pytest.
``adversarial_rows(n_per_row, rng)`` builds float32 rows that stress the searches (tiny, huge, constant, zero
blocks, spikes, zero sub-blocks, ...). ``first_diff_block(a, b, block_bytes)`` -> (row, block) or None.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np

from gguftool.gguf.constants import GGMLType


class _TypeTraits(ctypes.Structure):
    """struct ggml_type_traits (ggml.h): only to_float is used."""
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class GGMLOracle:
    """Thin ctypes wrapper around libggml-base.so's ggml_quantize_chunk / ggml_row_size."""

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.lib = lib
        self.path = path
        f = lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_void_p]
        g = lib.ggml_row_size
        g.restype = ctypes.c_size_t
        g.argtypes = [ctypes.c_int, ctypes.c_int64]
        h = lib.ggml_get_type_traits
        h.restype = ctypes.POINTER(_TypeTraits)
        h.argtypes = [ctypes.c_int]

    def row_size(self, qtype, n_per_row: int) -> int:
        return int(self.lib.ggml_row_size(int(GGMLType.parse(qtype)), int(n_per_row)))

    def quantize(self, qtype, x: np.ndarray, imatrix: "np.ndarray | None" = None) -> np.ndarray:
        """ggml_quantize_chunk(type, x, dst, 0, rows, n_per_row, imatrix) on one thread (the calling one)."""
        t = int(GGMLType.parse(qtype))
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        rows, n = x.shape
        rb = self.row_size(t, n)
        out = np.zeros((rows, rb), dtype=np.uint8)
        im = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            assert imatrix.shape == (n,)
            im = imatrix.ctypes.data
        written = self.lib.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, rows, n, im)
        assert written == rows * rb, (written, rows * rb)
        return out


    def dequantize(self, qtype, q: np.ndarray, n_per_row: int) -> np.ndarray:
        """The type's to_float (dequantize_row_*) on each row of q (uint8 (rows, row_bytes))."""
        t = int(GGMLType.parse(qtype))
        traits = self.lib.ggml_get_type_traits(t).contents
        if not traits.to_float:
            raise ValueError(f"ggml has no to_float for type {qtype}")
        fn = _TO_FLOAT(traits.to_float)
        q = np.ascontiguousarray(q, dtype=np.uint8)
        if q.ndim == 1:
            q = q[None, :]
        rb = self.row_size(t, n_per_row)
        assert q.shape[1] == rb, (q.shape, rb)
        out = np.zeros((q.shape[0], n_per_row), dtype=np.float32)
        for r in range(q.shape[0]):
            fn(q[r].ctypes.data, out[r].ctypes.data, n_per_row)
        return out


_CACHE: "tuple[GGMLOracle | None, str | None] | None" = None


def load_oracle() -> "tuple[GGMLOracle | None, str | None]":
    global _CACHE
    if _CACHE is not None:
        return _CACHE
    try:
        import llama_cpp  # noqa: F401  (only to locate its lib directory)
    except Exception as e:  # ImportError, or a broken build raising OSError on load
        _CACHE = (None, f"llama-cpp-python is not importable ({type(e).__name__}: {e}); "
                        f"no live llama.cpp oracle for ggml_quantize_chunk")
        return _CACHE
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    path = os.path.join(libdir, "libggml-base.so")
    if not os.path.exists(path):
        _CACHE = (None, f"llama-cpp-python is installed but {path} does not exist")
        return _CACHE
    try:
        lib = ctypes.CDLL(path)
        _CACHE = (GGMLOracle(lib, path), None)
    except (OSError, AttributeError) as e:
        _CACHE = (None, f"cannot load ggml_quantize_chunk from {path}: {e}")
    return _CACHE


def oracle_or_skip() -> GGMLOracle:
    import pytest

    oracle, reason = load_oracle()
    if oracle is None:
        pytest.skip(reason)
    return oracle


def first_diff_block(a: np.ndarray, b: np.ndarray, block_bytes: int):
    """(row, block) of the first differing block of two (rows, row_bytes) arrays, or None if equal."""
    rows = a.shape[0]
    d = (a.reshape(rows, -1, block_bytes) != b.reshape(rows, -1, block_bytes)).any(-1)
    if not d.any():
        return None
    r, blk = np.argwhere(d)[0]
    return int(r), int(blk)


def adversarial_rows(n_per_row: int, rng: np.random.Generator, sub: int = 16) -> np.ndarray:
    """float32 rows that stress scale searches. n_per_row should be a multiple of 256 (any multiple of 32
    works; ``sub`` is the sub-block length used for the zero-sub-block / spike patterns)."""
    n = n_per_row
    g = rng.standard_normal(n).astype(np.float32)
    rows = []
    add = rows.append
    add(np.zeros(n, np.float32))                                  # all zero
    add(np.full(n, 0.37, np.float32))                             # constant positive
    add(np.full(n, -2.5, np.float32))                             # constant negative
    add(g * np.float32(1e-30))                                    # tiny (fp16 underflow of scales)
    add(g * np.float32(1e-8))
    add(g * np.float32(6e-5))                                     # around the fp16 normal threshold
    add(g * np.float32(1e4))                                      # large
    add(g * np.float32(1e6))                                      # scales overflow fp16
    add(g * np.float32(1e30))                                     # huge: sums of squares overflow float32
    add(np.abs(g))                                                # all positive
    add(-np.abs(g))                                               # all negative
    add(np.abs(g) + np.float32(100.0))                            # large positive offset
    add(-np.abs(g) * np.float32(1e-3) - np.float32(1000.0))       # large negative offset, tiny spread
    s = np.zeros(n, np.float32)
    s[rng.integers(n)] = 1.0
    add(s)                                                        # one spike
    s = g * np.float32(1e-3)
    s[::97] = np.float32(50.0)
    add(s)                                                        # sparse spikes
    s = g.copy()
    for k in range(0, n, 2 * sub):
        s[k:k + sub] = 0
    add(s)                                                        # every other sub-block zero
    s = g.copy()
    s[: n // 2] = 0
    add(s)                                                        # half zero
    add(np.round(g * 4).astype(np.float32) / np.float32(4))       # coarse grid
    add(np.round(g * 2).astype(np.float32))                       # small integers
    add((rng.integers(0, 2, n) * 2 - 1).astype(np.float32))       # +-1
    add(np.where(rng.random(n) < 0.5, 0, g).astype(np.float32))   # half the entries zero
    s = g.copy()
    s[::sub] = -np.float32(1e3)
    add(s)                                                        # one negative outlier per sub-block
    add(np.linspace(-1, 1, n, dtype=np.float32))                  # ramp
    add(rng.standard_t(1.5, n).astype(np.float32))                # heavy tails
    add((g * np.float32(1e-3)).astype(np.float32) + np.float32(1.0))
    s = g * np.float32(1e-38)                                     # subnormal floats
    add(s.astype(np.float32))
    add(np.full(n, 65504.0, np.float32) * np.sign(g))             # fp16 max magnitudes
    return np.ascontiguousarray(np.stack(rows).astype(np.float32))

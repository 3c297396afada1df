"""gguftool.quants.decode: stored rows decoded by the nogil drivers, on several threads, into a given buffer.

The reference is gguftool.quants.dequantize (the types' parallel drivers, themselves checked against ggml's
dequantization in test_quants_golden.py): every value equal bit for bit, whatever the thread count, from
read-only input (a file's memory map) without a copy.
"""
from __future__ import annotations

import numpy as np
import pytest

from gguftool.errors import QuantError
from gguftool.gguf.constants import GGMLType as T
from gguftool.quants import decode as D
from gguftool.quants import dequantize, quantize

NOGIL = [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def _rows(n_rows=37, n=512, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n)).astype(np.float32)
    x[3, 17] = 40.0           # one outlier
    x[5] = 0.0                # an all-zero row
    x[7, :32] = 1e-42         # subnormals
    return x


@pytest.mark.parametrize("ttype", NOGIL, ids=lambda t: t.name)
def test_nogil_drivers_equal_dequantize_on_any_thread_count(ttype, monkeypatch):
    q = quantize(_rows(), ttype)
    want = dequantize(q, ttype, 512)
    q.flags.writeable = False                    # as the rows of a file's read-only map
    monkeypatch.setattr(D, "_MIN_SPLIT", 1)      # split even these few rows between threads
    assert D.driver(ttype) is not None
    for threads in (1, 2, 3, 64):
        out = np.full(want.shape, np.nan, np.float32)
        got = D.decode_rows(ttype, q, out, threads)
        assert got is out
        assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), (ttype.name, threads)


def test_f16_widening_keeps_every_code():
    codes = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    out = np.empty((256, 256), np.float32)
    D.decode_rows(T.F16, codes.view(np.uint8), out, 2)
    want = codes.view(np.float16).astype(np.float32)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))   # NaN payloads, infinities, subnormals


def test_type_without_nogil_driver_uses_the_parallel_one_into_the_buffer():
    q = quantize(_rows(n=256), T.IQ4_NL)
    q.flags.writeable = False
    assert D.driver(T.IQ4_NL) is None
    out = np.full((37, 256), np.nan, np.float32)
    assert D.decode_rows(T.IQ4_NL, q, out, 2) is out
    assert np.array_equal(out, dequantize(q, T.IQ4_NL, 256))


def test_dequantize_into_a_given_buffer():
    q = quantize(_rows(n=256), T.Q4_K)
    out = np.empty((37, 256), np.float32)
    assert dequantize(q, T.Q4_K, 256, out=out) is out
    assert np.array_equal(out, dequantize(q, T.Q4_K, 256))
    with pytest.raises(QuantError, match="out must be writeable C-contiguous float32 of shape"):
        dequantize(q, T.Q4_K, 256, out=np.empty((36, 256), np.float32))


def test_zero_rows():
    out = np.empty((0, 256), np.float32)
    assert D.decode_rows(T.Q4_K, np.empty((0, 144), np.uint8), out, 4) is out

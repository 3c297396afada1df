"""Helpers shared by Q4_K and Q5_K (and the other K-types' fp16 fields): 6-bit scale/min packing and
little-endian fp16 fields inside a uint8 block buffer.

``pack_scale_min_k4(q, j, ls, lm)`` stores sub-block j's 6-bit scale/min into the 12-byte ``scales`` array q
the way quantize_row_q4_K/q5_K do (j = 0..7, in increasing order; C uint8_t truncation is reproduced).
``get_scale_min_k4(j, q) -> (sc, m)`` is ggml's get_scale_min_k4.
``put_fp16(y, off, bits)`` / ``get_fp16(y, off) -> float32``: a ggml_half at byte offset off.
"""
from __future__ import annotations

from numba import njit

from gguftool.quants.common import fp16_bits_to_fp32


@njit(cache=True, inline="always", error_model="numpy")
def pack_scale_min_k4(q, j, ls, lm):
    ls = ls & 0xFF
    lm = lm & 0xFF
    if j < 4:
        q[j] = ls
        q[j + 4] = lm
    else:
        q[j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
        q[j - 4] = (int(q[j - 4]) | ((ls >> 4) << 6)) & 0xFF
        q[j] = (int(q[j]) | ((lm >> 4) << 6)) & 0xFF


@njit(cache=True, inline="always", error_model="numpy")
def get_scale_min_k4(j, q):
    if j < 4:
        return int(q[j]) & 63, int(q[j + 4]) & 63
    sc = (int(q[j + 4]) & 0xF) | ((int(q[j - 4]) >> 6) << 4)
    m = (int(q[j + 4]) >> 4) | ((int(q[j]) >> 6) << 4)
    return sc, m


@njit(cache=True, inline="always", error_model="numpy")
def put_fp16(y, off, bits):
    b = int(bits)
    y[off] = b & 0xFF
    y[off + 1] = (b >> 8) & 0xFF


@njit(cache=True, inline="always", error_model="numpy")
def get_fp16(y, off):
    return fp16_bits_to_fp32(int(y[off]) | (int(y[off + 1]) << 8))

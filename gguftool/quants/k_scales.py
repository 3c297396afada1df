"""The 6-bit scale/min packing shared by Q4_K and Q5_K.

``pack_scale_min_k4(q, j, ls, lm)`` stores sub-block j's 6-bit scale/min into the 12-byte ``scales`` array q
the way quantize_row_q4_K/q5_K do (j = 0..7, in increasing order; C uint8_t truncation is reproduced).
``get_scale_min_k4(j, q) -> (sc, m)`` is ggml's get_scale_min_k4.
"""
from __future__ import annotations

from numba import njit


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


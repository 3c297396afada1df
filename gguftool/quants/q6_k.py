"""Q6_K: 6-bit signed quants in 256-blocks of 16 sub-blocks, 8-bit sub-block scales, one fp16 super-scale.

Mirrors ggml-quants.c quantize_row_q6_K_ref (no imatrix), quantize_row_q6_K_impl (imatrix) and
dequantize_row_q6_K. quantize_q6_K runs the ref path when imatrix is NULL; with an imatrix the impl path
passes the raw per-column importance straight to make_qx_quants as weights (the sigma2-based weighting is
commented out in the reference).

Block layout (210 bytes):
    ql[128]     low 4 bits of the quants: for half h (128 values), ql[64h + l] = q[128h+l] | q[128h+l+64] << 4,
                ql[64h + 32 + l] = q[128h+l+32] | q[128h+l+96] << 4   (l in 0..31)
    qh[64]      high 2 bits: qh[32h + l] = q[128h+l]>>4 | q[..+32]>>4 << 2 | q[..+64]>>4 << 4 | q[..+96]>>4 << 6
    scales[16]  int8 sub-block scales
    d           fp16 super-block scale;     x ~= d * scales[i/16] * (q[i] - 32)

The type-module interface of registry.py.
x must be finite (the API layer rejects NaN/Inf): the fast searches round with plain rint where the
reference's nearest_int is exact for finite input. Overflowing intermediates (|x| > ~1e19) are handled as in C.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from gguftool.gguf.constants import GGMLType
from gguftool.quants.bits import GROUP_MAX_EPS, get_fp16, nearest_int_c, put_fp16
from gguftool.quants.blocks import no_row_state
from gguftool.quants.search_symmetric import NT, make_qx_quants_w

GGML_TYPE = GGMLType.Q6_K
USES_IMATRIX = True

QK_K = 256
BLOCK_BYTES = 210
_OFF_QH = 128
_OFF_SC = 192
_OFF_D = 208


# --- one block
@njit(cache=True, error_model="numpy")
def _quantize_block(x, qw, out, L, scales, w, work):
    """quantize_row_q6_K_ref / _impl for one 256-block (qw empty: ref).

    Scratch: L int8[256], scales float32[16], w float32[16], work float32[3*NT].
    """
    max_scale = np.float32(0.0)
    max_abs_scale = np.float32(0.0)
    has_w = qw.size > 0
    for ib in range(16):
        if has_w:
            for i in range(16):
                w[i] = qw[16 * ib + i]
        else:
            for i in range(16):
                xi = x[16 * ib + i]
                w[i] = np.float32(xi * xi)
        scale = make_qx_quants_w(16, 32, x, 16 * ib, L, 16 * ib, w, work)
        scales[ib] = scale
        abs_scale = abs(scale)
        if abs_scale > max_abs_scale:
            max_abs_scale = abs_scale
            max_scale = scale

    if max_abs_scale < GROUP_MAX_EPS:
        for k in range(BLOCK_BYTES):
            out[k] = 0
        return

    iscale = np.float32(np.float32(-128.0) / max_scale)
    put_fp16(out, _OFF_D, np.float32(np.float32(1.0) / iscale))
    for ib in range(16):
        v = nearest_int_c(np.float32(iscale * scales[ib]))
        if v > 127:
            v = 127
        out[_OFF_SC + ib] = v & 0xFF        # stored as int8_t

    dd = get_fp16(out, _OFF_D)
    for j in range(16):
        sc = np.int64(out[_OFF_SC + j])
        sci = sc - 256 if sc > 127 else sc
        d = np.float32(dd * np.float32(sci))
        if d == 0:
            continue
        n_out = 0           # quotients outside nearest_int's exact range (or NaN): rare, take the slow path
        for ii in range(16):
            q = np.float32(x[16 * j + ii] / d)
            w[ii] = q
            n_out += not (abs(q) <= np.float32(4194303.0))
        if n_out == 0:
            for ii in range(16):
                l = np.int32(np.rint(w[ii]))
                L[16 * j + ii] = max(min(l, np.int32(31)), np.int32(-32)) + 32
        else:
            for ii in range(16):
                l = nearest_int_c(w[ii])
                L[16 * j + ii] = max(min(l, 31), -32) + 32

    for h in range(2):
        j = 128 * h
        for l in range(32):
            q1 = L[j + l]
            q2 = L[j + l + 32]
            q3 = L[j + l + 64]
            q4 = L[j + l + 96]
            out[64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            out[64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            out[_OFF_QH + 32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


@njit(cache=True, error_model="numpy")
def make_scratch():
    """L int8[256], scales float32[16], w float32[16], work float32[3*NT]."""
    return np.empty(QK_K, np.int8), np.empty(16, np.float32), np.empty(16, np.float32), np.empty(3 * NT, np.float32)


prepare_row = no_row_state


@njit(cache=True, error_model="numpy")
def quantize_block(x, qw, y, s):
    """quantize_row_q6_K_impl for one block when qw (the block's 256 importance weights) is not empty, else
    quantize_row_q6_K_ref: x float32[256] -> y uint8[210]."""
    L, scales, w, work = s
    _quantize_block(x, qw, y, L, scales, w, work)


@njit(cache=True, error_model="numpy")
def dequantize_block(blk, y):
    """dequantize_row_q6_K for one block: blk uint8[210] -> y float32[256]."""
    d = get_fp16(blk, _OFF_D)
    for h in range(2):
        for l in range(32):
            isc = 8 * h + l // 16
            qh = blk[_OFF_QH + 32 * h + l]
            a = blk[64 * h + l]
            b = blk[64 * h + l + 32]
            q1 = ((a & 0xF) | (((qh >> 0) & 3) << 4)) - 32
            q2 = ((b & 0xF) | (((qh >> 2) & 3) << 4)) - 32
            q3 = ((a >> 4) | (((qh >> 4) & 3) << 4)) - 32
            q4 = ((b >> 4) | (((qh >> 6) & 3) << 4)) - 32
            for k, q in ((0, q1), (2, q2), (4, q3), (6, q4)):
                s = np.int64(blk[_OFF_SC + isc + k])
                if s > 127:
                    s -= 256
                y[128 * h + l + 16 * k] = np.float32(np.float32(d * np.float32(s)) * np.float32(q))


# --- row drivers
@njit(cache=True, parallel=True, error_model="numpy")
def quantize_rows(x, imatrix, out):
    nrows = x.shape[0]
    nb = x.shape[1] // QK_K
    use_w = imatrix.size > 0
    for r in prange(nrows):
        L = np.empty(QK_K, np.int8)
        scales = np.empty(16, np.float32)
        w = np.empty(16, np.float32)
        work = np.empty(3 * NT, np.float32)
        for b in range(nb):
            xb = x[r, b * QK_K:(b + 1) * QK_K]
            ob = out[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES]
            if use_w:
                _quantize_block(xb, imatrix[b * QK_K:(b + 1) * QK_K], ob, L, scales, w, work)
            else:
                _quantize_block(xb, imatrix[0:0], ob, L, scales, w, work)


quantize_rows_screened = None  # no fused NaN/Inf screen: the API screens first (see registry)


@njit(cache=True, parallel=True, error_model="numpy")
def dequantize_rows(data, out):
    nrows = data.shape[0]
    nb = out.shape[1] // QK_K
    for r in prange(nrows):
        for b in range(nb):
            dequantize_block(data[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], out[r, b * QK_K:(b + 1) * QK_K])

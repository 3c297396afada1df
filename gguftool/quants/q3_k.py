"""Q3_K: 3-bit signed quants in 256-blocks of 16 sub-blocks, 6-bit sub-block scales, one fp16 super-scale.

Mirrors ggml-quants.c quantize_row_q3_K_ref (no imatrix: make_q3_quants per sub-block, then the scales
quantized by plain rounding against the largest), quantize_row_q3_K_impl (imatrix: make_qx_quants with
weights qw * sqrt(sigma2 + x^2), sigma2 = 2 * sum(x^2) / 256, and a weighted make_qx_quants over the 16
sub-block scales with the per-sub-block weight sums) and dequantize_row_q3_K. quantize_q3_K runs the ref path
when imatrix is NULL, the impl path otherwise.

Block layout (110 bytes):
    hmask[32]   high (third) bit of each quant: bit (i / 32) of hmask[i % 32] is set when q[i] >= 4
    qs[64]      low 2 bits: for half h, qs[32h + l] = q[128h+l] | q[128h+l+32] << 2 | q[..+64] << 4 | q[..+96] << 6
    scales[12]  16 six-bit scales s[j] (stored + 32): low nibbles of j<8 in bytes 0..7, of j>=8 in the high
                nibbles of bytes 0..7; the top 2 bits of s[j] in byte 8 + j%4 at bit 2*(j/4)
    d           fp16 super-block scale;     x ~= d * (s[i/16] - 32) * (q[i] - 4)

The type-module interface of registry.py.
x must be finite (the API layer rejects NaN/Inf): the fast searches round with plain rint where the
reference's nearest_int is exact for finite input. Overflowing intermediates (|x| > ~1e19) are handled as in C.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from gguftool.gguf.constants import GGMLType
from gguftool.quants.bits import get_fp16, nearest_int_c, put_fp16
from gguftool.quants.blocks import no_row_state
from gguftool.quants.search_lanes import q3_lanes, q3_workspace
from gguftool.quants.search_symmetric import NT, make_qx_quants, make_qx_quants_w

GGML_TYPE = GGMLType.Q3_K
USES_IMATRIX = True

QK_K = 256
BLOCK_BYTES = 110
_OFF_QS = 32
_OFF_SC = 96
_OFF_D = 108
# The reference path's make_q3_quants searches as lanes (search_lanes.q3_lanes): the 16 sub-blocks of two
# super-blocks at a time, 32 lanes = four AVX2 vectors in flight through each element's dependent
# division-and-sums chain (16 lanes left two, latency-bound). Lanes are independent: the bytes do not change.
LANES = 32
_NW = q3_workspace(LANES)


# --- shared tail: scales packing, final rounding against the fp16 scale, bit packing
@njit(cache=True, inline="always", error_model="numpy")
def _pack_scale(out, j, l):
    """Store the 6-bit value l (0..63) of sub-block j in the 12 scale bytes (zeroed beforehand)."""
    if j < 8:
        out[_OFF_SC + j] = l & 0xF
    else:
        out[_OFF_SC + j - 8] |= (l & 0xF) << 4
    out[_OFF_SC + 8 + j % 4] |= (l >> 4) << (2 * (j // 4))


@njit(cache=True, error_model="numpy")
def _finish_block(x, out, L, tmp):
    """Requantize every sub-block against d*sc (the stored fp16 d), then write hmask and qs. tmp: float32[16]."""
    dd = get_fp16(out, _OFF_D)
    for j in range(16):
        if j < 8:
            lo = np.int64(out[_OFF_SC + j]) & 0xF
        else:
            lo = np.int64(out[_OFF_SC + j - 8]) >> 4
        sc = (lo | (((np.int64(out[_OFF_SC + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        d = np.float32(dd * np.float32(sc))
        if d == 0:
            continue            # L keeps what the scale search left there
        n_out = 0               # quotients outside nearest_int's exact range (or NaN): rare, take the slow path
        for ii in range(16):
            q = np.float32(x[16 * j + ii] / d)
            tmp[ii] = q
            n_out += not (abs(q) <= np.float32(4194303.0))
        if n_out == 0:
            for ii in range(16):
                l = np.int32(np.rint(tmp[ii]))
                L[16 * j + ii] = max(min(l, np.int32(3)), np.int32(-4)) + 4
        else:
            for ii in range(16):
                l = nearest_int_c(tmp[ii])
                L[16 * j + ii] = max(min(l, 3), -4) + 4

    # L is in 0..7 here: bit 2 goes to hmask (bit j//32 of byte j%32), bits 0-1 to qs
    for m in range(32):
        hm = 0
        for k in range(8):
            hm |= ((np.int32(L[m + 32 * k]) >> 2) & 1) << k
        out[m] = hm
    for h in range(2):
        j = 128 * h
        for l in range(32):
            out[_OFF_QS + 32 * h + l] = (L[j + l] & 3) | ((L[j + l + 32] & 3) << 2) | \
                ((L[j + l + 64] & 3) << 4) | ((L[j + l + 96] & 3) << 6)


# --- one block
@njit(cache=True, inline="always", error_model="numpy")
def _scales_ref(x, out, L, scales, tmp):
    """One block of quantize_row_q3_K_ref after its 16 searches: the 6-bit scales, d, then the final levels."""
    max_scale = np.float32(0.0)
    amax = np.float32(0.0)
    for j in range(16):
        s = scales[j]
        a = abs(s)
        if a > amax:
            amax = a
            max_scale = s

    for k in range(12):
        out[_OFF_SC + k] = 0
    if max_scale != 0:
        iscale = np.float32(np.float32(-32.0) / max_scale)
        for j in range(16):
            l = nearest_int_c(np.float32(iscale * scales[j]))
            l = ((l + 128) & 0xFF) - 128       # int8_t l = nearest_int(...)
            if l > 31:
                l = 31
            elif l < -32:
                l = -32
            _pack_scale(out, j, l + 32)
        put_fp16(out, _OFF_D, np.float32(np.float32(1.0) / iscale))
    else:
        put_fp16(out, _OFF_D, np.float32(0.0))
    _finish_block(x, out, L, tmp)


@njit(cache=True, error_model="numpy")
def _quantize_ref(x, out, L, scales, tmp, ws):
    """The nblk = x.size // 256 (1 or 2) blocks in x into out. Scratch: L int8[256*nblk], scales
    float32[16*nblk], tmp float32[>= 32], ws float32[_NW]."""
    nblk = x.size // QK_K
    # make_q3_quants(16, 4, x + 16*j, L + 16*j, true) for the 16 * nblk sub-blocks
    q3_lanes(x, ws, L, scales[:16 * nblk], LANES)
    for b in range(nblk):
        _scales_ref(x[QK_K * b:QK_K * (b + 1)], out[BLOCK_BYTES * b:BLOCK_BYTES * (b + 1)],
                    L[QK_K * b:QK_K * (b + 1)], scales[16 * b:16 * b + 16], tmp)


@njit(cache=True, error_model="numpy")
def _quantize_impl(x, qw, out, L, scales, weight, sw, Ls, work):
    """Scratch: L int8[256], scales/weight/sw float32[16], Ls int8[16], work float32[3*NT]."""
    sumx2 = np.float32(0.0)
    for j in range(QK_K):
        sumx2 = np.float32(sumx2 + np.float32(x[j] * x[j]))
    sigma2 = np.float32(np.float32(np.float32(2.0) * sumx2) / np.float32(256.0))

    finite = True
    for j in range(16):
        for l in range(16):
            xv = x[16 * j + l]
            weight[l] = np.float32(qw[16 * j + l] * np.float32(math.sqrt(np.float32(sigma2 + np.float32(xv * xv)))))
        sumw = np.float32(0.0)
        for l in range(16):
            sumw = np.float32(sumw + weight[l])
        sw[j] = sumw
        s = make_qx_quants_w(16, 4, x, 16 * j, L, 16 * j, weight, work)
        scales[j] = s
        if not math.isfinite(s):
            finite = False

    for k in range(12):
        out[_OFF_SC + k] = 0
    if finite:
        d_block = make_qx_quants_w(16, 32, scales, 0, Ls, 0, sw, work)
    else:   # NaN/Inf sub-block scales (float32 overflow of the weighted sums): the reference's C rounding
        d_block = make_qx_quants(16, 32, scales, Ls, 1, sw)
    for j in range(16):
        _pack_scale(out, j, np.int64(Ls[j]))
    put_fp16(out, _OFF_D, d_block)
    _finish_block(x, out, L, work)


@njit(cache=True, error_model="numpy")
def make_scratch():
    """L int8[512], scales float32[32], weight/sw float32[16], Ls int8[16], work float32[3*NT], ws float32[_NW]
    (L and scales sized for the reference path's two blocks at a time)."""
    return (np.empty(2 * QK_K, np.int8), np.empty(32, np.float32), np.empty(16, np.float32), np.empty(16, np.float32),
            np.empty(16, np.int8), np.empty(3 * NT, np.float32), np.empty(_NW, np.float32))


prepare_row = no_row_state


@njit(cache=True, error_model="numpy")
def quantize_block(x, qw, y, s):
    """quantize_row_q3_K_impl for one block when qw (the block's 256 importance weights) is not empty, else
    quantize_row_q3_K_ref: x float32[256] -> y uint8[110]."""
    L, scales, weight, sw, Ls, work, ws = s
    if qw.size > 0:
        _quantize_impl(x, qw, y, L[:QK_K], scales[:16], weight, sw, Ls, work)
    else:
        _quantize_ref(x, y, L, scales, work, ws)


@njit(cache=True, error_model="numpy")
def dequantize_block(blk, y):
    """dequantize_row_q3_K for one block: blk uint8[110] -> y float32[256]."""
    d_all = get_fp16(blk, _OFF_D)
    for h in range(2):
        for j in range(4):
            m = 1 << (4 * h + j)
            shift = 2 * j
            for half in range(2):
                isc = 8 * h + 2 * j + half
                if isc < 8:
                    lo = np.int64(blk[_OFF_SC + isc]) & 0xF
                else:
                    lo = np.int64(blk[_OFF_SC + isc - 8]) >> 4
                sc = (lo | (((np.int64(blk[_OFF_SC + 8 + isc % 4]) >> (2 * (isc // 4))) & 3) << 4)) - 32
                dl = np.float32(d_all * np.float32(sc))
                for l in range(16 * half, 16 * half + 16):
                    q = (np.int64(blk[_OFF_QS + 32 * h + l]) >> shift) & 3
                    if not (np.int64(blk[l]) & m):
                        q -= 4
                    y[128 * h + 32 * j + l] = np.float32(dl * np.float32(q))


# --- row drivers
@njit(cache=True, parallel=True, error_model="numpy")
def quantize_rows(x, imatrix, out):
    nrows = x.shape[0]
    nb = x.shape[1] // QK_K
    use_w = imatrix.size > 0
    for r in prange(nrows):
        L = np.empty(2 * QK_K, np.int8)
        scales = np.empty(32, np.float32)
        weight = np.empty(16, np.float32)
        sw = np.empty(16, np.float32)
        Ls = np.empty(16, np.int8)
        work = np.empty(3 * NT, np.float32)
        ws = np.empty(_NW, np.float32)
        if use_w:
            for b in range(nb):
                xb = x[r, b * QK_K:(b + 1) * QK_K]
                ob = out[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES]
                _quantize_impl(xb, imatrix[b * QK_K:(b + 1) * QK_K], ob, L[:QK_K], scales[:16], weight, sw, Ls,
                               work)
        else:
            for b in range(0, nb, 2):  # two blocks per lane search (the last alone when nb is odd)
                e = min(b + 2, nb)
                _quantize_ref(x[r, b * QK_K:e * QK_K], out[r, b * BLOCK_BYTES:e * BLOCK_BYTES], L, scales, work, ws)


quantize_rows_screened = None  # no fused NaN/Inf screen: the API screens first (see registry)


@njit(cache=True, parallel=True, error_model="numpy")
def dequantize_rows(data, out):
    nrows = data.shape[0]
    nb = out.shape[1] // QK_K
    for r in prange(nrows):
        for b in range(nb):
            dequantize_block(data[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], out[r, b * QK_K:(b + 1) * QK_K])

"""MXFP4 experts of a gpt-oss checkpoint -> ggml's ``block_mxfp4``, bit for bit, without dequantizing.

What llama.cpp's converter does (``conversion/gpt_oss.py``: ``transform_nibble_layout`` + ``repack_mxfp4``),
restated:

- The checkpoint stores each 32-value block as ``*_blocks`` [..., n_block, 16] bytes, two E2M1 codes a byte,
  value 2i in the low nibble and 2i+1 in the high one, and ``*_scales`` [..., n_block] E8M0 exponents.
- ggml's block is 17 bytes: the E8M0 byte unchanged, then 16 bytes where byte j holds value j in its low nibble
  and value j+16 in its high nibble.

So the scale is copied and only the nibbles move: the codes need no remapping (both sides index the same E2M1
table, ggml's ``kvalues_mxfp4``). Pure numpy, no I/O.
"""
from __future__ import annotations

import numpy as np

QK = 32          # values per block
BLOCK_BYTES = 17  # ggml block_mxfp4: uint8 e; uint8 qs[16]


def _codes(half: np.ndarray) -> np.ndarray:
    """8 packed bytes (2 codes each, low nibble first) -> their 16 codes in value order."""
    return np.stack((half & 0x0F, half >> 4), axis=-1).reshape(*half.shape[:-1], 16)


def repack(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``blocks`` uint8 [..., n_block, 16] + ``scales`` uint8 [..., n_block] -> uint8 [..., n_block * 17], the rows
    of ggml MXFP4 blocks (one output row per leading index)."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError("MXFP4 blocks and scales must be uint8")
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
    lo = _codes(blocks[..., :8])    # values 0..15
    hi = _codes(blocks[..., 8:])    # values 16..31
    out = np.empty((*scales.shape, BLOCK_BYTES), np.uint8)
    out[..., 0] = scales
    out[..., 1:] = lo | (hi << 4)
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK_BYTES)

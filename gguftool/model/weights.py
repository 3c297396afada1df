"""The weights of a model for the forward pass, kept in their stored form and widened to float32 in slabs.

llama.cpp multiplies by F16 / BF16 / quantized weights directly. Holding them as float32 instead would need twice
(BF16) to eight times (Q4_K) the file's size: a 7B BF16 model ~28 GB. A ``WeightStore`` therefore never keeps a
float32 copy of a matrix: the forward pass asks for a slab of a matrix's rows just before the product that uses
it, into a scratch buffer it reuses (:meth:`WeightStore.rows_into`), and the token embedding for the rows of the
tokens present only (:meth:`WeightStore.gather`).

- F32 matrices of a GGUF file are read-only views of its memory map: no copy at all, the page cache holds them;
- F16 and BF16 rows are widened by the nogil kernels of :mod:`.widen` (several threads at once);
- quantized rows are dequantized by gguftool's own kernels: for the common K-quants and Q8_0 the nogil
  single-thread drivers of :mod:`gguftool.quants.decode` (several threads at once), else the parallel :mod:`gguftool.quants`
  drivers;
- a Hugging Face checkpoint's tensors (converted on the fly, no stored form) are read whole as float32 and kept
  while the forward pass is in their layer;
- small tensors (norm weights, biases, RoPE factors: 1-D, or at most ``SMALL_ELEMENTS`` values) are read once
  as float32 and kept.

Peak memory is then the mapped file (as much of it as the page cache keeps resident) plus the scratch buffers
and the activations of a batch.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Iterator

import numpy as np

from ..gguf.constants import GGMLType

_LAYER = re.compile(r"^blk\.(\d+)\.")

SMALL_ELEMENTS = 1 << 16      # tensors up to this many values are kept as float32 (norms, biases, factors)


def layer_of(name: str) -> int:
    """The layer index of a ``blk.N.*`` tensor name, -1 for other tensors."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


class WeightStore(Mapping):
    """name -> weight, numpy order (a 2-D ggml tensor (ne0, ne1) is (ne1, ne0) rows of ne0 values).

    ``store[name]`` is a float32 array: kept for small tensors, a view of the file map for F32 data, and for any
    other matrix a new full-size array (tests use it; the forward pass reads matrices with :meth:`rows_into`).
    """

    def __init__(self, tensors):
        self._src = {t.name: t for t in tensors}
        self._small: dict[str, np.ndarray] = {}
        self._raw: dict[str, np.ndarray] = {}
        self._layer_cache: dict[str, np.ndarray] = {}    # see _converted
        self._cache_layer = -2
        self._lock = threading.Lock()

    # --- Mapping
    def __getitem__(self, name: str) -> np.ndarray:
        a = self._small.get(name)
        if a is not None:
            return a
        t = self._src[name]          # KeyError for an unknown name
        a = self._read(name)
        if len(t.shape) == 1 or t.n_elements <= SMALL_ELEMENTS:
            with self._lock:
                self._small[name] = a
        return a

    def __contains__(self, name) -> bool:
        return name in self._src

    def __iter__(self) -> Iterator[str]:
        return iter(self._src)

    def __len__(self) -> int:
        return len(self._src)

    # --- shapes and types without reading
    def shape(self, name: str) -> tuple[int, ...]:
        """The numpy shape of tensor ``name`` (reversed ggml shape; a 1-D tensor stays 1-D)."""
        return tuple(int(d) for d in reversed(self._src[name].shape))

    def type_of(self, name: str) -> GGMLType:
        return self._src[name].type

    def is_mapped_f32(self, name: str) -> bool:
        """True when rows of ``name`` are views of the file (no scratch needed)."""
        return self._raw_rows(name) is not None and self._src[name].type == GGMLType.F32

    def decodes_in_thread(self, name: str) -> bool:
        """True when rows of ``name`` are decoded by a nogil kernel in the calling thread alone (F32 views, F16,
        BF16, the types of :mod:`gguftool.quants.decode`; converted tensors are float32 already), so that several threads decode
        blocks of it at once; False for the other quantized types (numba-parallel kernels that hold the GIL)."""
        if self._raw_rows(name) is None:
            return True
        from ..quants.decode import driver
        t = self._src[name].type
        return t in (GGMLType.F32, GGMLType.F16, GGMLType.BF16) or driver(t) is not None

    @property
    def stored_bytes(self) -> int:
        """Bytes of the weights as stored (what the forward pass maps, not counting the small float32 copies)."""
        return sum(int(getattr(t, "nbytes", 0)) for t in self._src.values())

    # --- reading
    def _read(self, name: str) -> np.ndarray:
        t = self._src[name]
        rows = self.rows_into(name, 0, t.n_elements // t.shape[0], None)
        a = rows.reshape(-1) if len(t.shape) == 1 else rows.reshape(self.shape(name))
        return a if not a.flags.writeable else np.ascontiguousarray(a, dtype=np.float32)

    def _raw_rows(self, name: str) -> np.ndarray | None:
        """The stored bytes as (rows, row_bytes) uint8 (a view of the file map), or None when the source has no
        stored form of its own (a Hugging Face checkpoint converted on the fly)."""
        raw = self._raw.get(name)
        if raw is None:
            t = self._src[name]
            if t.raw_location() is None:     # not stored as it is: no raw rows
                return None
            raw = t.read_raw()
            n_rows = t.n_elements // t.shape[0]
            raw = raw.reshape(n_rows, -1) if n_rows else raw.reshape(0, 0)
            self._raw[name] = raw
        return raw

    def stored_16bit_rows(self, name: str, r0: int, r1: int) -> np.ndarray | None:
        """Rows [r0, r1) of an F16 or BF16 matrix as stored, a view of the file map: uint16 F16 bits or int16 BF16
        bits (r1 - r0, ne0), the formats model.tinyblas reads; None for other types or tensors without a stored
        form."""
        ttype = self._src[name].type
        if ttype not in (GGMLType.F16, GGMLType.BF16):
            return None
        raw = self._raw_rows(name)
        if raw is None:
            return None
        return raw[r0:r1].view(np.uint16 if ttype == GGMLType.F16 else np.int16)

    def rows_into(self, name: str, r0: int, r1: int, scratch: np.ndarray | None) -> np.ndarray:
        """Rows [r0, r1) of matrix ``name`` (a 3-D tensor: of its (n_expert * ne1, ne0) row view) as float32
        (r1 - r0, ne0): a view of the file for F32, else widened / dequantized into ``scratch`` (a writeable float32
        buffer of at least (r1 - r0) * ne0 values; None: a new array). Safe from several threads at once."""
        t = self._src[name]
        ne0 = t.shape[0]
        raw = self._raw_rows(name)
        if raw is None:
            return self._converted(name)[r0:r1]
        out = None if scratch is None else scratch[:(r1 - r0) * ne0].reshape(r1 - r0, ne0)
        return decode_rows(t.type, raw[r0:r1], ne0, out, name)

    def _converted(self, name: str) -> np.ndarray:
        """A tensor with no stored form of its own (a Hugging Face checkpoint's, converted on the fly) as float32
        rows, read whole (its conversion may move rows, as the Q/K permutation does) and kept while the forward
        pass is in its layer: at most one layer's matrices as float32."""
        with self._lock:
            a = self._layer_cache.get(name)
            if a is None:
                layer = layer_of(name)
                if layer != self._cache_layer:
                    self._layer_cache = {}
                    self._cache_layer = layer
                t = self._src[name]
                a = np.ascontiguousarray(t.read_f32(), dtype=np.float32).reshape(-1, t.shape[0])
                self._layer_cache[name] = a
        return a

    def gather(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of matrix ``name`` as a new float32 (len(ids), ne0) array (the token embeddings): only
        the distinct rows asked for are decoded."""
        t = self._src[name]
        ne0 = t.shape[0]
        raw = self._raw_rows(name)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if raw is None:
            return np.ascontiguousarray(self._converted(name)[ids], dtype=np.float32)
        uniq, inv = np.unique(ids, return_inverse=True)
        rows = decode_rows(t.type, raw[uniq], ne0, None, name)
        return rows[inv.reshape(-1)]


def decode_rows(ttype: GGMLType, raw: np.ndarray, ne0: int, out: np.ndarray | None, name: str = "") -> np.ndarray:
    """Stored rows ``raw`` (rows, row_bytes) of type ``ttype`` as float32 (rows, ne0): F32 as a view, the others
    into ``out`` (None: a new array)."""
    n = raw.shape[0]
    if ttype == GGMLType.F32:
        return raw.view(np.float32).reshape(n, ne0)
    if out is None:
        out = np.empty((n, ne0), np.float32)
    if ttype in (GGMLType.F16, GGMLType.BF16):
        from .widen import bf16_rows, f16_rows
        (bf16_rows if ttype == GGMLType.BF16 else f16_rows)(raw.view(np.uint16), out.view(np.uint32))
        return out
    from ..quants.decode import driver
    rows_driver = driver(ttype)
    if rows_driver is not None:      # nogil, this thread only (the common K-quants and Q8_0)
        rows_driver(raw, out)
        return out
    from ..errors import QuantError
    from ..quants import registry
    if not registry.has_kernel(ttype):
        raise QuantError(f"tensor {name}: cannot dequantize type {ttype.name}")
    blocks = np.array(raw)          # numba's kernels take writeable input (one compilation, not two)
    registry.kernels(ttype).dequantize_rows(blocks, out)
    return out

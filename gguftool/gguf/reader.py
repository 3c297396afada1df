"""Read GGUF files: a validating header parser over a memory map, with lazy numpy views of the tensor data.

Opening a file parses and checks only the header (magic, version, KV pairs, tensor infos); tensor data stay in
the memory map until someone asks for them, so a multi-GB model costs only its header pages. Every count,
length and offset read from the file is checked against the bytes actually left before it is used, and every
problem is a ``FormatError`` that names the byte offset where it was found.

Layout (docs/gguf.md, ggml/src/gguf.cpp ``gguf_init_from_file_impl``), all little-endian:

    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv      x  (string key | i32 value type | value)
    n_tensors x  (string name | u32 n_dims | u64 ne[n_dims] | i32 ggml type | u64 offset)
    zero padding to the alignment (general.alignment, default 32)
    data section: each tensor at data_offset + offset, padded to the alignment

    string = u64 length | bytes (no terminator);  array = i32 element type | u64 count | elements
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..errors import FormatError
from .constants import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    KEY_ALIGNMENT,
    TYPE_TRAITS,
    VALUE_DTYPES,
    GGMLType,
    GGUFValueType,
)
from .values import KV, GGUFArray

__all__ = ["GGUFReader", "TensorInfo", "GGML_MAX_DIMS", "kv_to_python"]

GGML_MAX_DIMS = 4

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")

# struct formats of scalar value types (BOOL is read as a byte and turned into a Python bool)
_SCALAR_STRUCTS: dict[GGUFValueType, struct.Struct] = {
    t: struct.Struct("<" + {"<u1": "B", "<i1": "b", "<u2": "H", "<i2": "h", "<u4": "I", "<i4": "i",
                            "<f4": "f", "<u8": "Q", "<i8": "q", "<f8": "d"}[dt])
    for t, dt in VALUE_DTYPES.items()
}
_VALUE_TYPE_IDS = {int(t): t for t in GGUFValueType}
_GGML_TYPE_IDS = {int(t): t for t in GGMLType}

# numpy dtypes of the element-wise tensor types; every other type is a block type exposed as raw rows
_TENSOR_DTYPES: dict[GGMLType, str] = {
    GGMLType.F32: "<f4",
    GGMLType.F16: "<f2",
    GGMLType.BF16: "<u2",  # numpy has no bfloat16: the raw 16-bit patterns
    GGMLType.F64: "<f8",
    GGMLType.I8: "<i1",
    GGMLType.I16: "<i2",
    GGMLType.I32: "<i4",
    GGMLType.I64: "<i8",
}

# smallest possible encodings, used to reject absurd counts before looping over them
_MIN_KV_BYTES = 8 + 1 + 4 + 1      # key length, 1-byte key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length (empty name), n_dims = 0, type, offset


# GGUF spec (docs/gguf.md): keys are at most 2^16-1 bytes; llama.cpp allows tensor names of 63 bytes, we are
# lenient up to the key limit. Both caps keep a corrupted length from costing a huge allocation.
MAX_KEY_LENGTH = 65535
MAX_NAME_LENGTH = 65535


class _Lazy:
    """A string or array found by the first (validating) pass, decoded only once the whole header is valid."""
    __slots__ = ("vtype", "pos", "n", "etype", "items")

    def __init__(self, vtype, pos, n, etype=None, items=None):
        self.vtype, self.pos, self.n, self.etype, self.items = vtype, pos, n, etype, items


# --- public data classes
@dataclass(frozen=True)
class TensorInfo:
    """One tensor info record of a GGUF header.

    ``shape`` is in ggml order (ne0 = row length first) with exactly the n_dims stored in the file; ``offset``
    is relative to the start of the data section; ``info_offset`` is the byte offset in the file where this
    record (its name length) starts.
    """
    name: str
    shape: tuple[int, ...]
    type: GGMLType
    offset: int
    nbytes: int
    n_elements: int
    info_offset: int = 0

    @property
    def n_dims(self) -> int:
        return len(self.shape)

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """The shape in numpy order (ne[n-1], ..., ne0)."""
        return tuple(reversed(self.shape))


def kv_to_python(value: Any) -> Any:
    """A KV value with GGUFArray wrappers removed: numeric arrays stay numpy arrays, strings lists of str,
    nested arrays lists of those."""
    if isinstance(value, GGUFArray):
        if value.element_type == GGUFValueType.ARRAY:
            return [kv_to_python(v) for v in value.values]
        return value.values
    return value


# --- the reader
class GGUFReader:
    """A parsed, validated GGUF header over a read-only memory map of the file.

    ``GGUFReader(path)`` or ``GGUFReader(bytes_like)`` (an in-memory file, handy for tests). Use it as a
    context manager or call ``close()``; numpy views handed out by ``tensor_bytes`` / ``tensor_array`` keep the
    mapping alive after ``close()`` until they are dropped.
    """

    def __init__(self, path: "str | os.PathLike[str] | bytes | bytearray | memoryview"):
        self._mm: mmap.mmap | None = None
        self._closed = False
        if isinstance(path, (bytes, bytearray, memoryview)):
            self.path = "<buffer>"
            buf = bytes(path)
            self.file_size = len(buf)
            self._buf = buf
        else:
            self.path = os.fspath(path)
            self._buf = self._open_map()
        self._metadata: dict[str, Any] | None = None
        self._np: np.ndarray | None = None
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # --- opening
    def _open_map(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise FormatError(f"{self.path}: no such file") from None
        if stat.S_ISDIR(st.st_mode):
            raise FormatError(f"{self.path}: is a directory, not a GGUF file")
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{self.path}: not a regular file")
        self.file_size = st.st_size
        if self.file_size == 0:
            raise FormatError(f"{self.path}: file is empty (0 bytes), not a GGUF file")
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        return self._mm

    def close(self) -> None:
        """Release the memory map (views still held elsewhere keep it alive until they go)."""
        self._closed = True
        self._np = None
        mm, self._mm = self._mm, None
        self._buf = b""
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views of the tensor data are still alive; the map goes with the last of them

    def __enter__(self) -> "GGUFReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- errors
    def _error(self, offset: int, what: str) -> FormatError:
        return FormatError(f"{self.path}: at byte {offset}: {what}")

    # --- low-level reads (all bounds-checked)
    def _need(self, pos: int, n: int, what: str) -> None:
        if n > self.file_size - pos:
            left = max(self.file_size - pos, 0)
            raise self._error(pos, f"{what} needs {n} bytes but only {left} are left in the file (truncated?)")

    def _u32(self, pos: int, what: str) -> int:
        self._need(pos, 4, what)
        return _U32.unpack_from(self._buf, pos)[0]

    def _i32(self, pos: int, what: str) -> int:
        self._need(pos, 4, what)
        return _I32.unpack_from(self._buf, pos)[0]

    def _u64(self, pos: int, what: str) -> int:
        self._need(pos, 8, what)
        return _U64.unpack_from(self._buf, pos)[0]

    def _string_span(self, pos: int, what: str, limit: int | None = None) -> tuple[int, int]:
        """(start, length) of the string at pos, checked against the bytes left (and ``limit``)."""
        n = self._u64(pos, f"length of {what}")
        pos += 8
        if limit is not None and n > limit:
            raise self._error(pos - 8, f"{what} has length {n}, more than the {limit} bytes allowed")
        if n > self.file_size - pos:
            raise self._error(pos - 8, f"{what} has length {n} but only {self.file_size - pos} bytes are left "
                                       f"in the file")
        return pos, n

    def _string(self, pos: int, what: str, limit: int | None = None) -> tuple[str, int]:
        start, n = self._string_span(pos, what, limit)
        return _decode(self._buf[start:start + n]), start + n

    # --- header
    def _parse(self) -> None:
        self._need(0, 4, "magic")
        magic = bytes(self._buf[0:4])
        if magic != GGUF_MAGIC:
            raise self._error(0, f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        version = self._u32(4, "version")
        if version in (1,):
            raise self._error(4, "GGUF version 1 is not supported (only versions 2 and 3 are)")
        if version not in (2, 3):
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in (1, 2, 3):
                raise self._error(4, f"big-endian GGUF file (version {swapped} stored big-endian); only "
                                     f"little-endian files are supported")
            raise self._error(4, f"unsupported GGUF version {version} (only versions 2 and 3 are supported)")
        self.version = version
        n_tensors = self._u64(8, "tensor count")
        n_kv = self._u64(16, "KV count")
        pos = 24
        if n_kv > (self.file_size - pos) // _MIN_KV_BYTES:
            raise self._error(16, f"KV count {n_kv} is impossible: the {self.file_size - pos} bytes left could "
                                  f"hold at most {(self.file_size - pos) // _MIN_KV_BYTES} pairs")
        if n_tensors > (self.file_size - pos) // _MIN_TENSOR_INFO_BYTES:
            raise self._error(8, f"tensor count {n_tensors} is impossible: the {self.file_size - pos} bytes "
                                 f"left could hold at most {(self.file_size - pos) // _MIN_TENSOR_INFO_BYTES} "
                                 f"tensor infos")

        # --- KV pairs
        kvs: list[tuple[str, GGUFValueType, Any]] = []   # values still lazy: resolved once the header checks out
        kv_offsets: list[int] = []
        seen: set[str] = set()
        for i in range(n_kv):
            start = pos
            key, pos = self._string(pos, f"key of KV pair {i}", MAX_KEY_LENGTH)
            if not key:
                raise self._error(start, f"KV pair {i} has an empty key")
            if key in seen:
                raise self._error(start, f"duplicate key {key!r} (KV pair {i})")
            seen.add(key)
            tpos = pos
            type_id = self._i32(pos, f"value type of key {key!r}")
            pos += 4
            vtype = _VALUE_TYPE_IDS.get(type_id)
            if vtype is None:
                raise self._error(tpos, f"key {key!r} has unknown value type {type_id}")
            value, pos = self._value(pos, vtype, key)
            kvs.append((key, vtype, value))
            kv_offsets.append(start)
        self.kv_offsets = kv_offsets
        self._kv_index = {kv[0]: n for n, kv in enumerate(kvs)}

        # --- alignment
        alignment = GGUF_DEFAULT_ALIGNMENT
        if KEY_ALIGNMENT in self._kv_index:
            n = self._kv_index[KEY_ALIGNMENT]
            _, vtype, alignment = kvs[n]
            if vtype != GGUFValueType.UINT32:
                raise self._error(kv_offsets[n], f"{KEY_ALIGNMENT} must be of type UINT32, not {vtype.name}")
            if alignment == 0 or alignment & (alignment - 1):
                raise self._error(kv_offsets[n], f"{KEY_ALIGNMENT} = {alignment} is not a power of two")
        self.alignment = alignment

        # --- tensor infos
        tensors: list[TensorInfo] = []
        names: set[str] = set()
        for i in range(n_tensors):
            info, pos = self._tensor_info(pos, i, names)
            tensors.append(info)
        self.tensors = tensors
        self._tensor_index = {t.name: n for n, t in enumerate(tensors)}
        self.header_end = pos  # end of the last tensor info, before the padding
        self.data_offset = _pad(pos, alignment)
        self._check_tensor_data()
        # Only now, with the whole header known to be consistent, are strings decoded and arrays copied: a
        # corrupted length can no longer make us allocate the rest of a multi-GB file.
        self.kvs = [KV(key, vtype, self._resolve(value)) for key, vtype, value in kvs]

    def _value(self, pos: int, vtype: GGUFValueType, key: str, depth: int = 0) -> tuple[Any, int]:
        if vtype == GGUFValueType.STRING:
            start, n = self._string_span(pos, f"string value of key {key!r}")
            return _Lazy(GGUFValueType.STRING, start, n), start + n
        if vtype == GGUFValueType.ARRAY:
            return self._array(pos, key, depth)
        st = _SCALAR_STRUCTS[vtype]
        self._need(pos, st.size, f"{vtype.name} value of key {key!r}")
        value = st.unpack_from(self._buf, pos)[0]
        if vtype == GGUFValueType.BOOL:
            value = bool(value)
        return value, pos + st.size

    def _array(self, pos: int, key: str, depth: int) -> tuple["_Lazy", int]:
        start = pos
        type_id = self._i32(pos, f"array element type of key {key!r}")
        etype = _VALUE_TYPE_IDS.get(type_id)
        if etype is None:
            raise self._error(pos, f"array of key {key!r} has unknown element type {type_id}")
        n = self._u64(pos + 4, f"array length of key {key!r}")
        pos += 12
        left = self.file_size - pos
        if etype == GGUFValueType.STRING:
            min_size = 8
        elif etype == GGUFValueType.ARRAY:
            min_size = 12
        else:
            min_size = _SCALAR_STRUCTS[etype].size
        if n > left // min_size:
            raise self._error(start + 4, f"array of key {key!r} claims {n} {etype.name} elements but only "
                                         f"{left} bytes are left in the file")
        if etype == GGUFValueType.STRING:
            end = self._skip_strings(pos, n, key)
            return _Lazy(GGUFValueType.ARRAY, pos, n, etype), end
        if etype == GGUFValueType.ARRAY:
            if depth >= 64:
                raise self._error(start, f"arrays of key {key!r} are nested more than 64 deep")
            items = []
            for _ in range(n):
                # each element is itself an array header (element type + count) followed by its elements
                item, pos = self._array(pos, key, depth + 1)
                items.append(item)
            return _Lazy(GGUFValueType.ARRAY, start + 12, n, etype, items), pos
        return _Lazy(GGUFValueType.ARRAY, pos, n, etype), pos + min_size * n

    def _skip_strings(self, pos: int, n: int, key: str) -> int:
        # The hot path of big vocabularies (262,144 tokens): a tight loop over the length prefixes only.
        buf = self._buf
        end = self.file_size
        unpack = _U64.unpack_from
        i = 0
        try:
            for i in range(n):
                ln = unpack(buf, pos)[0]
                pos += 8
                if ln > end - pos:
                    raise self._error(pos - 8, f"string {i} of array {key!r} has length {ln} but only "
                                               f"{end - pos} bytes are left in the file")
                pos += ln
        except struct.error:
            raise self._error(pos, f"string {i} of array {key!r}: length needs 8 bytes but only "
                                   f"{end - pos} are left in the file (truncated?)") from None
        return pos

    def _resolve(self, value: Any) -> Any:
        """Turn a deferred string / array (validated by the first pass) into its final value."""
        if not isinstance(value, _Lazy):
            return value
        buf = self._buf
        if value.vtype == GGUFValueType.STRING:
            return _decode(buf[value.pos:value.pos + value.n])
        et = value.etype
        if et == GGUFValueType.ARRAY:
            return GGUFArray(et, [self._resolve(v) for v in value.items])
        if et == GGUFValueType.STRING:
            unpack = _U64.unpack_from
            out: list[str] = [""] * value.n
            pos = value.pos
            for i in range(value.n):
                ln = unpack(buf, pos)[0]
                pos += 8
                out[i] = buf[pos:pos + ln].decode("utf-8", "surrogateescape")
                pos += ln
            return GGUFArray(et, out)
        dtype = np.bool_ if et == GGUFValueType.BOOL else VALUE_DTYPES[et]
        return GGUFArray(et, np.frombuffer(buf, dtype=dtype, count=value.n, offset=value.pos).copy())

    def _tensor_info(self, pos: int, i: int, names: set[str]) -> tuple[TensorInfo, int]:
        start = pos
        name, pos = self._string(pos, f"name of tensor {i}", MAX_NAME_LENGTH)
        if name in names:
            raise self._error(start, f"duplicate tensor name {name!r} (tensor {i})")
        names.add(name)
        n_dims = self._u32(pos, f"n_dims of tensor {name!r}")
        if n_dims > GGML_MAX_DIMS:
            raise self._error(pos, f"tensor {name!r} has {n_dims} dimensions (at most {GGML_MAX_DIMS} allowed)")
        pos += 4
        self._need(pos, 8 * n_dims, f"dimensions of tensor {name!r}")
        shape = struct.unpack_from(f"<{n_dims}Q", self._buf, pos)
        for j, d in enumerate(shape):
            if d >= 1 << 63:
                raise self._error(pos + 8 * j, f"tensor {name!r} dimension {j} is negative ({d - (1 << 64)})")
        pos += 8 * n_dims
        type_id = self._i32(pos, f"type of tensor {name!r}")
        ttype = _GGML_TYPE_IDS.get(type_id)
        if ttype is None:
            raise self._error(pos, f"tensor {name!r} has unknown ggml type {type_id}")
        pos += 4
        offset = self._u64(pos, f"data offset of tensor {name!r}")
        pos += 8
        traits = TYPE_TRAITS[ttype]
        ne0 = shape[0] if shape else 1
        if ne0 % traits.block_size:
            raise self._error(start, f"tensor {name!r} of type {ttype.name} has rows of {ne0} elements, not a "
                                     f"multiple of the block size {traits.block_size}")
        n_elements = 1
        for d in shape:
            n_elements *= d
        nbytes = n_elements // traits.block_size * traits.type_size
        return TensorInfo(name, tuple(shape), ttype, offset, nbytes, n_elements, start), pos

    def _check_tensor_data(self) -> None:
        data_size = self.file_size - self.data_offset
        if self.tensors and data_size < 0:
            raise self._error(self.header_end, f"the data section should start at byte {self.data_offset} but "
                                               f"the file has only {self.file_size} bytes")
        spans = []
        for t in self.tensors:
            off_pos = t.info_offset + 8 + len(t.name.encode("utf-8", "surrogateescape")) + 4 + 8 * t.n_dims + 4
            if t.offset % self.alignment:
                raise self._error(off_pos, f"tensor {t.name!r} data offset {t.offset} is not a multiple of the "
                                           f"alignment {self.alignment}")
            if t.offset > data_size or t.nbytes > data_size - t.offset:
                raise self._error(off_pos, f"tensor {t.name!r} data ({t.nbytes} bytes at data offset {t.offset}, "
                                           f"file byte {self.data_offset + t.offset}) extends past the end of the "
                                           f"file ({self.file_size} bytes)")
            spans.append((t.offset, t.nbytes, t))
        spans.sort(key=lambda s: (s[0], s[1]))
        prev_end, prev = 0, None
        for off, nbytes, t in spans:
            if prev is not None and off < prev_end and nbytes > 0:
                raise self._error(t.info_offset, f"tensor {t.name!r} data (data offset {off}, {nbytes} bytes) "
                                                 f"overlaps tensor {prev.name!r} (ends at data offset {prev_end})")
            if off + nbytes >= prev_end:
                prev_end, prev = off + nbytes, t

    # --- metadata access
    @property
    def metadata(self) -> dict[str, Any]:
        """key -> value in file order: Python scalars, numpy arrays, lists of str, nested lists."""
        if self._metadata is None:
            self._metadata = {kv.key: kv_to_python(kv.value) for kv in self.kvs}
        return self._metadata

    def get(self, key: str, default: Any = None) -> Any:
        n = self._kv_index.get(key)
        return default if n is None else kv_to_python(self.kvs[n].value)

    def kv(self, key: str) -> KV | None:
        """The typed KV pair of ``key`` (None if absent)."""
        n = self._kv_index.get(key)
        return None if n is None else self.kvs[n]

    def __contains__(self, key: str) -> bool:
        return key in self._kv_index

    # --- tensors
    def tensor(self, name: str) -> TensorInfo:
        n = self._tensor_index.get(name)
        if n is None:
            raise KeyError(f"no tensor named {name!r} in {self.path}")
        return self.tensors[n]

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors)

    def _array_buffer(self) -> np.ndarray:
        if self._np is None:
            if self._closed:
                raise ValueError(f"{self.path}: reader is closed")
            self._np = np.frombuffer(self._buf, dtype=np.uint8)
        return self._np

    def tensor_bytes(self, info: "TensorInfo | str") -> np.ndarray:
        """The stored bytes of a tensor: a read-only uint8 view into the memory map (no copy)."""
        if isinstance(info, str):
            info = self.tensor(info)
        start = self.data_offset + info.offset
        return self._array_buffer()[start:start + info.nbytes]

    def tensor_array(self, info: "TensorInfo | str") -> np.ndarray:
        """A typed view of a tensor: for F32/F16/BF16(as uint16)/F64/I8..I64 shaped in numpy order
        (ne[n-1], ..., ne0); for block types uint8 rows shaped (n_rows, row_bytes)."""
        if isinstance(info, str):
            info = self.tensor(info)
        raw = self.tensor_bytes(info)
        dtype = _TENSOR_DTYPES.get(info.type)
        if dtype is not None:
            return raw.view(dtype).reshape(info.numpy_shape)
        ne0 = info.shape[0] if info.shape else 1
        row_bytes = info.type.row_bytes(ne0)
        n_rows = info.n_elements // ne0 if ne0 else 0
        return raw.reshape(n_rows, row_bytes)

    def data_section(self) -> np.ndarray:
        """Everything from the start of the data section to the end of the file (uint8 view)."""
        return self._array_buffer()[min(self.data_offset, self.file_size):]


# --- helpers
def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _decode(raw) -> str:
    # surrogateescape keeps invalid UTF-8 bytes so that writing the string back reproduces them exactly
    return bytes(raw).decode("utf-8", "surrogateescape")

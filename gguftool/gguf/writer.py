"""Write GGUF files in a stream: header, KV pairs and tensor infos first, then tensor data one tensor at a time.

The layout is the one llama.cpp's ``gguf_write_out`` (ggml/src/gguf.cpp) and gguf-py's ``GGUFWriter`` produce,
so that a file read and written back unchanged is byte-identical:

    header | KVs (in the order added) | tensor infos (in the order declared) | zeros to the alignment
    tensor 0 data | zeros to the alignment | tensor 1 data | zeros to the alignment | ...

Tensor offsets are relative to the data section; unless given explicitly each tensor starts where the previous
one ended, rounded up to the alignment. n_dims is written as given (gguf-py keeps trailing 1s, llama.cpp drops
them; the caller's shape decides).

The output is an unnamed file in the target's folder (gguftool.outfile) that ``finish()`` links into place; an
exception or Ctrl-C inside the ``with`` block drops it and leaves the target untouched, and a killed process
leaves nothing behind.
"""
from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import GGUFError
from ..outfile import OutputFile, check_outputs, commit_all
from .constants import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    KEY_ALIGNMENT,
    TYPE_TRAITS,
    VALUE_DTYPES,
    GGMLType,
    GGUFValueType,
)
from .reader import GGML_MAX_DIMS, TensorInfo
from .values import KV, GGUFArray
from . import write_behind as _wb

__all__ = ["GGUFWriter", "commit_writers", "build_header", "encode_kv", "encode_value"]

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<B", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_SCALAR_STRUCTS = {t: struct.Struct(f) for t, f in _SCALAR_FORMATS.items()}

_CHUNK = 1 << 24  # bytes per write when copying large buffers
_ZEROS = bytes(4096)


# --- encoding of KV pairs (also used by tools that need the exact byte size of a header)
def _encode_string(s: "str | bytes | bytearray") -> bytes:
    raw = s if isinstance(s, (bytes, bytearray)) else s.encode("utf-8", "surrogateescape")
    return _U64.pack(len(raw)) + bytes(raw)


def encode_value(vtype: GGUFValueType, value: Any, key: str = "?") -> bytes:
    """The bytes of a value of type ``vtype`` (without the type tag)."""
    vtype = GGUFValueType(vtype)
    if vtype == GGUFValueType.STRING:
        if not isinstance(value, (str, bytes, bytearray)):
            raise GGUFError(f"key {key!r}: STRING value must be a str, got {type(value).__name__}")
        return _encode_string(value)
    if vtype == GGUFValueType.ARRAY:
        if not isinstance(value, GGUFArray):
            raise GGUFError(f"key {key!r}: ARRAY value must be a GGUFArray, got {type(value).__name__}")
        return _encode_array(value, key)
    st = _SCALAR_STRUCTS[vtype]
    try:
        if vtype == GGUFValueType.BOOL:
            return st.pack(1 if value else 0)
        if vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
            return st.pack(float(value))
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise GGUFError(f"key {key!r}: {vtype.name} value must be an integer, got {value!r}")
        return st.pack(int(value))
    except (struct.error, OverflowError, TypeError, ValueError) as e:
        if isinstance(e, GGUFError):
            raise
        raise GGUFError(f"key {key!r}: value {value!r} does not fit type {vtype.name}") from None


def _encode_array(arr: GGUFArray, key: str) -> bytes:
    etype = GGUFValueType(arr.element_type)
    values = arr.values
    head = _I32.pack(int(etype)) + _U64.pack(len(values))
    if etype == GGUFValueType.STRING:
        parts = [head]
        enc = _encode_string
        try:
            parts.extend(enc(s) for s in values)
        except AttributeError:
            raise GGUFError(f"key {key!r}: array of STRING holds a non-string element") from None
        return b"".join(parts)
    if etype == GGUFValueType.ARRAY:
        parts = [head]
        for item in values:
            if not isinstance(item, GGUFArray):
                raise GGUFError(f"key {key!r}: array of ARRAY holds a {type(item).__name__}, not a GGUFArray")
            parts.append(_encode_array(item, key))
        return b"".join(parts)
    dtype = np.dtype(VALUE_DTYPES[etype])
    if etype == GGUFValueType.BOOL:
        a = np.asarray(values)
        if a.dtype == np.bool_ or a.dtype == np.uint8:
            data = np.ascontiguousarray(a).view(np.uint8) if a.size else np.zeros(0, np.uint8)
        else:
            data = (a != 0).astype(np.uint8)
        return head + data.tobytes()
    a = np.asarray(values)
    if a.dtype != dtype:
        if a.size and a.dtype.kind in "iub" and dtype.kind in "iu":
            info = np.iinfo(dtype)
            if int(a.min()) < info.min or int(a.max()) > info.max:
                raise GGUFError(f"key {key!r}: array values out of range for {etype.name}")
        try:
            a = a.astype(dtype)
        except (TypeError, ValueError, OverflowError):
            raise GGUFError(f"key {key!r}: array values cannot be stored as {etype.name}") from None
    return head + np.ascontiguousarray(a).tobytes()


def encode_kv(kv: KV) -> bytes:
    """The bytes of one KV pair as stored in a GGUF header."""
    if not isinstance(kv, KV):
        raise GGUFError(f"expected a KV, got {type(kv).__name__}")
    vtype = GGUFValueType(kv.type)
    return _encode_string(kv.key) + _I32.pack(int(vtype)) + encode_value(vtype, kv.value, kv.key)


def _encode_tensor_info(t: TensorInfo) -> bytes:
    return (_encode_string(t.name) + _U32.pack(len(t.shape)) + b"".join(_U64.pack(d) for d in t.shape)
            + _I32.pack(int(t.type)) + _U64.pack(t.offset))


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def build_header(kvs: Sequence[KV], tensors: Sequence[TensorInfo], *, version: int = 3,
                 alignment: int = GGUF_DEFAULT_ALIGNMENT) -> tuple[bytes, list[TensorInfo]]:
    """The complete header (magic .. tensor infos, zero-padded to the alignment) for the given KVs and tensor
    infos (their offsets as given), and the tensor infos with ``info_offset`` filled in."""
    parts = [GGUF_MAGIC, _U32.pack(version), _U64.pack(len(tensors)), _U64.pack(len(kvs))]
    parts.extend(encode_kv(kv) for kv in kvs)
    pos = sum(len(p) for p in parts)
    final = []
    for t in tensors:
        rec = _encode_tensor_info(t)
        final.append(TensorInfo(t.name, tuple(t.shape), GGMLType(t.type), t.offset, t.nbytes, t.n_elements, pos))
        parts.append(rec)
        pos += len(rec)
    header = b"".join(parts)
    return header + bytes(_pad(len(header), alignment) - len(header)), final


# --- the writer
class _State(enum.Enum):
    METADATA = 0  # adding KVs and tensor infos
    DATA = 1      # header written, tensor data being written
    WRITTEN = 2   # complete but not yet in place (finish(rename=False))
    DONE = 3      # in place under the target's name (or aborted)


@dataclass
class _Pending:
    name: str
    shape: tuple[int, ...]
    type: GGMLType
    nbytes: int
    n_elements: int
    offset: int | None


class GGUFWriter:
    """Streaming GGUF writer. Typical use::

        with GGUFWriter(out, protect=[src]) as w:
            w.add_kvs(kvs)
            for name, shape, t in plan:
                w.add_tensor_info(name, shape, t)
            w.write_header()
            for name, data in tensors:
                w.write_tensor_data(name, data)   # array / bytes / iterable of chunks
            w.finish()

    ``named=True`` with :meth:`reserve_data`: the tensor data is written by others (gguftool.distributed) into the
    unfinished file, which then has a name (:attr:`part_path`) other processes can open.

    ``write_behind=True``: the data is written by a background thread (``os.writev``, without the GIL) while the
    caller prepares the next chunks (see :mod:`.write_behind`); arrays and buffers given to
    ``write_tensor_data`` / ``copy_data_section`` are then written after the call returns, so they must not be
    modified afterwards. Where os.writev is missing the option does nothing.
    """

    def __init__(self, path: "str | os.PathLike[str]", *, alignment: int | None = None, version: int = 3,
                 overwrite: bool = False, protect: Sequence["str | os.PathLike[str]"] = (),
                 write_behind: bool = False, named: bool = False):
        self.path = os.fspath(path)
        self._named = named
        self._write_behind = write_behind and _wb.available()
        if version not in (2, 3):
            raise GGUFError(f"cannot write GGUF version {version} (only 2 and 3)")
        if alignment is not None:
            _check_alignment(alignment)
        self.version = version
        self._alignment_arg = alignment
        self.alignment: int = alignment or GGUF_DEFAULT_ALIGNMENT
        self._kvs: list[KV] = []
        self._keys: set[str] = set()
        self._pending: list[_Pending] = []
        self._names: set[str] = set()
        self.tensor_infos: list[TensorInfo] = []
        self._state = _State.METADATA
        self._file: Any = None              # the unfinished output file while writing (buffered, binary)
        self._out: OutputFile | None = None
        self._overwrite = overwrite
        self._next = 0          # index of the next tensor to write
        self._data_start = 0    # absolute file offset of the data section
        self._pos = 0           # bytes written so far
        self._check_target(overwrite, protect)

    # --- target checks
    def _check_target(self, overwrite: bool, protect) -> None:
        check_outputs([self.path], protect, overwrite=overwrite)

    # --- metadata
    def add_kv(self, kv: KV) -> None:
        self._require(_State.METADATA, "add_kv")
        if not isinstance(kv, KV):
            raise GGUFError(f"add_kv expects a KV, got {type(kv).__name__}")
        if not kv.key:
            raise GGUFError("empty metadata key")
        if kv.key in self._keys:
            raise GGUFError(f"duplicate metadata key {kv.key!r}")
        if kv.key == KEY_ALIGNMENT:
            if kv.type != GGUFValueType.UINT32:
                raise GGUFError(f"{KEY_ALIGNMENT} must be UINT32, not {GGUFValueType(kv.type).name}")
            _check_alignment(kv.value)
            if self._alignment_arg is not None and kv.value != self._alignment_arg:
                raise GGUFError(f"{KEY_ALIGNMENT} = {kv.value} contradicts alignment={self._alignment_arg}")
            self.alignment = int(kv.value)
        self._keys.add(kv.key)
        self._kvs.append(kv)

    def add_kvs(self, kvs: Iterable[KV]) -> None:
        for kv in kvs:
            self.add_kv(kv)

    @property
    def kvs(self) -> list[KV]:
        return list(self._kvs)

    def add_tensor_info(self, name: str, shape: Sequence[int], type: "GGMLType | int | str", *,
                        offset: int | None = None) -> None:
        """Declare a tensor (shape in ggml order, ne0 first). ``offset`` (relative to the data section) is
        normally computed; give it to reproduce a file's layout exactly (it must be aligned and after the
        previous tensor)."""
        self._require(_State.METADATA, "add_tensor_info")
        if name in self._names:
            raise GGUFError(f"duplicate tensor name {name!r}")
        try:
            ttype = GGMLType.parse(type)
        except ValueError as e:
            raise GGUFError(f"tensor {name!r}: {e}") from None
        shape = tuple(int(d) for d in shape)
        if len(shape) > GGML_MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {len(shape)} dimensions (at most {GGML_MAX_DIMS})")
        if any(d < 0 for d in shape):
            raise GGUFError(f"tensor {name!r} has a negative dimension: {shape}")
        traits = TYPE_TRAITS[ttype]
        ne0 = shape[0] if shape else 1
        if ne0 % traits.block_size:
            raise GGUFError(f"tensor {name!r}: row length {ne0} is not a multiple of the {ttype.name} block "
                            f"size {traits.block_size}")
        n = 1
        for d in shape:
            n *= d
        self._names.add(name)
        self._pending.append(_Pending(name, shape, ttype, n // traits.block_size * traits.type_size, n, offset))

    # --- header
    def write_header(self) -> None:
        """Compute tensor offsets, open the output file and write header, KVs, tensor infos and padding."""
        self._require(_State.METADATA, "write_header")
        align = self.alignment
        if align != GGUF_DEFAULT_ALIGNMENT and KEY_ALIGNMENT not in self._keys:
            # readers only learn a non-default alignment from this key
            self.add_kv(KV(KEY_ALIGNMENT, GGUFValueType.UINT32, align))
        infos: list[TensorInfo] = []
        end = 0
        for p in self._pending:
            off = _pad(end, align) if p.offset is None else int(p.offset)
            if off < 0 or off % align:
                raise GGUFError(f"tensor {p.name!r}: offset {off} is not a multiple of the alignment {align}")
            infos.append(TensorInfo(p.name, p.shape, p.type, off, p.nbytes, p.n_elements))
            end = max(end, off + p.nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in infos if t.nbytes)
        for (_, end0, name0), (start1, _, name1) in zip(spans, spans[1:]):
            if start1 < end0:
                raise GGUFError(f"tensor {name1!r} (offset {start1}) overlaps tensor {name0!r} (ends at {end0})")
        header, final = build_header(self._kvs, infos, version=self.version, alignment=align)
        self.tensor_infos = final
        self._open_temp()
        if self._write_behind:
            self._file = _wb.WriteBehind(self._file)
        self._write(header)
        self._data_start = len(header)
        self._state = _State.DATA

    @property
    def part_path(self) -> str | None:
        """The unfinished file's temporary path (``named=True``, after write_header), else None."""
        return self._out.temp_path if self._out is not None else None

    def reserve_data(self) -> None:
        """Instead of write_tensor_data: size the file for every declared tensor (zeros, sparse where the
        filesystem allows) and count them all as written; their bytes are then put at ``data_offset`` +
        ``tensor_infos[i].offset`` by whoever computes them (os.pwrite). finish() closes the file as usual."""
        if self._state == _State.METADATA:
            self.write_header()
        self._require(_State.DATA, "reserve_data")
        if self._next:
            raise GGUFError("reserve_data after write_tensor_data")
        end = max((t.offset + t.nbytes for t in self.tensor_infos), default=0)
        self._file.flush()
        size = self._data_start + _pad(end, self.alignment)
        assert self._out is not None
        os.ftruncate(self._out.fileno(), size)
        self._pos = size
        self._next = len(self.tensor_infos)

    def pwrite(self, offset: int, data: Any) -> None:
        """Write ``data`` at the absolute file ``offset`` (after reserve_data)."""
        if self._next != len(self.tensor_infos) or self._out is None:
            raise GGUFError("pwrite() before reserve_data()")
        fd = self._out.fileno()
        for chunk in _chunks(data):
            done = 0
            while done < chunk.nbytes:
                done += os.pwrite(fd, chunk[done:], offset + done)
            offset += chunk.nbytes

    @property
    def data_offset(self) -> int:
        """Absolute file offset of the data section (valid after write_header)."""
        return self._data_start

    # --- tensor data
    def write_tensor_data(self, name: str, data: Any) -> None:
        """Write the next tensor's bytes: a numpy array (any dtype, written as its raw bytes in C order),
        bytes / bytearray / memoryview, or an iterable of those chunks. The total must equal the declared size."""
        if self._state == _State.METADATA:
            self.write_header()
        self._require(_State.DATA, "write_tensor_data")
        if self._next >= len(self.tensor_infos):
            raise GGUFError(f"tensor {name!r}: all {len(self.tensor_infos)} declared tensors are already written")
        info = self.tensor_infos[self._next]
        if name != info.name:
            raise GGUFError(f"tensor data written out of order: expected {info.name!r}, got {name!r}")
        target = self._data_start + info.offset
        if self._pos > target:
            raise GGUFError(f"tensor {name!r}: data would start at {self._pos}, past its offset {target}")
        self._zeros(target - self._pos)
        written = 0
        for chunk in _chunks(data):
            n = chunk.nbytes
            if written + n > info.nbytes:
                raise GGUFError(f"tensor {name!r}: got more than the declared {info.nbytes} bytes "
                                f"({info.type.name} {list(info.shape)})")
            self._write(chunk)
            written += n
        if written != info.nbytes:
            raise GGUFError(f"tensor {name!r}: got {written} bytes, expected {info.nbytes} "
                            f"({info.type.name} {list(info.shape)})")
        self._zeros(_pad(self._pos, self.alignment) - self._pos)
        self._next += 1

    def copy_data_section(self, data: Any) -> None:
        """Write a whole data section verbatim (from another file with the same tensor offsets and alignment)
        instead of writing tensors one by one; it must cover every declared tensor."""
        if self._state == _State.METADATA:
            self.write_header()
        self._require(_State.DATA, "copy_data_section")
        if self._next:
            raise GGUFError("copy_data_section after write_tensor_data")
        need = max((t.offset + t.nbytes for t in self.tensor_infos), default=0)
        written = 0
        for chunk in _chunks(data):
            self._write(chunk)
            written += chunk.nbytes
        if written < need:
            raise GGUFError(f"data section has {written} bytes but the tensors need {need}")
        self._next = len(self.tensor_infos)

    # --- completion
    def finish(self, rename: bool = True) -> None:
        """Check every tensor was written, flush, and put the file in place under the target's name.

        rename=False keeps the complete file out of sight until ``commit()`` (or ``commit_writers()``, so that
        several files are made visible only once all of them are written); ``abort()`` still deletes it."""
        if self._state in (_State.DONE, _State.WRITTEN):
            if rename:
                self.commit()
            return
        try:
            if self._state == _State.METADATA:
                self.write_header()
            if self._next != len(self.tensor_infos):
                missing = self.tensor_infos[self._next].name
                raise GGUFError(f"{self.path}: only {self._next} of {len(self.tensor_infos)} tensors were "
                                f"written (next: {missing!r})")
            f, self._file = self._file, None
            # no fsync: like llama.cpp; linking only a complete file guarantees nobody sees a partial one
            f.close()
            self._state = _State.WRITTEN
            if rename:
                self.commit()
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        """Put a finished file in place under the target's name (after ``finish(rename=False)``)."""
        commit_writers([self])

    def abort(self) -> None:
        """Close and delete the unfinished file; the target is left as it was."""
        self._state = _State.DONE
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        out, self._out = self._out, None
        if out is not None:
            out.abort()

    close = abort

    def __enter__(self) -> "GGUFWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state != _State.DONE:
            self.finish()

    def __del__(self):
        if getattr(self, "_out", None) is not None:
            self.abort()

    # --- internals
    def _require(self, state: _State, what: str) -> None:
        if self._state != state:
            raise GGUFError(f"{what}() not allowed now: writer is in state {self._state.name}")

    def _open_temp(self) -> None:
        self._out = OutputFile(self.path, overwrite=self._overwrite, named=self._named)
        self._file = self._out.stream(buffering=1 << 20)

    def _write(self, data) -> None:
        self._file.write(data)
        self._pos += len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes

    def _zeros(self, n: int) -> None:
        while n > 0:
            k = min(n, len(_ZEROS))
            self._write(_ZEROS[:k])
            n -= k


def commit_writers(writers: Sequence[GGUFWriter]) -> None:
    """Put the files of several writers finished with ``finish(rename=False)`` in place all together, or none of
    them (see gguftool.outfile.commit_all); on an error every writer is aborted."""
    todo = [w for w in writers if w._state != _State.DONE]
    for w in todo:
        if w._state != _State.WRITTEN:
            raise GGUFError(f"commit() not allowed now: writer is in state {w._state.name}")
    try:
        commit_all([w._out for w in todo if w._out is not None])   # state WRITTEN: every one has its file
    except BaseException:
        for w in todo:
            w.abort()
        raise
    for w in todo:
        w._out = None
        w._state = _State.DONE
# The largest alignment accepted: llama.cpp only requires a power of two, but every tensor is padded to it, so
# an absurd one (2**31) turns a small model into a file of many GB. 64 KiB covers every page size in use.
MAX_ALIGNMENT = 1 << 16


def _check_alignment(a: Any) -> None:
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or a <= 0 or int(a) & (int(a) - 1):
        raise GGUFError(f"{KEY_ALIGNMENT} = {a!r} is not a power of two")
    if a > MAX_ALIGNMENT:
        raise GGUFError(f"{KEY_ALIGNMENT} = {a!r} is too large: gguftool writes alignments up to {MAX_ALIGNMENT} "
                        f"(each tensor is padded to it)")


def _as_bytes_view(x: Any) -> "memoryview | None":
    if isinstance(x, np.ndarray):
        a = np.ascontiguousarray(x).reshape(-1)
        return a.view(np.uint8).data
    if isinstance(x, (bytes, bytearray)):
        return memoryview(x)
    if isinstance(x, memoryview):
        return x.cast("B") if x.format != "B" or x.ndim != 1 else x
    return None


def _chunks(data: Any):
    """Yield memoryviews of bytes from an array, a bytes-like object or an iterable of them."""
    mv = _as_bytes_view(data)
    if mv is not None:
        for i in range(0, mv.nbytes, _CHUNK):
            yield mv[i:i + _CHUNK]
        return
    try:
        it = iter(data)
    except TypeError:
        raise GGUFError(f"tensor data must be an array, bytes or an iterable of them, not "
                        f"{type(data).__name__}") from None
    for item in it:
        mv = _as_bytes_view(item)
        if mv is None:
            raise GGUFError(f"tensor data chunk must be an array or bytes, not {type(item).__name__}")
        for i in range(0, mv.nbytes, _CHUNK):
            yield mv[i:i + _CHUNK]

"""A GGUF file as a TensorSource: what ``gguftool quantize`` feeds into the pipeline.

Tensors stay in the reader's memory map until the pipeline asks for them; ``read_f32`` of an F32 tensor is a
view of the map (file-backed pages, no anonymous memory), F16/BF16 are widened, and quantized tensors are
dequantized with :func:`gguftool.quants.dequantize` (the pipeline only does that with --allow-requantize).
``read_rows`` gives a slab of rows so that a big tensor never needs a full float32 copy.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Callable

import numpy as np

from ..errors import FormatError, QuantError
from .constants import GGMLType, GGUFValueType
from .reader import GGUFReader, TensorInfo
from ..pipeline.source import SourceRecipe, SourceTensor, TensorSource

__all__ = ["GGUFTensor", "GGUFSource", "GGUFRecipe", "open_gguf_source"]


class GGUFTensor(SourceTensor):
    """One tensor of a GGUF file (lazy)."""

    concurrent_reads = True   # pread of a file opened once, or views of the reader's map made at open

    def __init__(self, reader: GGUFReader, info: TensorInfo, split_index: int = 0,
                 fd: Callable[[], int | None] | None = None):
        """``fd``: gives a read-only file descriptor of the reader's file (opened once, by the source) for pread,
        or None; without it F32 rows are copied out of the map."""
        self._reader = reader
        self._fd = fd
        self.info = info
        self.split_index = split_index   # which file of a split model holds it
        self.name = info.name
        self.shape = tuple(info.shape) if info.shape else (1,)
        self.type = info.type

    @property
    def ne0(self) -> int:
        return self.shape[0]

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.ne0 if self.ne0 else 0

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    def read_raw(self) -> np.ndarray:
        return self._reader.tensor_bytes(self.info)

    def read_f32(self) -> np.ndarray:
        return self.read_rows(0, self.n_rows)

    def raw_location(self) -> tuple[str, int] | None:
        path = self._reader.path
        if not os.path.isfile(path):   # (a reader over a buffer has path "<buffer>")
            return None
        return path, self._reader.data_offset + self.info.offset

    def split_position(self) -> tuple[int, int]:
        return self.split_index, self.info.offset

    def read_rows_into(self, start: int, stop: int, buf: np.ndarray, threads: int = 1) -> np.ndarray:
        """Rows [start, stop) as float32 in ``buf`` (its first (stop - start) * ne0 values), returned as a
        (stop - start, ne0) view of it.

        F32 rows are read with pread: a kernel copy from the page cache (copying from the memory map instead would
        fault every page of the input and of the buffer in). F16, BF16 and quantized rows are decoded from the
        memory map straight into ``buf`` by ``threads`` threads (gguftool.quants.decode: nogil kernels, so a
        background read runs beside the quantizer); without a file descriptor, F32 rows are copied from the map.
        """
        ne0 = self.ne0
        n = (stop - start) * ne0
        out = buf[:n].reshape(stop - start, ne0)
        t = self.type
        if t != GGMLType.F32:
            return self._decode(self._stored_rows(start, stop), out, threads)
        fd = self._fd() if self._fd is not None else None
        if fd is None:
            np.copyto(out, self._stored_rows(start, stop).view("<f4"))
            return out
        mv = out.reshape(-1).data.cast("B")
        pos = self._reader.data_offset + self.info.offset + start * ne0 * 4
        done = 0
        while done < mv.nbytes:
            k = os.preadv(fd, [mv[done:]], pos + done)
            if k <= 0:
                raise FormatError(f"{self._reader.path}: tensor {self.name}: file ended while reading its data "
                                  f"(file truncated while in use?)")
            done += k
        return out

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32, shape (stop - start, ne0). F32 data is a read-only view of the file."""
        raw = self._stored_rows(start, stop)
        if self.type == GGMLType.F32:
            return raw.view("<f4")
        return self._decode(raw, np.empty((stop - start, self.ne0), np.float32), 1)

    def _stored_rows(self, start: int, stop: int) -> np.ndarray:
        """The stored bytes of rows [start, stop): a read-only (stop - start, row_bytes) uint8 view of the map."""
        row_bytes = self.type.row_bytes(self.ne0)
        raw = self._reader.tensor_bytes(self.info)[start * row_bytes:stop * row_bytes]
        return raw.reshape(stop - start, row_bytes)

    def _decode(self, raw: np.ndarray, out: np.ndarray, threads: int) -> np.ndarray:
        from ..quants.decode import decode_rows  # numba: only loaded when such a tensor is read

        try:
            return decode_rows(self.type, raw, out, threads)
        except (KeyError, NotImplementedError, ValueError) as e:
            raise QuantError(f"tensor {self.name}: cannot dequantize type {self.type.name}: {e}") from None


class GGUFSource(TensorSource):
    """TensorSource over one GGUF file, or over the files of a split model (the first file's metadata, every
    file's tensors); close() (or use as a context manager) to release the maps."""

    def __init__(self, readers: "GGUFReader | list[GGUFReader]"):
        readers = [readers] if isinstance(readers, GGUFReader) else list(readers)
        self._fds: dict[str, int | None] = {}
        tensors: list[SourceTensor] = [GGUFTensor(r, t, i, self._fd_provider(r.path))
                                       for i, r in enumerate(readers) for t in r.tensors]
        super().__init__(kvs=list(readers[0].kvs), tensors=tensors)
        self.readers = readers
        self.reader = readers[0]
        self.path = self.reader.path
        self.paths = [r.path for r in readers]

    def _fd_provider(self, path: str) -> Callable[[], int | None] | None:
        if not hasattr(os, "preadv") or not os.path.isfile(path):
            return None
        return functools.partial(self._get_fd, path)

    def _get_fd(self, path: str) -> int | None:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError:
                self._fds[path] = None
        return self._fds[path]

    def input_files(self) -> list[str]:
        """The GGUF file and, for a split model, every other split."""
        return list(self.paths)

    def recipe(self) -> "GGUFRecipe | None":
        path = os.path.abspath(self.path)
        return GGUFRecipe(path) if os.path.isfile(path) else None   # (not for a reader over a buffer)

    def close(self) -> None:
        self.tensors = []
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            if fd is not None:
                os.close(fd)
        for r in self.readers:
            r.close()

    def __enter__(self) -> "GGUFSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- split models (llama.cpp's gguf-split: NAME-00001-of-00003.gguf ...; llama_model_loader loads them together)
KEY_SPLIT_NO = "split.no"
KEY_SPLIT_COUNT = "split.count"
KEY_SPLIT_TENSORS = "split.tensors.count"
_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_path(prefix: str, index: int, count: int) -> str:
    """llama_split_path: the file name of split ``index`` (0-based) of ``count``."""
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf"


_INT_TYPES = (GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
              GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64)
# llama.cpp reads split.no / split.count as uint16 and split.tensors.count as int32
_SPLIT_RANGES = {KEY_SPLIT_NO: (0, 65535), KEY_SPLIT_COUNT: (0, 65535), KEY_SPLIT_TENSORS: (0, 2**31 - 1)}


def _split_key(r: GGUFReader, key: str) -> int | None:
    """A split.* key as an int (None when absent), checked for an integer type and llama.cpp's range."""
    kv = r.kv(key)
    if kv is None:
        return None
    lo, hi = _SPLIT_RANGES[key]
    if kv.type not in _INT_TYPES or not lo <= kv.value <= hi:
        raise FormatError(f"{r.path}: {key} must be an integer from {lo} to {hi}, got "
                          f"{GGUFValueType(kv.type).name.lower()} {kv.value!r}")
    return int(kv.value)


def _split_readers(first: GGUFReader) -> list[GGUFReader]:
    """The readers of every split of the model whose first split is ``first`` (checked as llama.cpp checks)."""
    path = first.path
    count = _split_key(first, KEY_SPLIT_COUNT) or 0
    if count <= 1:
        return [first]
    no = _split_key(first, KEY_SPLIT_NO) or 0
    if no != 0:
        raise FormatError(f"{path}: this is split {no + 1} of {count} of a model: give its first split "
                          f"(the file ending in -00001-of-{count:05d}.gguf)")
    m = _SPLIT_NAME.match(path)
    if m is None or int(m.group("no")) != 1 or int(m.group("count")) != count:
        raise FormatError(f"{path}: the first of {count} splits, but its name does not end in "
                          f"-00001-of-{count:05d}.gguf, so the other splits cannot be found")
    readers = [first]
    seen = {t.name for t in first.tensors}
    try:
        for i in range(1, count):
            p = split_path(m.group("prefix"), i, count)
            if not os.path.isfile(p):
                raise FormatError(f"{p}: missing split {i + 1} of {count}")
            r = GGUFReader(p)
            readers.append(r)
            split_no = _split_key(r, KEY_SPLIT_NO)
            if split_no is None:
                raise FormatError(f"{p}: not a split of {path} (no {KEY_SPLIT_NO} key)")
            if split_no != i:
                raise FormatError(f"{p}: {KEY_SPLIT_NO} is {split_no}, expected {i}")
            for t in r.tensors:
                if t.name in seen:
                    raise FormatError(f"{p}: tensor {t.name} is duplicated across the splits")
                seen.add(t.name)
        expected = _split_key(first, KEY_SPLIT_TENSORS)
        if expected is not None and expected != len(seen):
            raise FormatError(f"{path}: the splits hold {len(seen)} tensors, {expected} expected "
                              f"({KEY_SPLIT_TENSORS})")
    except BaseException:
        for r in readers[1:]:
            r.close()
        raise
    return readers


class GGUFRecipe(SourceRecipe):
    """A GGUF file (the first split of a split model) opened again by its absolute path."""

    def __init__(self, path: str):
        self.path = path

    def open(self) -> GGUFSource:
        return open_gguf_source(self.path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GGUFRecipe) and other.path == self.path

    def __hash__(self) -> int:
        return hash(("gguf", self.path))


def open_gguf_source(path: "str | os.PathLike[str]") -> GGUFSource:
    """Open a GGUF file as a source; the first file of a split model opens all of its splits. A non-GGUF or
    damaged file raises FormatError naming the offset; a split model with a missing or mismatched split names
    it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file")
    first = GGUFReader(path)
    try:
        readers = _split_readers(first)
    except BaseException:
        first.close()
        raise
    return GGUFSource(readers)

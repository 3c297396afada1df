"""A GGUF file as a TensorSource: what ``gguftool quantize`` feeds into the pipeline.

Tensors stay in the reader's memory map until the pipeline asks for them; ``read_f32`` of an F32 tensor is a
view of the map (file-backed pages, no anonymous memory), F16/BF16 are widened, and quantized tensors are
dequantized with :func:`gguftool.quants.dequantize` (the pipeline only does that with --allow-requantize).
``read_rows`` gives a slab of rows so that a big tensor never needs a full float32 copy.
"""
from __future__ import annotations

import os

import numpy as np

from .errors import FormatError, QuantError
from .gguf.constants import GGMLType
from .gguf.reader import GGUFReader, TensorInfo
from .source import SourceTensor, TensorSource

__all__ = ["GGUFTensor", "GGUFSource", "open_gguf_source"]


class GGUFTensor(SourceTensor):
    """One tensor of a GGUF file (lazy)."""

    def __init__(self, reader: GGUFReader, info: TensorInfo):
        self._reader = reader
        self.info = info
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

    def read_rows_into(self, start: int, stop: int, buf: np.ndarray) -> np.ndarray | None:
        """F32 rows [start, stop) read with pread into ``buf`` (a reusable, writeable float32 buffer of at least
        (stop - start) * ne0 values); returns the filled (stop - start, ne0) view, or None when this tensor is not
        F32 or the source has no file to read from (then use read_rows).

        Reading into one reused buffer costs a kernel copy from the page cache; copying from the memory map
        instead would fault every page of the input and of a fresh array in.
        """
        fd = self._fd()
        if self.type != GGMLType.F32 or fd is None:
            return None
        ne0 = self.ne0
        n = (stop - start) * ne0
        out = buf[:n]
        mv = memoryview(out).cast("B")
        pos = self._reader.data_offset + self.info.offset + start * ne0 * 4
        done = 0
        while done < mv.nbytes:
            k = os.preadv(fd, [mv[done:]], pos + done)
            if k <= 0:
                raise FormatError(f"{self._reader.path}: tensor {self.name}: file ended while reading its data "
                                  f"(file truncated while in use?)")
            done += k
        return out.reshape(stop - start, ne0)

    def _fd(self) -> int | None:
        get = getattr(self, "_get_fd", None)
        return get() if get is not None else None

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32, shape (stop - start, ne0). F32 data is a read-only view of the file."""
        ne0 = self.ne0
        t = self.type
        row_bytes = t.row_bytes(ne0)
        raw = self._reader.tensor_bytes(self.info)[start * row_bytes:stop * row_bytes]
        n = stop - start
        if t == GGMLType.F32:
            return raw.view("<f4").reshape(n, ne0)
        if t == GGMLType.F16:
            return raw.view("<f2").astype(np.float32).reshape(n, ne0)
        if t == GGMLType.BF16:
            # bf16 is the top half of a float32: widening is exact
            return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(n, ne0)
        from .quants import dequantize  # numba: only loaded when a quantized tensor is read

        try:
            out = dequantize(raw, t, ne0)
        except (KeyError, NotImplementedError, ValueError) as e:
            raise QuantError(f"tensor {self.name}: cannot dequantize type {t.name}: {e}") from None
        return np.asarray(out, dtype=np.float32).reshape(n, ne0)


class GGUFSource(TensorSource):
    """TensorSource over a GGUFReader; close() (or use as a context manager) to release the map."""

    def __init__(self, reader: GGUFReader):
        super().__init__(kvs=list(reader.kvs), tensors=[GGUFTensor(reader, t) for t in reader.tensors])
        self.reader = reader
        self.path = reader.path
        self._file_fd: int | None = None
        if hasattr(os, "preadv") and os.path.isfile(self.path):
            for t in self.tensors:
                t._get_fd = self._get_fd

    def _get_fd(self) -> int | None:
        if self._file_fd is None:
            try:
                self._file_fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError:
                return None
        return self._file_fd

    def close(self) -> None:
        self.tensors = []
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._file_fd = None
        self.reader.close()

    def __enter__(self) -> "GGUFSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_gguf_source(path: "str | os.PathLike[str]") -> GGUFSource:
    """Open a GGUF file as a source; a non-GGUF or damaged file raises FormatError naming the offset."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file")
    return GGUFSource(GGUFReader(path))

"""What the streaming pipeline consumes: a metadata list and lazily-read tensors.

Both a GGUF file (``gguftool quantize``) and a Hugging Face checkpoint (``gguftool convert``) are presented as a
``TensorSource``; the pipeline (policy -> kernels -> writer) never needs to know which. Tensors are read one at a
time, on demand, so nothing holds the whole model in memory.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import numpy as np

from ..gguf.constants import GGMLType
from ..gguf.values import KV


class SourceTensor(abc.ABC):
    """One tensor of a source, not yet read."""

    name: str                 # GGUF tensor name ("blk.0.attn_q.weight")
    shape: tuple[int, ...]    # ggml order: ne0 (row length, fastest) first
    type: GGMLType            # how it is stored in the source

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @abc.abstractmethod
    def read_f32(self) -> np.ndarray:
        """The tensor as float32, shape (n_elements // ne0, ne0): rows of ne0 values."""

    @abc.abstractmethod
    def read_raw(self) -> np.ndarray:
        """The stored bytes unchanged (uint8), for tensors copied without conversion."""

    # --- what the pipeline's slab reader uses; the defaults suit a source that only has read_f32

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32, shape (stop - start, ne0). Default: a slice of read_f32()."""
        return self.read_f32()[start:stop]

    def read_rows_into(self, start: int, stop: int, buf: np.ndarray, threads: int = 1) -> np.ndarray:
        """The same rows as read_rows, read into ``buf`` (a reusable, writeable float32 buffer of at least
        (stop - start) * ne0 values) where the source can; returns the rows, a view of ``buf`` or a new array.
        ``threads``: how many threads the source may decode with (the pipeline's --threads). Default: read_rows
        (``buf`` and ``threads`` unused)."""
        return self.read_rows(start, stop)

    #: read_rows_into may run in a background thread while the caller reads other tensors of the same source
    #: (the slab reader then reads the next slab while the current one is quantized)
    concurrent_reads: bool = False

    def raw_location(self) -> tuple[str, int] | None:
        """(path, absolute offset) of read_raw()'s bytes, stored as they are in a regular file, so that they can be
        read through a memory map of it; None (the default) when they are not in a file as they are."""
        return None

    def split_position(self) -> tuple[int, int] | None:
        """(split file index, offset in that file's data section) for a tensor of a GGUF file or of the files of a
        split model (--keep-split keeps that layout); None (the default) for other sources."""
        return None


class SourceRecipe(abc.ABC):
    """How to open a source again in another process (a worker of gguftool.distributed, maybe on another machine
    that sees the same files): a small picklable value. The source it opens must list the same tensors."""

    @abc.abstractmethod
    def open(self) -> "TensorSource":
        """The source, opened afresh (the caller closes it)."""


@dataclass
class TensorSource:
    kvs: list[KV]
    tensors: list[SourceTensor] = field(default_factory=list)

    def input_files(self) -> list[str]:
        """Every file this source reads (an output must never be one of them); none for a source in memory."""
        return []

    def recipe(self) -> SourceRecipe | None:
        """How another process opens this same source; None (the default) for a source that only exists here
        (built in memory), which therefore cannot be converted on a cluster."""
        return None

    def close(self) -> None:
        """Release the source's files (the default holds none)."""

    def get(self, key: str, default=None):
        for kv in self.kvs:
            if kv.key == key:
                return kv.value
        return default

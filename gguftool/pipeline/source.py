"""What the streaming pipeline consumes: a metadata list and lazily-read tensors.

Both a GGUF file (``gguftool quantize``) and a Hugging Face checkpoint (``gguftool convert``) are presented as a
``TensorSource``; the pipeline (policy -> kernels -> writer) never needs to know which. Tensors are read one at a
time, on demand, so nothing holds the whole model in memory.
"""
from __future__ import annotations

import abc
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
        n = 1
        for d in self.shape:
            n *= d
        return n

    @abc.abstractmethod
    def read_f32(self) -> np.ndarray:
        """The tensor as float32, shape (n_elements // ne0, ne0): rows of ne0 values."""

    @abc.abstractmethod
    def read_raw(self) -> np.ndarray:
        """The stored bytes unchanged (uint8), for tensors copied without conversion."""


@dataclass
class TensorSource:
    kvs: list[KV]
    tensors: list[SourceTensor] = field(default_factory=list)

    def input_files(self) -> list[str]:
        """Every file this source reads (an output must never be one of them); none for a source in memory."""
        return []

    def get(self, key: str, default=None):
        for kv in self.kvs:
            if kv.key == key:
                return kv.value
        return default

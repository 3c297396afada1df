"""The GGUF file format: constants and type tables, typed KV values, a validating reader and a streaming writer."""
from __future__ import annotations

from .constants import GGMLType, GGUFValueType
from .reader import GGUFReader, TensorInfo
from .values import KV, GGUFArray
from .writer import GGUFWriter

__all__ = ["GGMLType", "GGUFValueType", "GGUFReader", "TensorInfo", "KV", "GGUFArray", "GGUFWriter"]

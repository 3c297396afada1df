"""The in-memory form of GGUF metadata: typed KV pairs that keep their exact on-disk value types.

A value keeps its GGUF type so that a file read and written back is byte-identical (a UINT32 stays UINT32,
an INT32 is never widened). Arrays are ``GGUFArray(element_type, values)``; arrays of arrays nest.
Numeric arrays may hold a numpy array (as the reader returns them) or a list; string arrays hold a list of str.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .constants import GGUFValueType


@dataclass(frozen=True)
class GGUFArray:
    element_type: GGUFValueType
    values: Any  # numpy array (numeric elements), list[str], or list[GGUFArray]

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class KV:
    key: str
    type: GGUFValueType
    value: Any  # int / float / bool / str, or GGUFArray when type is ARRAY


# --- convenience constructors (the converter and the pipeline build metadata with these)
def kv_str(key: str, value: str) -> KV:
    return KV(key, GGUFValueType.STRING, value)


def kv_u32(key: str, value: int) -> KV:
    return KV(key, GGUFValueType.UINT32, int(value))


def kv_f32(key: str, value: float) -> KV:
    return KV(key, GGUFValueType.FLOAT32, float(value))


def kv_bool(key: str, value: bool) -> KV:
    return KV(key, GGUFValueType.BOOL, bool(value))


def kv_array(key: str, element_type: GGUFValueType, values: Sequence | Any) -> KV:
    return KV(key, GGUFValueType.ARRAY, GGUFArray(element_type, values))

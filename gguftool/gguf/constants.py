"""GGUF and ggml constants: tensor types with their block geometry, KV value types, well-known keys.

Values mirror ggml/include/ggml.h (enum ggml_type), ggml/src/ggml.c (type_traits: block size and bytes per
block) and docs/gguf.md (value types). The type table covers every id in today's ggml.h so that any file
llama.cpp writes can be read and inspected, even where gguftool cannot quantize that type.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
GGUF_SUPPORTED_VERSIONS = (2, 3)
QK_K = 256


class GGMLType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41
    Q2_0 = 42

    @classmethod
    def parse(cls, name_or_id: "str | int | GGMLType") -> "GGMLType":
        """Accept a GGMLType, its integer id or its name in any case ("q4_k", "Q4_K")."""
        if isinstance(name_or_id, GGMLType):
            return name_or_id
        if isinstance(name_or_id, int):
            return cls(name_or_id)
        try:
            return cls[str(name_or_id).upper()]
        except KeyError:
            raise ValueError(f"unknown ggml type {name_or_id!r}") from None

    @property
    def block_size(self) -> int:
        return TYPE_TRAITS[self].block_size

    @property
    def type_size(self) -> int:
        return TYPE_TRAITS[self].type_size

    def row_bytes(self, n_per_row: int) -> int:
        """Bytes of one row of n_per_row elements (n_per_row must be a multiple of the block size)."""
        t = TYPE_TRAITS[self]
        return n_per_row // t.block_size * t.type_size

    def nbytes(self, n_elements: int) -> int:
        t = TYPE_TRAITS[self]
        return n_elements // t.block_size * t.type_size


@dataclass(frozen=True)
class TypeTraits:
    block_size: int  # elements per block
    type_size: int   # bytes per block


# ggml.c type_traits; sizes written as the block structs of ggml-common.h add up.
TYPE_TRAITS: dict[GGMLType, TypeTraits] = {
    GGMLType.F32: TypeTraits(1, 4),
    GGMLType.F16: TypeTraits(1, 2),
    GGMLType.Q4_0: TypeTraits(32, 2 + 16),
    GGMLType.Q4_1: TypeTraits(32, 2 + 2 + 16),
    GGMLType.Q5_0: TypeTraits(32, 2 + 4 + 16),
    GGMLType.Q5_1: TypeTraits(32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: TypeTraits(32, 2 + 32),
    GGMLType.Q8_1: TypeTraits(32, 2 + 2 + 32),
    GGMLType.Q2_K: TypeTraits(QK_K, 2 + 2 + QK_K // 16 + QK_K // 4),
    GGMLType.Q3_K: TypeTraits(QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),
    GGMLType.Q4_K: TypeTraits(QK_K, 2 + 2 + QK_K // 2 + 12),
    GGMLType.Q5_K: TypeTraits(QK_K, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    GGMLType.Q6_K: TypeTraits(QK_K, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    GGMLType.Q8_K: TypeTraits(QK_K, 4 + QK_K + QK_K // 8),
    GGMLType.IQ2_XXS: TypeTraits(QK_K, 2 + QK_K // 4),
    GGMLType.IQ2_XS: TypeTraits(QK_K, 2 + QK_K // 4 + QK_K // 32),
    GGMLType.IQ3_XXS: TypeTraits(QK_K, 2 + QK_K // 4 + QK_K // 8),
    GGMLType.IQ1_S: TypeTraits(QK_K, 2 + QK_K // 8 + QK_K // 16),
    GGMLType.IQ4_NL: TypeTraits(32, 2 + 16),
    GGMLType.IQ3_S: TypeTraits(QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    GGMLType.IQ2_S: TypeTraits(QK_K, 2 + QK_K // 4 + QK_K // 16),
    GGMLType.IQ4_XS: TypeTraits(QK_K, 2 + 2 + QK_K // 2 + QK_K // 64),
    GGMLType.I8: TypeTraits(1, 1),
    GGMLType.I16: TypeTraits(1, 2),
    GGMLType.I32: TypeTraits(1, 4),
    GGMLType.I64: TypeTraits(1, 8),
    GGMLType.F64: TypeTraits(1, 8),
    GGMLType.IQ1_M: TypeTraits(QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
    GGMLType.BF16: TypeTraits(1, 2),
    GGMLType.TQ1_0: TypeTraits(QK_K, 2 + 4 * 13),
    GGMLType.TQ2_0: TypeTraits(QK_K, 2 + 64),
    GGMLType.MXFP4: TypeTraits(32, 1 + 16),
    GGMLType.NVFP4: TypeTraits(64, 4 + 32),
    GGMLType.Q1_0: TypeTraits(128, 2 + 16),
    GGMLType.Q2_0: TypeTraits(64, 2 + 16),
}


class GGUFValueType(enum.IntEnum):
    """KV value types of docs/gguf.md (gguf_type)."""
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# numpy dtype (little-endian) of each fixed-size value type; STRING and ARRAY have none.
VALUE_DTYPES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}

# --- well-known keys
KEY_ARCHITECTURE = "general.architecture"
KEY_ALIGNMENT = "general.alignment"
KEY_FILE_TYPE = "general.file_type"
KEY_QUANTIZATION_VERSION = "general.quantization_version"
GGML_QUANTIZATION_VERSION = 2

"""Which module implements which ggml type, imported lazily (compiling one type must not compile the rest).

Every entry resolves to an object with the type-module interface:
    GGML_TYPE       the GGMLType it implements
    USES_IMATRIX    False when llama.cpp ignores the importance matrix for the type (F16, BF16, Q8_0)
    quantize_rows(x: float32[:, ::1], imatrix: float32[::1], out: uint8[:, ::1]) -> None
    dequantize_rows(data: uint8[:, ::1], out: float32[:, ::1]) -> None
"""
from __future__ import annotations

import importlib

from ..gguf.constants import GGMLType

# type -> "module" or "module:attribute" (float_types holds two types as namespaces)
_ENTRIES: dict[GGMLType, str] = {
    GGMLType.F16: "gguftool.quants.float_types:F16",
    GGMLType.BF16: "gguftool.quants.float_types:BF16",
    GGMLType.Q8_0: "gguftool.quants.q8_0",
    GGMLType.Q4_0: "gguftool.quants.q4_0",
    GGMLType.Q4_1: "gguftool.quants.q4_1",
    GGMLType.Q5_0: "gguftool.quants.q5_0",
    GGMLType.Q5_1: "gguftool.quants.q5_1",
    GGMLType.Q2_K: "gguftool.quants.q2_k",
    GGMLType.Q3_K: "gguftool.quants.q3_k",
    GGMLType.Q4_K: "gguftool.quants.q4_k",
    GGMLType.Q5_K: "gguftool.quants.q5_k",
    GGMLType.Q6_K: "gguftool.quants.q6_k",
}

# the types with a kernel, in the order llama.cpp's enum lists them
KERNEL_TYPES: tuple[GGMLType, ...] = tuple(sorted(_ENTRIES))

_cache: dict[GGMLType, object] = {}


def has_kernel(qtype: GGMLType) -> bool:
    return qtype in _ENTRIES


def kernels(qtype: GGMLType):
    """The type module of qtype (imported on first use). KeyError if gguftool has no kernel for it."""
    mod = _cache.get(qtype)
    if mod is None:
        target = _ENTRIES[qtype]
        name, _, attr = target.partition(":")
        mod = importlib.import_module(name)
        if attr:
            mod = getattr(mod, attr)
        if mod.GGML_TYPE != qtype:  # a wiring mistake, not bad input
            raise RuntimeError(f"{target} implements {mod.GGML_TYPE.name}, registered for {qtype.name}")
        _cache[qtype] = mod
    return mod

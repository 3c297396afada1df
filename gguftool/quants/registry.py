"""Which module implements which ggml type, imported lazily (compiling one type must not compile the rest).

Every type has a module of its own (f16, bf16, q8_0, q4_0 ... q6_k) with one interface, so the API treats
all types alike:

    GGML_TYPE       the GGMLType it implements
    USES_IMATRIX    False when llama.cpp ignores the importance matrix for the type (F16, BF16, Q8_0)
    BLOCK_BYTES     bytes per block (GGML_TYPE.type_size)

  block functions (numba; the row drivers run the same block code, tests call them on single blocks):
    make_scratch() -> s
        one thread's scratch arrays (a tuple, possibly empty), made once per parallel task, reused per block
    prepare_row(x, qw, s) -> None
        what the reference computes once per row before its blocks, kept in s: the legacy types' importance
        path weights every element with the row's mean square (quantize_row_q4_0_impl's sigma2). A no-op for
        the other types. Call it for each row before that row's quantize_block calls.
    quantize_block(x, qw, y, s) -> None
        one block: x float32[block_size] (a view into the row), qw float32[block_size] the block's importance
        weights or an empty array (the reference path, as llama.cpp's imatrix == NULL), y uint8[BLOCK_BYTES]
    dequantize_block(y, out) -> None
        y uint8[BLOCK_BYTES] -> out float32[block_size]

  row drivers (numba, parallel over rows; what the API calls):
    quantize_rows(x: float32[:, ::1], imatrix: float32[::1], out: uint8[:, ::1]) -> None
        imatrix.size == 0 selects the reference path; x must be finite (the API screens it)
    quantize_rows_screened(x, out, bad: bool[::1]) -> None, or None when the type has no such variant
        the reference path fused with the NaN/Inf screen (bad[r] = True for a row holding one; its bytes are
        then meaningless). The memory-bound types have it: for them a separate screening pass costs as much
        as the conversion itself.
    dequantize_rows(data: uint8[:, ::1], out: float32[:, ::1]) -> None

Why every module has its own row drivers instead of one generic driver taking the block function: numba's
on-disk cache (cache=True) cannot store a function that receives another jitted function as an argument
(a dispatcher type) or closes over one, so a generic driver would be compiled again in every process
(seconds per type). A driver per module, calling its module's block functions directly, caches. The drivers
also keep the types' vectorised whole-row fast paths (legacy reference paths, F16/BF16), which run
before falling back to quantize_block on rows they cannot take.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ..gguf.constants import GGMLType

# type -> module implementing it
_ENTRIES: dict[GGMLType, str] = {
    GGMLType.F16: "gguftool.quants.f16",
    GGMLType.BF16: "gguftool.quants.bf16",
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
    GGMLType.IQ3_XXS: "gguftool.quants.iq3_xxs",
    GGMLType.IQ3_S: "gguftool.quants.iq3_s",
    GGMLType.IQ2_XXS: "gguftool.quants.iq2_xxs",
    GGMLType.IQ2_XS: "gguftool.quants.iq2_xs",
    GGMLType.IQ1_S: "gguftool.quants.iq1_s",
    GGMLType.IQ2_S: "gguftool.quants.iq2_s",
    GGMLType.IQ1_M: "gguftool.quants.iq1_m",
    GGMLType.IQ4_NL: "gguftool.quants.iq4_nl",
    GGMLType.IQ4_XS: "gguftool.quants.iq4_xs",
    GGMLType.TQ1_0: "gguftool.quants.tq1_0",
    GGMLType.TQ2_0: "gguftool.quants.tq2_0",
    GGMLType.MXFP4: "gguftool.quants.mxfp4",
}

# ggml_quantize_requires_imatrix: ggml_quantize_chunk asserts an importance matrix for these (their modules'
# quantize_rows raise QuantError without one)
REQUIRES_IMATRIX: frozenset[GGMLType] = frozenset({GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ1_S})

# the types with a kernel, in the order llama.cpp's enum lists them
KERNEL_TYPES: tuple[GGMLType, ...] = tuple(sorted(_ENTRIES))

_loaded: dict[GGMLType, ModuleType] = {}


def has_kernel(qtype: GGMLType) -> bool:
    return qtype in _ENTRIES


def kernels(qtype: GGMLType) -> ModuleType:
    """The type module of qtype (imported on first use). KeyError if gguftool has no kernel for it."""
    mod = _loaded.get(qtype)
    if mod is None:
        mod = importlib.import_module(_ENTRIES[qtype])
        if mod.GGML_TYPE != qtype:  # a wiring mistake, not bad input
            raise RuntimeError(f"{mod.__name__} implements {mod.GGML_TYPE.name}, registered for {qtype.name}")
        _loaded[qtype] = mod
    return mod

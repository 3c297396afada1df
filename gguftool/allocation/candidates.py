"""The types a tensor may be given by the allocation, derived from what gguftool can write.

Every quantized type with a kernel (``gguftool.quants.SUPPORTED_TYPES``) that the policy accepts as a target
(``policy.WRITABLE_TYPES``) is a candidate, so a type joins automatically once its kernel is registered. llama.cpp's
constraints are kept:

- the row length must be a whole number of the type's blocks (no fallback is needed then);
- a type llama.cpp only quantizes with an importance matrix (``policy.requires_imatrix``: IQ1/IQ2/IQ3_XXS) is a
  candidate only for a tensor that has imatrix weights (never token_embd / output, which have none);
- F16 is the widest candidate (F32 and BF16 are never better for their size);
- the type the stock mix gives the tensor is always a candidate, so the stock mix is a solution.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..gguf.constants import GGMLType
from ..pipeline import policy as P

__all__ = ["TensorSlot", "candidate_types", "bpw"]

_EXCLUDED = frozenset({GGMLType.F32, GGMLType.BF16})


@dataclass(frozen=True)
class TensorSlot:
    """One tensor the allocation decides: its shape (ggml order), the stock mix's type and the candidates (sorted
    by size, smallest first)."""
    name: str
    shape: tuple[int, ...]
    stock: GGMLType
    candidates: tuple[GGMLType, ...]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def nbytes(self, t: GGMLType) -> int:
        return t.nbytes(self.n_elements)


def bpw(t: GGMLType) -> float:
    """Bits per weight of type t."""
    return t.type_size * 8.0 / t.block_size


def writable_types() -> list[GGMLType]:
    from ..quants import SUPPORTED_TYPES

    return sorted((t for t in SUPPORTED_TYPES if t in P.WRITABLE_TYPES and t not in _EXCLUDED),
                  key=lambda t: (bpw(t), int(t)))


def candidate_types(name: str, shape: tuple[int, ...], stock: GGMLType, ftype: P.FileType,
                    has_imatrix: bool) -> tuple[GGMLType, ...]:
    """The candidate types of one quantizable tensor (see the module docstring), smallest first."""
    ne0 = shape[0]
    out = []
    for t in writable_types():
        if ne0 % t.block_size:
            continue
        if P.requires_imatrix(name, t, ftype) and not has_imatrix:
            continue
        if P.tensor_category(name) in (P.OUTPUT, P.TOKEN_EMBD) and t != stock and \
                P.requires_imatrix("blk.0.x", t, ftype):
            continue   # quantized without an imatrix in llama.cpp: these types would be wrecked
        out.append(t)
    if stock not in out:
        out.append(stock)
    return tuple(sorted(out, key=lambda t: (bpw(t), int(t))))

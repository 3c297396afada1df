"""The Python side the IQ lattice types share: imatrix check, tables + scratch, kernel status -> QuantError.

The IQ2_XXS/XS/S and IQ1_S/M kernels (numba) return a status code per block (0: fine, else an index into the
type's ``ERRORS``) and get their lattice tables (``iq_grids_2.tables``) as arguments; IQ3_XXS/S's row drivers
flag the rows on which llama.cpp's search aborts. What each type module then needs around its kernels is the
same few lines: this module holds them once. No numerics here.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from gguftool.errors import QuantError
from gguftool.gguf.constants import GGMLType
from gguftool.quants import iq_grids_2 as grids


def require_imatrix(qtype: GGMLType, qw: np.ndarray) -> None:
    """llama.cpp's ggml_quantize_requires_imatrix: an empty importance matrix is refused for these types."""
    if qw.size == 0:
        raise QuantError(f"{qtype.name} needs an importance matrix (llama.cpp requires one for this type)")


def raise_first_flagged(flags: np.ndarray, describe: Callable[[int, int], str]) -> None:
    """QuantError for the first row whose flag (status code or bool) is set: describe(row, code) says what."""
    bad = np.flatnonzero(flags)
    if bad.size:
        r = int(bad[0])
        raise QuantError(describe(r, int(flags[r])))


@dataclass(frozen=True)
class LatticeKernels:
    """The registry interface (make_scratch, quantize_block, quantize_rows) of an IQ2/IQ1 type around its kernels.

    superblock(x, qw, y, grid, kmap, neighbours, work) -> status: one 256-block;
    rows(x, imatrix, out, grid, kmap, neighbours, status): every row, status[r] the row's first failure.
    """

    qtype: GGMLType
    kind: int                      # iq_grids_2's table kind
    errors: Mapping[int, str]      # status code -> what llama.cpp does there
    requires_imatrix: bool
    work: Callable[[], tuple]      # one block's work arrays (a numba function)
    superblock: Callable[..., int]
    rows: Callable[..., None]

    def _fail(self, code: int, where: str) -> QuantError:
        return QuantError(f"{self.qtype.name}: {where}: {self.errors[code]}")

    def make_scratch(self) -> tuple:
        """The lattice tables and one block's work arrays."""
        t = grids.tables(self.kind)
        return (t.grid, t.skmap, t.slists, self.work())

    def quantize_block(self, x: np.ndarray, qw: np.ndarray, y: np.ndarray, s: tuple) -> None:
        if self.requires_imatrix:
            require_imatrix(self.qtype, qw)
        grid, kmap, neigh, work = s
        st = self.superblock(x, qw, y, grid, kmap, neigh, work)
        if st:
            raise self._fail(st, "this block")

    def quantize_rows(self, x: np.ndarray, imatrix: np.ndarray, out: np.ndarray) -> None:
        if self.requires_imatrix:
            require_imatrix(self.qtype, imatrix)
        t = grids.tables(self.kind)
        status = np.zeros(x.shape[0], np.int32)
        self.rows(x, imatrix, out, t.grid, t.skmap, t.slists, status)
        raise_first_flagged(status, lambda r, code: str(self._fail(code, f"row {r}")))

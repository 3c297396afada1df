"""Typed, range-checked reads of GGUF metadata values for the model and its tokenizer.

A GGUF file's metadata is untrusted input: a value may have the wrong type (a string where a count belongs), be
out of range (``head_count = 0``, ``rope.freq_base = 0``), or be absurd (a billion layers). Every value the forward
pass or the tokenizer uses is read through a :class:`MetadataReader`, which checks it before it is used and
raises :class:`~gguftool.errors.ImatrixError` naming the file, the key and the value.

Values come as the GGUF reader gives them (int / float / bool / str, ``GGUFArray`` for arrays) or as plain Python
values and lists (metadata built in memory).
"""
from __future__ import annotations

import math
from typing import Any, Literal, NoReturn, Protocol, overload

import numpy as np

from ..errors import ImatrixError
from ..gguf.values import GGUFArray

# sizes far beyond any real model, but small enough that a list or loop of this length is harmless: the real
# check of sizes is against the tensors present (model.forward.Model)
MAX_COUNT = 1 << 20


class Metadata(Protocol):
    def get(self, key: str, default: Any = None) -> Any: ...


def _show(value: Any) -> str:
    """The value as the error message shows it (strings quoted, long arrays cut)."""
    if isinstance(value, GGUFArray):
        value = value.values
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        shown = ", ".join(_show(v) for v in value[:4])
        return f"[{shown}{', ...' if len(value) > 4 else ''}] ({len(value)} values)"
    return repr(value) if isinstance(value, str) else str(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return _is_int(v) or isinstance(v, (float, np.floating))


class MetadataReader:
    """Reads keys of ``meta`` (anything with ``.get(key, default)``: a TensorSource, a dict). ``origin`` (the
    file) starts every error message."""

    def __init__(self, meta: Metadata, origin: str = ""):
        self.meta = meta
        self.origin = origin

    def fail(self, message: str) -> NoReturn:
        """Something missing or unsupported ("the model has no ...", "unsupported architecture ...")."""
        raise ImatrixError(message)

    def invalid(self, message: str) -> NoReturn:
        """A value found in the file is wrong: the message starts with the file."""
        prefix = f"{self.origin}: " if self.origin else ""
        raise ImatrixError(f"{prefix}bad metadata: {message}")

    def bad(self, key: str, value: Any, why: str) -> NoReturn:
        self.invalid(f"{key} = {_show(value)} ({why})")

    def has(self, key: str) -> bool:
        return self.meta.get(key) is not None

    # --- scalars
    def _scalar(self, key: str, default: Any, required: bool) -> Any:
        v = self.meta.get(key)
        if v is None:
            if required:
                self.fail(f"the model is missing the metadata key {key}")
            return default
        if isinstance(v, (GGUFArray, list, tuple, np.ndarray)):
            # per-layer values: accepted when every layer has the same one
            values = v.values if isinstance(v, GGUFArray) else v
            if len(values) == 0 or not all(_is_number(x) for x in values):
                self.bad(key, v, "expected a number or an array of numbers")
            if any(x != values[0] for x in values):
                self.fail(f"per-layer values of {key} are not supported")
            v = values[0]
        return v

    @overload
    def get_int(self, key: str, default: int, *, lo: int = ..., hi: int = ..., required: bool = ...) -> int: ...
    @overload
    def get_int(self, key: str, default: None = ..., *, lo: int = ..., hi: int = ...,
                required: Literal[True]) -> int: ...
    @overload
    def get_int(self, key: str, default: None = ..., *, lo: int = ..., hi: int = ...,
                required: bool = ...) -> int | None: ...

    def get_int(self, key: str, default: int | None = None, *, lo: int = 0, hi: int = MAX_COUNT,
                required: bool = False) -> int | None:
        """An integer lo <= v <= hi (default when absent; None stays None)."""
        v = self._scalar(key, default, required)
        if v is None:
            return None
        if not _is_int(v):
            self.bad(key, v, "expected an integer")
        v = int(v)
        if not lo <= v <= hi:
            self.bad(key, v, f"expected {lo} .. {hi}")
        return v

    @overload
    def get_float(self, key: str, default: float, *, lo: float = ..., lo_open: bool = ..., hi: float = ...,
                  required: bool = ...) -> float: ...
    @overload
    def get_float(self, key: str, default: None = ..., *, lo: float = ..., lo_open: bool = ..., hi: float = ...,
                  required: Literal[True]) -> float: ...
    @overload
    def get_float(self, key: str, default: None = ..., *, lo: float = ..., lo_open: bool = ..., hi: float = ...,
                  required: bool = ...) -> float | None: ...

    def get_float(self, key: str, default: float | None = None, *, lo: float = 0.0, lo_open: bool = False,
                  hi: float = math.inf, required: bool = False) -> float | None:
        """A finite number v >= lo (> lo with ``lo_open``) and <= hi (default when absent; None stays None)."""
        v = self._scalar(key, default, required)
        if v is None:
            return None
        if not _is_number(v):
            self.bad(key, v, "expected a number")
        v = float(v)
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
            bound = f"> {lo}" if lo_open else f">= {lo}"
            self.bad(key, v, f"expected a finite number {bound}" + (f" and <= {hi}" if hi != math.inf else ""))
        return v

    @overload
    def get_str(self, key: str, default: str) -> str: ...
    @overload
    def get_str(self, key: str, default: None = ..., *, required: bool = ...) -> str | None: ...

    def get_str(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        v = self.meta.get(key)
        if v is None:
            if required:
                self.fail(f"the model is missing the metadata key {key}")
            return default
        if not isinstance(v, str):
            self.bad(key, v, "expected a string")
        return v

    @overload
    def get_bool(self, key: str, default: bool) -> bool: ...
    @overload
    def get_bool(self, key: str, default: None = ...) -> bool | None: ...

    def get_bool(self, key: str, default: bool | None = None) -> bool | None:
        v = self.meta.get(key)
        if v is None:
            return default
        if not isinstance(v, (bool, np.bool_)):
            self.bad(key, v, "expected a boolean")
        return bool(v)

    # --- arrays
    def _array(self, key: str) -> list | tuple | np.ndarray | None:
        v = self.meta.get(key)
        if v is None:
            return None
        values = v.values if isinstance(v, GGUFArray) else v
        if not isinstance(values, (list, tuple, np.ndarray)):
            self.bad(key, v, "expected an array")
        return values

    def str_array(self, key: str) -> list[str] | None:
        values = self._array(key)
        if values is None:
            return None
        if isinstance(values, np.ndarray) or not all(isinstance(x, str) for x in values):
            self.bad(key, values, "expected an array of strings")
        return list(values)

    def number_array(self, key: str, length: int, *, integer: bool = False) -> np.ndarray | None:
        """An array of ``length`` finite numbers (integers with ``integer``), as float64 or int64."""
        values = self._array(key)
        if values is None:
            return None
        if len(values) != length:
            self.invalid(f"{key} has {len(values)} values, expected {length} (one per token)")
        arr = np.asarray(values) if len(values) else np.zeros(0, dtype=np.int64 if integer else np.float64)
        ok = arr.ndim == 1 and arr.dtype.kind in ("i", "u") if integer else arr.dtype.kind in ("i", "u", "f")
        if not ok or (arr.dtype.kind == "f" and not np.all(np.isfinite(arr))):
            self.bad(key, values, "expected an array of integers" if integer else "expected an array of finite numbers")
        return arr.astype(np.int64 if integer else np.float64)

"""Typed checks on the JSON values of a checkpoint's files (config.json, tokenizer files).

A spec checks one value's type and range and returns it unchanged; a wrong value raises ``ConvertError`` naming
the file, the key path and the value::

    config.json: "max_position_embeddings" must be a positive integer, got "abc"

Schemas are data (``Obj({"key": Int(min=1), ...})``), checked once when a file is read, so the code that uses the
values can rely on their types instead of guarding every access. Keys a schema does not name are left alone
(checkpoints carry many keys gguftool never reads). ``Obj`` treats a JSON null like an absent key unless the key
is required: config.json files write ``null`` for "use the default".
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConvertError

U32_MAX = 2**32 - 1
F32_MAX = 3.4028234663852886e38   # the largest finite float32


def show(value: Any) -> str:
    """A JSON rendering of a bad value for an error message, cut to a readable length."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # pragma: no cover - values come from json.load
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def bad(file: str, where: str, what: str, value: Any) -> ConvertError:
    return ConvertError(f'{file}: "{where}" must be {what}, got {show(value)}')


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


# --- scalar specs
@dataclass(frozen=True)
class Int:
    """An integer (not a bool) in [min, max]."""
    min: int | None = None
    max: int | None = None

    @property
    def what(self) -> str:
        lo = {1: "a positive integer", 0: "a non-negative integer"}.get(self.min)
        return lo or (f"an integer >= {self.min}" if self.min is not None else "an integer")

    def check(self, file: str, where: str, v: Any) -> Any:
        if not isinstance(v, int) or isinstance(v, bool) or (self.min is not None and v < self.min):
            raise bad(file, where, self.what, v)
        if self.max is not None and v > self.max:
            raise bad(file, where, f"at most {self.max}", v)
        return v


@dataclass(frozen=True)
class Num:
    """A finite number (int or float, not a bool) with optional bounds: > gt, >= ge, <= le. Values are
    written as float32 metadata, so by default they must fit float32 (beyond it they would become inf)."""
    gt: float | None = None
    ge: float | None = None
    le: float = F32_MAX

    @property
    def what(self) -> str:
        if self.gt == 0 and self.le == F32_MAX:
            return "a positive number"
        parts = [f"> {self.gt:g}" if self.gt is not None else "", f">= {self.ge:g}" if self.ge is not None else "",
                 f"<= {self.le:g}" if self.le != F32_MAX else ""]
        bounds = " and ".join(p for p in parts if p)
        return "a number" + (f" {bounds}" if bounds else "")

    def check(self, file: str, where: str, v: Any) -> Any:
        if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                or (self.gt is not None and not v > self.gt) or (self.ge is not None and not v >= self.ge)):
            raise bad(file, where, self.what, v)
        if not -F32_MAX <= v <= self.le:
            raise bad(file, where, f"at most {self.le:g}" if v > 0 else f"at least {-F32_MAX:g}", v)
        return v


@dataclass(frozen=True)
class Bool:
    what: str = "true or false"

    def check(self, file: str, where: str, v: Any) -> Any:
        if not isinstance(v, bool):
            raise bad(file, where, self.what, v)
        return v


@dataclass(frozen=True)
class Str:
    """A string, optionally one of ``choices``."""
    choices: tuple[str, ...] = ()

    @property
    def what(self) -> str:
        return f"one of {', '.join(map(repr, self.choices))}" if self.choices else "a string"

    def check(self, file: str, where: str, v: Any) -> Any:
        if not isinstance(v, str) or (self.choices and v not in self.choices):
            raise bad(file, where, self.what, v)
        return v


# --- containers
@dataclass(frozen=True)
class ListOf:
    """A list whose items all satisfy ``item``."""
    item: Any
    min_len: int = 0

    @property
    def what(self) -> str:
        return "a non-empty list" if self.min_len else "a list"

    def check(self, file: str, where: str, v: Any) -> Any:
        if not isinstance(v, list) or len(v) < self.min_len:
            raise bad(file, where, self.what, v)
        for i, x in enumerate(v):
            self.item.check(file, f"{where}[{i}]", x)
        return v


@dataclass(frozen=True)
class Obj:
    """A JSON object. ``fields``: key -> spec for the keys gguftool reads (null = absent unless ``required``);
    ``values``: spec every value must satisfy; ``int_keys``: keys must be decimal integers (JSON object keys are
    strings; tokenizer_config.json's added_tokens_decoder uses them for token ids)."""
    fields: dict = field(default_factory=dict)
    required: tuple[str, ...] = ()
    values: Any = None
    int_keys: bool = False
    what: str = "an object"

    def check(self, file: str, where: str, v: Any) -> Any:
        if not isinstance(v, dict):
            raise bad(file, where, self.what, v)
        for key in self.required:
            if v.get(key) is None:
                raise ConvertError(f'{file}: "{_join(where, key)}" is missing')
        for key, spec in self.fields.items():
            if v.get(key) is not None:
                spec.check(file, _join(where, key), v[key])
        for key, x in v.items():
            if self.int_keys and not (key.isascii() and key.isdecimal()):
                raise ConvertError(f'{file}: "{where}" keys must be token ids (decimal integers), got {show(key)}')
            if self.values is not None:
                self.values.check(file, _join(where, key), x)
        return v


@dataclass(frozen=True)
class AnyOf:
    """The first spec the value satisfies; the error names ``what`` (the alternatives together)."""
    specs: tuple
    what: str

    def check(self, file: str, where: str, v: Any) -> Any:
        errors = []
        for spec in self.specs:
            try:
                return spec.check(file, where, v)
            except ConvertError as e:
                errors.append(e)
        # a value of the right outer shape with a bad part: report the part (the more precise message)
        inner = [e for e in errors if f'"{where}" must' not in str(e)]
        raise inner[0] if inner else bad(file, where, self.what, v)


_JSON_KIND = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}


def checked(file: str, value: Any, spec) -> Any:
    """``value`` (a whole file's JSON) checked against ``spec``; the error names ``file``."""
    if isinstance(spec, Obj) and not isinstance(value, dict):
        raise ConvertError(f"{file}: expected a JSON object, got {_JSON_KIND.get(type(value), 'something else')}")
    return spec.check(file, "", value)

"""Change a GGUF file's metadata without touching its tensors (``gguftool edit``).

The new file gets the edited KV list and the same tensor infos; the data section is copied verbatim (tensor
bytes, padding, anything after the last tensor), never decoded. With no changes the output is byte-identical to
the input. Only when ``general.alignment`` changes are the tensors laid out afresh at the new alignment.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import GGUFError
from ..gguf.constants import GGUF_DEFAULT_ALIGNMENT, KEY_ALIGNMENT, GGUFValueType
from ..gguf.reader import GGUFReader
from ..gguf.values import KV
from ..gguf.writer import GGUFWriter, encode_value

__all__ = ["EditResult", "NEW_KEY_TYPES", "parse_set", "value_from_text", "apply_edits", "edit_file",
           "KEY_CHAT_TEMPLATE"]

KEY_CHAT_TEMPLATE = "tokenizer.chat_template"

# TYPE names accepted in --set KEY=TYPE:VALUE for a new key. "int" is a 64-bit signed integer (as in llama.cpp's
# --override-kv); "float" is FLOAT32, the type llama.cpp's loader expects for every float key.
NEW_KEY_TYPES: dict[str, GGUFValueType] = {
    "int": GGUFValueType.INT64,
    "uint32": GGUFValueType.UINT32,
    "int32": GGUFValueType.INT32,
    "float": GGUFValueType.FLOAT32,
    "bool": GGUFValueType.BOOL,
    "str": GGUFValueType.STRING,
    # the full value-type names too
    "uint8": GGUFValueType.UINT8, "int8": GGUFValueType.INT8, "uint16": GGUFValueType.UINT16,
    "int16": GGUFValueType.INT16, "uint64": GGUFValueType.UINT64, "int64": GGUFValueType.INT64,
    "float32": GGUFValueType.FLOAT32, "float64": GGUFValueType.FLOAT64, "string": GGUFValueType.STRING,
}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_INT_RANGES = {
    GGUFValueType.UINT8: (0, 2**8 - 1), GGUFValueType.INT8: (-2**7, 2**7 - 1),
    GGUFValueType.UINT16: (0, 2**16 - 1), GGUFValueType.INT16: (-2**15, 2**15 - 1),
    GGUFValueType.UINT32: (0, 2**32 - 1), GGUFValueType.INT32: (-2**31, 2**31 - 1),
    GGUFValueType.UINT64: (0, 2**64 - 1), GGUFValueType.INT64: (-2**63, 2**63 - 1),
}


@dataclass
class EditResult:
    set: list[str] = field(default_factory=list)      # keys whose value changed or were added
    added: list[str] = field(default_factory=list)    # subset of set: keys that are new
    removed: list[str] = field(default_factory=list)
    relaid: bool = False                              # tensors re-laid out for a new alignment

    @property
    def changed(self) -> bool:
        return bool(self.set or self.removed)


# --- parsing --set
def parse_set(spec: str) -> tuple[str, str]:
    """'KEY=VALUE' -> (KEY, VALUE); the value may itself contain '='."""
    key, sep, value = spec.partition("=")
    key = key.strip()
    if not sep or not key:
        raise GGUFError(f"--set {spec!r}: expected KEY=VALUE (or KEY=TYPE:VALUE for a new key)")
    return key, value


def _parse_scalar(key: str, vtype: GGUFValueType, text: str):
    if vtype in _INT_RANGES:
        t = text.strip().replace("_", "")
        try:
            v = int(t, 0) if t.lower().startswith(("0x", "-0x", "0o", "0b")) else int(t)
        except ValueError:
            raise GGUFError(f"key {key!r}: {text!r} is not an integer ({vtype.name})") from None
        lo, hi = _INT_RANGES[vtype]
        if not lo <= v <= hi:
            raise GGUFError(f"key {key!r}: {v} is out of range for {vtype.name} ({lo}..{hi})")
        return v
    if vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        try:
            v = float(text)
        except ValueError:
            raise GGUFError(f"key {key!r}: {text!r} is not a number ({vtype.name})") from None
        if vtype == GGUFValueType.FLOAT32 and math.isfinite(v) and abs(v) > 3.4028234663852886e38:
            raise GGUFError(f"key {key!r}: {text} is out of range for FLOAT32")
        return v
    if vtype == GGUFValueType.BOOL:
        t = text.strip().lower()
        if t in _TRUE:
            return True
        if t in _FALSE:
            return False
        raise GGUFError(f"key {key!r}: {text!r} is not a boolean (true/false)")
    if vtype == GGUFValueType.STRING:
        return text
    raise GGUFError(f"key {key!r} is an {vtype.name}; edit can only set scalar and string keys")


def value_from_text(key: str, text: str, existing: "KV | None") -> KV:
    """The KV that ``--set key=text`` asks for: typed like the existing key, or TYPE:VALUE for a new key."""
    if existing is not None:
        if existing.type == GGUFValueType.ARRAY:
            raise GGUFError(f"key {key!r} is an array; edit can only set scalar and string keys")
        vtype = GGUFValueType(existing.type)
        return KV(key, vtype, _parse_scalar(key, vtype, text))
    tname, sep, value = text.partition(":")
    vtype = NEW_KEY_TYPES.get(tname.strip().lower()) if sep else None
    if vtype is None:
        raise GGUFError(f"key {key!r} is not in the file: give its type as --set {key}=TYPE:VALUE with TYPE one "
                        f"of int, uint32, int32, float, bool, str")
    return KV(key, vtype, _parse_scalar(key, vtype, value))


def apply_edits(kvs: Sequence[KV], set_kvs: Sequence[KV] = (), remove: Sequence[str] = ()) -> tuple[list[KV],
                                                                                                    EditResult]:
    """The edited KV list: existing keys keep their place, new keys go at the end, removed keys go."""
    result = EditResult()
    present = {kv.key for kv in kvs}
    set_map: dict[str, KV] = {}
    for kv in set_kvs:
        if kv.key in set_map:
            raise GGUFError(f"key {kv.key!r} is set more than once")
        set_map[kv.key] = kv
    removing = []
    for key in remove:
        if key in set_map:
            raise GGUFError(f"key {key!r} is both set and removed")
        if key not in present:
            raise GGUFError(f"cannot remove key {key!r}: it is not in the file")
        if key not in removing:
            removing.append(key)
    out: list[KV] = []
    for kv in kvs:
        if kv.key in removing:
            result.removed.append(kv.key)
            continue
        new = set_map.get(kv.key)
        if new is not None:
            if new.type != kv.type or _encoded(new) != _encoded(kv):
                result.set.append(kv.key)
            out.append(new)
        else:
            out.append(kv)
    for key, kv in set_map.items():
        if key not in present:
            out.append(kv)
            result.set.append(key)
            result.added.append(key)
    return out, result


def _encoded(kv: KV) -> bytes:
    return encode_value(kv.type, kv.value, kv.key)


def _read_template(path: "str | os.PathLike[str]") -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise GGUFError(f"{path}: chat template file is a directory")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GGUFError(f"{path}: chat template is not valid UTF-8 (byte {e.start})") from None


def _alignment_of(kvs: Sequence[KV]) -> int:
    for kv in kvs:
        if kv.key == KEY_ALIGNMENT:
            if kv.type != GGUFValueType.UINT32:
                raise GGUFError(f"{KEY_ALIGNMENT} must be UINT32, not {GGUFValueType(kv.type).name}")
            a = int(kv.value)
            if a <= 0 or a & (a - 1):
                raise GGUFError(f"{KEY_ALIGNMENT} = {a} is not a power of two")
            return a
    return GGUF_DEFAULT_ALIGNMENT


# --- the whole edit
def edit_file(src: "str | os.PathLike[str]", dst: "str | os.PathLike[str]", *, set_items: Sequence[str] = (),
              remove: Sequence[str] = (), chat_template_file: "str | os.PathLike[str] | None" = None,
              overwrite: bool = False) -> EditResult:
    """Write ``dst``: ``src`` with ``set_items`` ('KEY=VALUE' / 'KEY=TYPE:VALUE') applied, ``remove`` keys
    dropped and ``tokenizer.chat_template`` replaced by the contents of ``chat_template_file``."""
    src, dst = os.fspath(src), os.fspath(dst)
    template = _read_template(chat_template_file) if chat_template_file is not None else None
    with GGUFReader(src) as reader:
        writer = GGUFWriter(dst, version=reader.version, overwrite=overwrite,
                            protect=[src] + ([chat_template_file] if chat_template_file is not None else []))
        try:
            set_kvs = []
            for spec in set_items:
                key, text = parse_set(spec)
                set_kvs.append(value_from_text(key, text, reader.kv(key)))
            if template is not None:
                if any(kv.key == KEY_CHAT_TEMPLATE for kv in set_kvs):
                    raise GGUFError(f"--chat-template-file and --set {KEY_CHAT_TEMPLATE} both given")
                old = reader.kv(KEY_CHAT_TEMPLATE)
                if old is not None and old.type != GGUFValueType.STRING:
                    raise GGUFError(f"{KEY_CHAT_TEMPLATE} in {src} is {old.type.name}, not STRING")
                set_kvs.append(KV(KEY_CHAT_TEMPLATE, GGUFValueType.STRING, template))
            kvs, result = apply_edits(reader.kvs, set_kvs, remove)
            alignment = _alignment_of(kvs)
            writer.add_kvs(kvs)
            if alignment == reader.alignment:
                # same layout: keep every tensor offset and copy the data section byte for byte
                for t in reader.tensors:
                    writer.add_tensor_info(t.name, t.shape, t.type, offset=t.offset)
                writer.write_header()
                writer.copy_data_section(reader.data_section())
            else:
                result.relaid = True
                for t in reader.tensors:
                    writer.add_tensor_info(t.name, t.shape, t.type)
                writer.write_header()
                for t in reader.tensors:
                    writer.write_tensor_data(t.name, reader.tensor_bytes(t))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    return result

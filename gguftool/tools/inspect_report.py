"""What ``gguftool inspect`` shows: a JSON-ready report of a GGUF file and its human-readable rendering.

Kept free of numba and of anything heavier than numpy so that inspecting a file is quick: the reader parses
the header once (string arrays in one tight loop, numeric arrays as numpy buffers) and this module only formats
what is shown. Long arrays are summarised unless ``full`` is asked for.

JSON document::

    {"version", "alignment", "file_size", "data_offset",
     "metadata": {key: value}, "metadata_types": {key: "UINT32" | "ARRAY[STRING]" | ...},
     "tensors": [{"name", "type", "shape" (ggml order), "offset" (relative to the data section), "nbytes"}],
     "summary": {"n_tensors", "n_params", "nbytes", "bpw", "types": {type: count}}}

Arrays longer than ``ARRAY_SUMMARY_LIMIT`` become ``{"array_of": TYPE, "length": n, "head": [first values]}``
unless ``full``. Non-finite floats are written as the strings "nan", "inf", "-inf" (JSON has no such numbers).
"""
from __future__ import annotations

import fnmatch
import json
import math
from typing import Any, Iterable

import numpy as np

from ..gguf.constants import GGUFValueType
from ..gguf.reader import GGUFReader, TensorInfo
from ..gguf.values import GGUFArray

__all__ = ["build_report", "report_json", "render_human", "select_tensors", "type_name",
           "ARRAY_SUMMARY_LIMIT", "ARRAY_HEAD"]

ARRAY_SUMMARY_LIMIT = 64   # arrays longer than this are summarised in JSON unless full
ARRAY_HEAD = 8             # elements shown of a summarised array (JSON head)
HUMAN_ARRAY_HEAD = 5       # elements shown of an array in human output
HUMAN_STR_LIMIT = 72       # characters of a string shown in human output

_TOKEN_ID_KEYS = [("BOS", "tokenizer.ggml.bos_token_id"), ("EOS", "tokenizer.ggml.eos_token_id"),
                  ("UNK", "tokenizer.ggml.unknown_token_id"), ("PAD", "tokenizer.ggml.padding_token_id")]


# --- value conversion
def type_name(vtype: GGUFValueType, value: Any = None) -> str:
    """'UINT32', 'STRING', 'ARRAY[FLOAT32]', 'ARRAY[ARRAY]'."""
    if vtype == GGUFValueType.ARRAY and isinstance(value, GGUFArray):
        return f"ARRAY[{GGUFValueType(value.element_type).name}]"
    return GGUFValueType(vtype).name


def _json_float(x: float) -> "float | str":
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _json_scalar(v: Any) -> Any:
    if isinstance(v, float):
        return _json_float(v)
    return v


def _numeric_list(values: np.ndarray) -> list:
    out = values.tolist()
    if values.dtype.kind == "f" and values.size and not np.isfinite(values).all():
        out = [_json_float(x) for x in out]
    return out


def _json_array(arr: GGUFArray, full: bool) -> Any:
    et = GGUFValueType(arr.element_type)
    n = len(arr.values)
    summarise = not full and n > ARRAY_SUMMARY_LIMIT
    vals = arr.values[:ARRAY_HEAD] if summarise else arr.values
    if et == GGUFValueType.ARRAY:
        items = [_json_array(v, full) for v in vals]
    elif et == GGUFValueType.STRING:
        items = list(vals)
    else:
        items = _numeric_list(np.asarray(vals))
    if summarise:
        return {"array_of": et.name, "length": n, "head": items}
    return items


def json_value(vtype: GGUFValueType, value: Any, full: bool = False) -> Any:
    if isinstance(value, GGUFArray):
        return _json_array(value, full)
    return _json_scalar(value)


# --- tensor selection and totals
def select_tensors(tensors: Iterable[TensorInfo], pattern: "str | None") -> list[TensorInfo]:
    if not pattern:
        return list(tensors)
    return [t for t in tensors if fnmatch.fnmatchcase(t.name, pattern)]


def summarize(tensors: list[TensorInfo]) -> dict:
    n_params = sum(t.n_elements for t in tensors)
    nbytes = sum(t.nbytes for t in tensors)
    types: dict[str, int] = {}
    for t in tensors:
        types[t.type.name] = types.get(t.type.name, 0) + 1
    return {"n_tensors": len(tensors), "n_params": n_params, "nbytes": nbytes,
            "bpw": round(nbytes * 8 / n_params, 4) if n_params else 0.0, "types": types}


# --- JSON report
def build_report(reader: GGUFReader, *, full: bool = False, tensors: bool = True,
                 pattern: "str | None" = None) -> dict:
    selected = select_tensors(reader.tensors, pattern)
    doc: dict[str, Any] = {
        "version": reader.version,
        "alignment": reader.alignment,
        "file_size": reader.file_size,
        "data_offset": reader.data_offset,
        "metadata": {kv.key: json_value(kv.type, kv.value, full) for kv in reader.kvs},
        "metadata_types": {kv.key: type_name(kv.type, kv.value) for kv in reader.kvs},
    }
    if tensors:
        doc["tensors"] = [{"name": t.name, "type": t.type.name, "shape": list(t.shape), "offset": t.offset,
                           "nbytes": t.nbytes} for t in selected]
    doc["summary"] = summarize(selected)
    return doc


def report_json(reader: GGUFReader, *, full: bool = False, tensors: bool = True,
                pattern: "str | None" = None, indent: "int | None" = 2) -> str:
    # ensure_ascii keeps invalid UTF-8 (held as lone surrogates) printable as \udcXX escapes
    return json.dumps(build_report(reader, full=full, tensors=tensors, pattern=pattern), indent=indent)


# --- human output
def _short_str(s: str, limit: "int | None" = HUMAN_STR_LIMIT) -> str:
    if limit is None:
        limit = len(s)
    shown = json.dumps(s[:limit], ensure_ascii=False)
    try:
        shown.encode("utf-8")
    except UnicodeEncodeError:  # invalid UTF-8 bytes from the file
        shown = json.dumps(s[:limit])
    if len(s) > limit:
        return f"{shown[:-1]}…\" ({len(s)} chars)"
    return shown


def _fmt_array(arr: GGUFArray, full: bool = False) -> str:
    """'262144 items: ["<pad>", "<eos>", …]' (every element, strings whole, when full)."""
    et = GGUFValueType(arr.element_type)
    n = len(arr.values)
    head = n if full else HUMAN_ARRAY_HEAD
    vals = arr.values[:head]
    if et == GGUFValueType.STRING:
        items = [_short_str(s, None if full else 24) for s in vals]
    elif et == GGUFValueType.ARRAY:
        items = [_fmt_array(v, full) if full else f"[{GGUFValueType(v.element_type).name.lower()} × {len(v)}]"
                 for v in vals]
    elif et == GGUFValueType.FLOAT32:
        items = [_f32(x) for x in vals]
    else:
        items = [str(x) for x in np.asarray(vals).tolist()]
    more = ", …" if n > head else ""
    return f"{n} item{'s' if n != 1 else ''}: [{', '.join(items)}{more}]"


def _f32(x) -> str:
    # shortest text that reads back as the same float32 (1e-06, not 9.999999974752427e-07)
    if not np.isfinite(x):
        return str(float(x))
    return np.format_float_positional(np.float32(x), unique=True, trim="-") if 1e-4 <= abs(x) < 1e16 or x == 0 \
        else np.format_float_scientific(np.float32(x), unique=True, trim="-")


def _fmt_value(vtype: GGUFValueType, value: Any, full: bool = False) -> str:
    if isinstance(value, GGUFArray):
        return _fmt_array(value, full)
    if vtype == GGUFValueType.STRING:
        return _short_str(value, None if full else HUMAN_STR_LIMIT)
    if vtype == GGUFValueType.FLOAT32:
        return _f32(value)
    if vtype == GGUFValueType.BOOL:
        return "true" if value else "false"
    return str(value)


def _human_size(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


def _human_count(n: int) -> str:
    for unit, k in (("B", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
        if n >= k:
            return f"{n / k:.2f}{unit}"
    return str(n)


def _tokenizer_lines(reader: GGUFReader) -> list[str]:
    model = reader.get("tokenizer.ggml.model")
    if model is None:
        return []
    tokens = reader.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):    # absent, or (in a damaged file) not an array: shown as it is, not used
        tokens = None
    n_vocab = len(tokens) if tokens is not None else 0
    merges = reader.get("tokenizer.ggml.merges")
    lines = ["Tokenizer:",
             f"  model {model!s}, pre-tokenizer {reader.get('tokenizer.ggml.pre', '(none)')!s}, "
             + (f"vocabulary {n_vocab} tokens" if tokens is not None or "tokenizer.ggml.tokens" not in reader
                else "vocabulary not an array")
             + ("" if "tokenizer.ggml.merges" not in reader
                else f", {len(merges)} merges" if isinstance(merges, list) else ", merges not an array")]
    ids = []
    for label, key in _TOKEN_ID_KEYS:
        tid = reader.get(key)
        if tid is None:
            ids.append(f"{label} -")
            continue
        text = ""
        if isinstance(tid, int) and tokens is not None and 0 <= tid < n_vocab:
            text = " " + _short_str(tokens[tid], 24)
        ids.append(f"{label} {tid}{text}")
    lines.append("  " + ", ".join(ids))
    tmpl = reader.get("tokenizer.chat_template")
    lines.append(f"  chat template: {'present (%d chars)' % len(tmpl) if isinstance(tmpl, str) else 'absent'}")
    return lines


def render_human(reader: GGUFReader, *, tensors: bool = True, pattern: "str | None" = None,
                 full: bool = False) -> str:
    """The text report; ``full`` shows every array element and whole strings."""
    selected = select_tensors(reader.tensors, pattern)
    out = [
        f"File:       {reader.path}",
        f"Format:     GGUF v{reader.version}, little-endian, alignment {reader.alignment}",
        f"Size:       {reader.file_size:,} bytes ({_human_size(reader.file_size)}), "
        f"data section at byte {reader.data_offset:,}",
        f"Contents:   {len(reader.kvs)} metadata keys, {len(reader.tensors)} tensors",
    ]
    n_split = reader.get("split.count")
    if isinstance(n_split, int) and n_split > 1:
        no, total = reader.get("split.no"), reader.get("split.tensors.count")
        out.append(f"Split:      file {no + 1 if isinstance(no, int) else '?'} of {n_split} of a split model"
                   + (f" ({total} tensors in all)" if isinstance(total, int) else ""))
    out += ["", "Metadata:"]
    if reader.kvs:
        kw = max(len(kv.key) for kv in reader.kvs)
        tw = max(len(type_name(kv.type, kv.value)) for kv in reader.kvs)
        for kv in reader.kvs:
            out.append(f"  {kv.key:<{kw}}  {type_name(kv.type, kv.value).lower():<{tw}}  "
                       f"{_fmt_value(kv.type, kv.value, full)}")
    else:
        out.append("  (none)")
    tok = _tokenizer_lines(reader)
    if tok:
        out.append("")
        out.extend(tok)
    if tensors:
        out.append("")
        title = f"Tensors matching {pattern!r}" if pattern else "Tensors"
        out.append(f"{title} ({len(selected)}):")
        if selected:
            nw = max(len(t.name) for t in selected)
            shapes = [" x ".join(str(d) for d in t.shape) or "(scalar)" for t in selected]
            sw = max(len("shape (ne0 first)"), max(len(s) for s in shapes))
            tw = max(4, max(len(t.type.name) for t in selected))
            out.append(f"  {'name':<{nw}}  {'shape (ne0 first)':<{sw}}  {'type':<{tw}}  {'bytes':>12}")
            for t, shp in zip(selected, shapes):
                out.append(f"  {t.name:<{nw}}  {shp:<{sw}}  {t.type.name:<{tw}}  {t.nbytes:>12,}")
    s = summarize(selected)
    out.append("")
    which = f" (tensors matching {pattern!r})" if pattern else ""
    out.append(f"Totals{which}:")
    out.append(f"  {s['n_tensors']} tensors, {s['n_params']:,} parameters ({_human_count(s['n_params'])}), "
               f"{s['nbytes']:,} bytes ({_human_size(s['nbytes'])}), {s['bpw']:.3f} bits per weight")
    if s["types"]:
        order = sorted(s["types"].items(), key=lambda kv: (-kv[1], kv[0]))
        out.append("  types: " + ", ".join(f"{name} {count}" for name, count in order))
    return "\n".join(out)

"""gguftool: convert, quantize, inspect and edit GGUF files, byte-identical to llama.cpp.

The public API is imported lazily so that light commands (``gguftool inspect``) never load numba.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "quantize": "gguftool.quants",
    "dequantize": "gguftool.quants",
    "GGUFReader": "gguftool.gguf.reader",
    "GGUFWriter": "gguftool.gguf.writer",
    "GGMLType": "gguftool.gguf.constants",
    "GGUFValueType": "gguftool.gguf.constants",
    "KV": "gguftool.gguf.values",
    "GGUFArray": "gguftool.gguf.values",
    "GGUFError": "gguftool.errors",
    "FormatError": "gguftool.errors",
    "QuantError": "gguftool.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gguftool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

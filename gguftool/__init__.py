"""gguftool: convert, quantize, inspect and edit GGUF files, byte-identical to llama.cpp.

The jobs (gguftool.api): ``convert`` (Hugging Face checkpoint -> GGUF), ``quantize_file`` (GGUF -> GGUF),
``edit_file`` (metadata), ``imatrix`` (importance matrix from calibration text), ``perplexity``
(perplexity and KL-divergence on a text), ``GGUFReader`` (reading); ``plan_convert`` / ``plan_quantize`` give the plan before
anything is written. Arrays: ``quantize`` / ``dequantize`` (float32 rows <-> ggml blocks).

The public API is imported lazily so that light commands (``gguftool inspect``) never load numba.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:   # what the lazy names are, for type checkers and editors
    from .api import Job, QuantizeOptions, convert, plan_convert, plan_quantize, quantize_file
    from .errors import FormatError, GGUFError, QuantError
    from .gguf.constants import GGMLType, GGUFValueType
    from .gguf.reader import GGUFReader
    from .gguf.values import KV, GGUFArray
    from .gguf.writer import GGUFWriter
    from .importance.run import ImatrixResult
    from .importance.run import compute_imatrix_file as imatrix
    from .quality.perplexity import PerplexityResult
    from .quality.perplexity import compute_perplexity as perplexity
    from .quants import dequantize, quantize
    from .tools.edit import EditResult, edit_file

# public name -> module that defines it ("module:name" where the module calls it otherwise)
_LAZY = {
    "convert": "gguftool.api",
    "quantize_file": "gguftool.api",
    "plan_convert": "gguftool.api",
    "plan_quantize": "gguftool.api",
    "QuantizeOptions": "gguftool.api",
    "Job": "gguftool.api",
    "edit_file": "gguftool.tools.edit",
    "EditResult": "gguftool.tools.edit",
    "imatrix": "gguftool.importance.run:compute_imatrix_file",
    "ImatrixResult": "gguftool.importance.run",
    "perplexity": "gguftool.quality.perplexity:compute_perplexity",
    "PerplexityResult": "gguftool.quality.perplexity",
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

__all__ = [
    "convert", "quantize_file", "plan_convert", "plan_quantize", "QuantizeOptions", "Job", "edit_file", "EditResult",
    "imatrix", "ImatrixResult", "perplexity", "PerplexityResult", "GGUFReader", "GGUFWriter", "GGMLType", "GGUFValueType", "KV", "GGUFArray", "quantize", "dequantize",
    "GGUFError", "FormatError", "QuantError", "__version__",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gguftool' has no attribute {name!r}")
    module, _, attr = module.partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value
    return value

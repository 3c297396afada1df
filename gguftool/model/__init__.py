"""The model side of ``gguftool imatrix``: a numpy forward pass and a llama.cpp-identical tokenizer.

- :class:`gguftool.model.forward.Model`: float32 forward pass for the llama family (``SUPPORTED_ARCHS``) with a
  hook on every matrix multiplication input; :class:`gguftool.model.config.ModelConfig`: its hyperparameters, read
  and checked from GGUF metadata; :mod:`~gguftool.model.ops`, :mod:`~gguftool.model.activations` and
  :mod:`~gguftool.model.threads`: its numerics and threads;
- :class:`gguftool.model.tokenizer.Tokenizer`: SentencePiece-style ("llama") and byte-level BPE ("gpt2")
  tokenization from GGUF vocabulary metadata, token-for-token as ``llama_tokenize``.
"""
from __future__ import annotations

from .config import SUPPORTED_ARCHS, ModelConfig
from .forward import Model
from .threads import set_num_threads
from .tokenizer import Tokenizer

__all__ = ["Model", "ModelConfig", "SUPPORTED_ARCHS", "Tokenizer", "set_num_threads"]

"""The model side of ``gguftool imatrix``: a numpy forward pass and a llama.cpp-identical tokenizer.

- :class:`gguftool.model.forward.Model` / :class:`~gguftool.model.forward.ModelConfig`: float32 forward pass for
  llama, mistral, qwen2, qwen3 and gemma3 with a hook on every matrix multiplication input;
- :class:`gguftool.model.tokenizer.Tokenizer`: SentencePiece-style ("llama") and byte-level BPE ("gpt2")
  tokenization from GGUF vocabulary metadata, token-for-token as ``llama_tokenize``.
"""
from __future__ import annotations

from .forward import Model, ModelConfig, SUPPORTED_ARCHS, set_num_threads
from .tokenizer import Tokenizer

__all__ = ["Model", "ModelConfig", "SUPPORTED_ARCHS", "Tokenizer", "set_num_threads"]

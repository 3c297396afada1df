"""Hugging Face checkpoints: ``checkpoint`` (lazy, validated safetensors shards), ``schema`` (typed, range-checked
config.json values), ``archs`` (one table per architecture), ``vocab`` (tokenizer metadata) and ``source`` (the
checkpoint as a pipeline TensorSource, what convert_hf_to_gguf.py would write)."""

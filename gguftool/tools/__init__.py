"""The file tools: ``inspect_report`` (what a GGUF file holds, as text or JSON) and ``edit`` (metadata changes that
copy the tensors untouched)."""

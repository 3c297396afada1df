#!/usr/bin/env python
"""Run llama.cpp's convert_hf_to_gguf.py with an unrecognized BPE pre-tokenizer hash mapped to a given name.

llama.cpp's converter names a tokenizer's pre-tokenizer (``tokenizer.ggml.pre``) by the sha256 of the ids it gives
a fixed check text (``TextModel.get_vocab_base_pre``), i.e. it only recognizes the real model's vocabulary. A small
test vocabulary with the same pre-tokenizer (fixtures/kimi-k2-tokenizer: Kimi-K2's regex, 1024 trained ranks) has
another hash, so the converter raises NotImplementedError. This harness wraps get_vocab_base_pre: the original
runs first; only when it raises (hash not recognized) does it return PRE. Nothing else in the converter changes.

    PYTHONPATH=LLAMA_CPP/gguf-py PY scripts/convert_with_pre.py LLAMA_CPP PRE [convert_hf_to_gguf.py arguments]

(used by scripts/make_convert_reference.py --pre PRE)
"""
import runpy
import sys
from pathlib import Path


def main() -> None:
    llama_cpp, pre, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    sys.path.insert(0, str(llama_cpp))
    from conversion.base import TextModel   # the module convert_hf_to_gguf.py imports (same sys.path entry)

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            print(f"convert_with_pre: pre-tokenizer hash not recognized, using {pre!r}", file=sys.stderr)
            return pre

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    script = llama_cpp / "convert_hf_to_gguf.py"
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()

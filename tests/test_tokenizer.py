"""Tokenizer: hand-made vocabularies (merge order, byte fallback, special-token partition) and token-for-token
agreement with llama.cpp (llama-cpp-python, vocab_only) on real text for both vocabulary kinds."""
from __future__ import annotations

from pathlib import Path

import pytest

from gguftool.errors import ImatrixError
from gguftool.model.tokenizer import Tokenizer, _BYTE_ENC

CALIB = Path(__file__).resolve().parent.parent / "fixtures" / "calibration" / "essays.txt"

TRICKY = [
    "",
    " ",
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand   runs of   spaces",
    "numbers 1234567 3.14159 and 2024-01-01, 1,000,000",
    "it's we're they've I'm you'll he'd DON'T",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 😀🎉 and symbols © ® ™ € £ ¥ § ¶ • … — –",
    "code: def f(x):\n    return x**2  # comment\n",
    "<|im_start|>user\nhi<|im_end|>",
    "<start_of_turn>user\nhello<end_of_turn>",
    "x" * 300,
    "\u2581already\u2581escaped",
]


# --- hand-made vocabularies


def _bpe(tokens, merges, **kw):
    enc = lambda s: "".join(_BYTE_ENC[b] for b in s.encode())  # noqa: E731
    toks = [enc(t) for t in tokens]
    meta = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": kw.pop("pre", "gpt-2"),
        "tokenizer.ggml.tokens": toks, "tokenizer.ggml.token_type": kw.pop("types", [1] * len(toks)),
        "tokenizer.ggml.merges": [f"{enc(a)} {enc(b)}" for a, b in merges],
    }
    meta.update(kw)
    return Tokenizer.from_metadata(meta)


def test_bpe_merges_lowest_rank_first():
    # "abc": merges ranked (b c) before (a b) -> a + bc
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    tok = _bpe(tokens, [("b", "c"), ("a", "b"), ("a", "bc")])
    assert tok.tokenize("abc") == [5]
    tok2 = _bpe(tokens, [("a", "b"), ("b", "c")])
    assert tok2.tokenize("abc") == [3, 2]


def test_bpe_pretokenizer_splits_words_and_keeps_space():
    tokens = ["a", "b", " ", "ab", " a", " ab"]
    tok = _bpe(tokens, [(" ", "a"), ("a", "b"), (" a", "b")])
    # " ?\p{L}+" keeps the leading space with the word
    assert tok.tokenize("ab ab") == [3, 5]
    # with (a b) ranked first, " ab" becomes " " + "ab"
    tok2 = _bpe(tokens, [("a", "b"), (" ", "a"), (" a", "b")])
    assert tok2.tokenize("ab ab") == [3, 2, 3]


def test_bpe_add_bos_and_user_defined_tokens():
    tokens = ["a", "b", "<sep>", "<ctl>", "<", ">", "s", "e", "p", "c", "t", "l"]
    types = [1, 1, 4, 3] + [1] * 8
    tok = _bpe(tokens, [], types=types, **{"tokenizer.ggml.bos_token_id": 3, "tokenizer.ggml.add_bos_token": True})
    ids = tok.tokenize("a<sep>b")
    assert ids == [3, 0, 2, 1]          # BOS, a, user-defined token split out, b
    # control tokens are not parsed unless parse_special
    assert 3 not in tok.tokenize("a<ctl>b", add_special=False)
    assert tok.tokenize("a<ctl>b", add_special=False, parse_special=True) == [0, 3, 1]


def test_spm_highest_score_merge_and_byte_fallback():
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "ab", "\u2581a", "\u2581ab"]
    tokens += [f"<0x{i:02X}>" for i in range(256)]
    scores = [0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -0.5, -0.7, -0.1] + [0.0] * 256
    types = [2, 3, 3] + [1] * 6 + [6] * 256
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types}
    tok = Tokenizer.from_metadata(meta)
    assert tok.add_bos and tok.bos_id == 1
    # " ab" -> "▁ab" (space prefix); "é" is not in the vocabulary -> its two UTF-8 bytes
    assert tok.tokenize("ab") == [1, 8]
    assert tok.tokenize("aé", add_special=False) == [7, 9 + 0xC3, 9 + 0xA9]


def test_unsupported_vocab_kinds():
    with pytest.raises(ImatrixError, match="unsupported tokenizer model 'bert'"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ImatrixError, match="unsupported BPE pre-tokenizer 'nonesuch'"):
        _bpe(["a"], [], pre="nonesuch")
    with pytest.raises(ImatrixError, match="no tokenizer"):
        Tokenizer.from_metadata({})


# --- agreement with llama.cpp on real vocabularies


def _llama_tokens(path, text):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the tokenization oracle")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)


def _ours(path):
    from gguftool.gguf.source import open_gguf_source
    src = open_gguf_source(str(path))
    try:
        return Tokenizer.from_metadata(src)
    finally:
        src.close()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2_gguf", "gemma3_gguf"])
def test_matches_llama_cpp_on_real_text(which, request):
    path = request.getfixturevalue(which)
    text = CALIB.read_text(encoding="utf-8")
    tok = _ours(path)
    ours = tok.tokenize(text)
    ref = _llama_tokens(path, text)
    assert len(ours) > 10000
    assert ours == ref
    for s in TRICKY:
        assert tok.tokenize(s) == _llama_tokens(path, s), repr(s)

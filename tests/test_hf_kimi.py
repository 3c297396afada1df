"""Kimi-K2 checkpoints: DeepseekV3ForCausalLM with model_type "kimi_k2" and a TikToken tokenizer (tiktoken.model).

The tiny checkpoint is `scripts/make_tiny_model.py --variant kimi-k2` (DeepSeek-V3 structure, Kimi's config keys,
fixtures/kimi-k2: 1024 BPE ranks trained with Kimi's regex + Kimi's special tokens); fixtures/convert_reference/
kimi-k2.json and fp8-kimi-k2.json hold what llama.cpp's converter (run through scripts/convert_with_pre.py, since
its pre-tokenizer hash only recognizes the real 163,840-token vocabulary) and llama-quantize write for it.
"""
from __future__ import annotations

import base64
import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import CONVERT_REF as REF, FIXTURES
from gguftool.cli import main
from gguftool.hf.source import open_hf_source
from gguftool.hf.tiktoken_vocab import _bpe, read_ranks, rebuild_merges, special_tokens, token_string
from make_tiny_model import make_variant
from test_convert_cmd import expected_file
from test_hf_source import source_digest, strip_descriptive

TOK = FIXTURES / "kimi-k2"


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    return make_variant(tmp_path_factory.mktemp("kimi") / "kimi-k2", "kimi-k2")


def _converter_bpe(ranks, token, max_rank):
    """llama.cpp's QwenModel.bpe as written there: every pair re-ranked at each step, the first lowest one merged."""
    parts = [bytes([b]) for b in token]
    while True:
        found = None
        for i, (a, b) in enumerate(zip(parts[:-1], parts[1:])):
            r = ranks.get(a + b)
            if r is not None and (found is None or r < found[1]):
                found = (i, r)
        if found is None or found[1] >= max_rank:
            return parts
        i = found[0]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


def test_merges_as_the_converter_rebuilds_them():
    ranks = read_ranks(TOK / "tiktoken.model")
    assert len(ranks) == 1024 and sorted(ranks.values()) == list(range(1024))
    for token, rank in ranks.items():
        assert _bpe(ranks, token, rank) == _converter_bpe(ranks, token, rank), token
    # ties: equal pairs merge leftmost first; a token not reachable in two parts gives no merge
    toy = {b"a": 0, b"b": 1, b"aa": 2, b"ab": 3, b"aab": 4, b"aaaa": 5, b"aaa": 6}
    assert _bpe(toy, b"aaaa", 5) == _converter_bpe(toy, b"aaaa", 5) == [b"aa", b"aa"]
    assert _bpe(toy, b"aaa", 6) == [b"aa", b"a"]
    assert _bpe(toy, b"aab", 4) == _converter_bpe(toy, b"aab", 4) == [b"aa", b"b"]
    assert rebuild_merges(toy) == ["a a", "a b", "aa b", "aa aa", "aa a"]
    merges = rebuild_merges(ranks)
    assert len(merges) == 768 and merges[0] == "\u0120 t"      # GPT-2 strings: a space is U+0120
    s = token_string(bytes(range(256)))   # GPT-2's table: printable bytes as themselves, the others from U+0100
    assert len(set(s)) == 256 and s[ord("A")] == "A" and s[0] == "\u0100" and s[ord(" ")] == "\u0120"
    assert token_string(b" \n\xff") == "\u0120\u010a\u00ff"


def test_ranks_read_as_tiktoken_reads_them(monkeypatch):
    load = pytest.importorskip("tiktoken.load", reason="tiktoken's own loader is the reference")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")    # no cache copy under /tmp
    theirs = load.load_tiktoken_bpe(str(TOK / "tiktoken.model"))
    assert list(read_ranks(TOK / "tiktoken.model").items()) == list(theirs.items())


def test_special_tokens_as_the_class_names_them():
    cfg = json.loads((TOK / "tokenizer_config.json").read_text())
    sp = special_tokens(cfg, 1024)
    assert len(sp) == 258 and sp["[BOS]"] == 1024 and sp["[EOS]"] == 1025 and sp["[PAD]"] == 1279
    assert sp["<|reserved_token_1029|>"] == 1029 and sp["<|reserved_token_1281|>"] == 1281
    cfg["added_tokens_decoder"]["1030"] = {"content": "[BOS]"}          # a name given twice: the later id keeps it
    assert special_tokens(cfg, 1024)["[BOS]"] == 1030


@pytest.mark.slow
def test_converted_metadata_and_tensors(kimi):
    ref = json.loads((REF / "kimi-k2.json").read_text())
    src = open_hf_source(kimi)
    try:
        assert src.outtype == ref["outtype"] and src.vocab.pre == "kimi-k2" and src.vocab.n_merges == 768
        mine = source_digest(src)
    finally:
        src.close()
    assert strip_descriptive(mine["kv"]) == strip_descriptive(ref["convert"]["kv"])
    assert mine["tensors"] == ref["convert"]["tensors"]


@pytest.mark.slow
def test_quantized_file(kimi, tmp_path):
    pytest.importorskip("gguf", reason="gguf-py reads the written file")
    from make_convert_reference import file_digest

    ref = json.loads((REF / "kimi-k2.json").read_text())
    out = tmp_path / "k.gguf"
    r = CliRunner().invoke(main, ["convert", str(kimi), "--type", "Q4_K_M", "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    mine = file_digest(str(out))
    assert strip_descriptive(mine["kv"]) == strip_descriptive(ref["quantized"]["Q4_K_M"]["kv"])
    assert mine["tensors"] == expected_file(ref, "Q4_K_M")["tensors"]


@pytest.mark.slow
def test_fp8_checkpoint_to_q4_k_m_in_one_step(kimi, tmp_path):
    pytest.importorskip("gguf", reason="gguf-py reads the written file")
    from make_convert_reference import file_digest
    from make_fp8_checkpoint import fp8_copy

    fp8 = fp8_copy(kimi, tmp_path / "fp8")
    assert json.loads((fp8 / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    ref = json.loads((REF / "fp8-kimi-k2.json").read_text())
    out = tmp_path / "k.gguf"
    r = CliRunner().invoke(main, ["convert", str(fp8), "--type", "Q4_K_M", "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    mine = file_digest(str(out))
    assert strip_descriptive(mine["kv"]) == strip_descriptive(ref["quantized"]["Q4_K_M"]["kv"])
    assert mine["tensors"] == expected_file(ref, "Q4_K_M")["tensors"]




SENTENCES = [
    "Long before there was a town on the bend of the river, there was a ford.",
    "HelloWorld! It's 12345 o'clock; WE'LL see... I'm SURE they've gone.\n\n  Tabs\tand   spaces  ",
    "我想在apple工作1314151天～ нещо на Български 🦙🦙 3.14159 ------=======",
    "<|im_user|>user<|im_middle|>What is a ford?<|im_end|>",
]


def _tiktoken_encoding():
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is the reference tokenizer")
    from make_kimi_tokenizer import KIMI_PATTERN   # the fixture's copy of tokenization_kimi.py's pattern

    cfg = json.loads((TOK / "tokenizer_config.json").read_text())
    ranks = read_ranks(TOK / "tiktoken.model")
    return tiktoken.Encoding("kimi-fixture", pat_str=KIMI_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special_tokens(cfg, len(ranks)))


def test_forward_pass_tokenizer_as_tiktoken(kimi):
    """gguftool's own tokenizer (imatrix / perplexity) with pre "kimi-k2", from the converted metadata."""
    from gguftool.model.tokenizer import Tokenizer

    enc = _tiktoken_encoding()
    src = open_hf_source(kimi, vocab_only=True)
    try:
        tok = Tokenizer.from_metadata(src)
    finally:
        src.close()
    for text in SENTENCES:
        assert tok.tokenize(text, add_special=False) == enc.encode_ordinary(text), text
        assert tok.tokenize(text, add_special=False, parse_special=True) == enc.encode(text, allowed_special="all")


@pytest.mark.slow
def test_llama_cpp_tokenizes_as_tiktoken(kimi, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the real client")
    enc = _tiktoken_encoding()
    out = tmp_path / "k.gguf"
    r = CliRunner().invoke(main, ["convert", str(kimi), "--type", "Q8_0", "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False, n_threads=1)
    for text in SENTENCES:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == enc.encode_ordinary(text), text
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == enc.encode(text, allowed_special="all")
    ids = enc.encode(SENTENCES[3], allowed_special="all")
    assert ids[0] == 1027 and ids[-1] == 1026            # <|im_user|>, <|im_end|>
    assert llm.detokenize(enc.encode_ordinary(SENTENCES[2])).decode() == SENTENCES[2]
    llm.eval(enc.encode_ordinary(SENTENCES[0])[:16])        # and the MLA model runs


# --- bad input: one Error line, exit 1, nothing written


def _convert_error(d, *extra):
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.name != "model.safetensors"}
    r = CliRunner().invoke(main, ["convert", str(d), "--type", "Q8_0", *extra])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert not any(p.suffix == ".gguf" for p in d.iterdir())
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name != "model.safetensors"} == before
    return lines[0]


def _rewrite(d, lines):
    (d / "tiktoken.model").write_text("".join(f"{t} {r}\n" for t, r in lines))


def test_bad_tiktoken_model(tmp_path):
    d = make_variant(tmp_path / "k", "kimi-k2")
    good = [line.split() for line in (d / "tiktoken.model").read_text().splitlines()]
    (d / "tiktoken.model").unlink()
    assert "no tokenizer found (expected tokenizer.json, or tiktoken.model" in _convert_error(d)
    _rewrite(d, good[:5] + [("not/base64!", "5")] + good[6:])
    assert "tiktoken.model: line 6 is not 'base64-token rank'" in _convert_error(d)
    _rewrite(d, good[:5] + [(good[5][0], "five")] + good[6:])
    assert "line 6 is not 'base64-token rank'" in _convert_error(d)
    _rewrite(d, good[:5] + [(good[5][0], "4")] + good[6:])
    assert "the ranks must be 0 to 1023, each once (rank 4 is given twice)" in _convert_error(d)
    _rewrite(d, good[:5] + [(good[4][0], "5")] + good[6:])
    assert "appears twice" in _convert_error(d)
    (d / "tiktoken.model").write_bytes(b"")
    assert "no tokens (an empty tiktoken.model)" in _convert_error(d)
    (d / "tiktoken.model").write_bytes(b"\x00\xff" * 100)
    assert "line 1 is not 'base64-token rank'" in _convert_error(d)
    _rewrite(d, good + [(base64.b64encode(b"~~%d~~" % i).decode(), str(1024 + i)) for i in range(300)])
    assert "1324 tokens do not fit config.json vocab_size 1280" in _convert_error(d)


def test_tiktoken_without_kimi_tokenizer(tmp_path):
    d = make_variant(tmp_path / "k", "kimi-k2")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v3"}))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    del tc["auto_map"], tc["tokenizer_class"]
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    assert "tiktoken.model without Kimi's tokenizer" in _convert_error(d)
    shutil.copy(TOK / "tokenizer_config.json", d / "tokenizer_config.json")   # the class decides it again
    (d / "config.json").write_text(json.dumps(cfg))
    del cfg["qk_rope_head_dim"]   # "kimi_k2" config.json is read as it is: no DeepseekV3Config default fills it
    (d / "config.json").write_text(json.dumps(cfg))
    assert 'config.json: "qk_rope_head_dim" is missing' in _convert_error(d)


def test_dry_run_reports_the_tokenizer_and_config(kimi):
    r = CliRunner().invoke(main, ["convert", str(kimi), "--type", "Q4_K_M", "--dry-run"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "tokenizer: gpt2 from tiktoken.model, pre kimi-k2, 1280 tokens, 768 merges; special: bos 1024, eos 1025" \
        in r.output
    assert "model_type 'kimi_k2' has no transformers config class" in r.output
    assert not any(p.suffix == ".gguf" for p in kimi.iterdir())

#!/usr/bin/env python
"""Check the converter's byte-level BPE (tokenizer.json) path against real vocabularies and llama.cpp.

    python scripts/check_bpe_vocab.py [--models-dir DIR] [--names qwen2,llama-bpe]

No real Qwen or Llama-3 tokenizer.json ships on PyPI, but llama.cpp's source tree has vocabulary-only GGUF files
of them (models/ggml-vocab-NAME.gguf, made by its own converter from the real Hugging Face tokenizers) with test
strings (.inp) and the token ids the Hugging Face tokenizer gives for them (.out). For each NAME this script

1. rebuilds the tokenizer.json of the original model from the GGUF vocabulary (vocab, merges, added tokens) and
   the model's published pre-tokenizer/normalizer settings (written out below), plus the tokenizer_config.json
   and config.json entries the converter reads;
2. checks the rebuilt tokenizer against the .out ids (so it behaves like the original) and that its check hash
   names the expected llama.cpp pre-tokenizer;
3. runs gguftool's converter vocabulary step (gguftool.hf.vocab.vocab_kvs) on it and compares every
   tokenizer.ggml.* key with the GGUF llama.cpp's converter wrote;
4. writes a vocabulary-only GGUF from those keys and tokenizes the .inp strings with llama.cpp (llama-cpp-python,
   vocab_only) and with gguftool's own tokenizer (gguftool.model.tokenizer), both compared with the .out ids.

The models directory is that of llama.cpp's source, e.g. the vendored copy in the llama-cpp-python sdist
(`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`). Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DEFAULT_MODELS = "/work/ref/llama_cpp_python-0.3.36/vendor/llama.cpp/models"

# The published tokenizer.json settings of the reference models (Qwen/Qwen2-7B, meta-llama/Meta-Llama-3-8B).
_SPLIT_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
SETTINGS = {
    "qwen2": dict(split=_SPLIT_QWEN2, nfc=True, ignore_merges=False, bos_template=False, arch="Qwen2ForCausalLM",
                  style="qwen2"),
    "llama-bpe": dict(split=_SPLIT_LLAMA3, nfc=False, ignore_merges=True, bos_template=True,
                      arch="LlamaForCausalLM", style="llama"),
}

TT_NORMAL, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED = 1, 3, 4, 5


def read_tests(path: Path) -> tuple[list[str], list[list[int]]]:
    texts = path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    if texts and texts[-1].endswith("\n__ggml_vocab_test__"):
        texts[-1] = texts[-1][: -len("\n__ggml_vocab_test__")]
    lines = path.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    ids = [[int(t) for t in line.split()] for line in lines[: len(texts)]]
    return texts, ids


def rebuild_hf_folder(vocab_gguf: Path, settings: dict, out: Path) -> dict:
    """tokenizer.json, tokenizer_config.json and config.json of the model the vocabulary GGUF came from."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    from gguftool.gguf.reader import GGUFReader

    with GGUFReader(str(vocab_gguf)) as r:
        meta = {kv.key: r.get(kv.key) for kv in r.kvs}
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == TT_NORMAL}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=settings["ignore_merges"],
                              fuse_unk=False, byte_fallback=False))
    if settings["nfc"]:
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(settings["split"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    added = [(i, t, ty) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (TT_CONTROL, TT_USER_DEFINED)]
    for i, t, ty in added:  # in id order, so each gets its id
        assert tk.get_vocab_size(with_added_tokens=True) == i, f"added token {t!r} is not at the end ({i})"
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)]) if ty == TT_CONTROL else \
            tk.add_tokens([AddedToken(t, special=False, normalized=False)])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if settings["bos_template"]:
        tk.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
                                          special_tokens=[(tokens[bos], bos)])])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    cfg = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
           "added_tokens_decoder": {str(i): {"content": t, "special": ty == TT_CONTROL, "normalized": False,
                                             "lstrip": False, "rstrip": False, "single_word": False}
                                    for i, t, ty in added}}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"), ("unknown", "unk_token")):
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None and tid < len(tokens):
            cfg[name] = tokens[tid]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    config = {"architectures": [settings["arch"]], "vocab_size": len(tokens), "bos_token_id": bos,
              "eos_token_id": eos}
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return meta


# What the tokenizer is made of; the special-token ids and add_* flags are compared too, but only reported: the
# reference files were made by an older llama.cpp converter (a ByteLevel post-processor now writes add_bos/add_eos
# = false) and the tokenizer_config.json they were made from is rebuilt here, not the original.
CORE_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
             "tokenizer.ggml.merges")


def compare_kvs(ours: dict, ref: dict, keys) -> list[str]:
    problems = []
    for key in keys:
        a, b = ours.get(key), ref.get(key)
        if a is None or b is None:
            problems.append(f"{key}: {'missing in ours' if a is None else 'not in llama.cpp file'}")
            continue
        a = [int(v) for v in a] if key == "tokenizer.ggml.token_type" else a
        b = [int(v) for v in b] if key == "tokenizer.ggml.token_type" else b
        if isinstance(a, list) or hasattr(a, "tolist"):
            a, b = list(a), list(b)
            if a != b:
                n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                problems.append(f"{key}: first difference at index {n} ({len(a)} vs {len(b)} entries)")
        elif a != b:
            problems.append(f"{key}: {a!r} vs {b!r}")
    return problems


def check(name: str, models_dir: Path, work: Path) -> bool:
    from tokenizers import Tokenizer as HFTokenizer

    from gguftool.gguf.reader import GGUFReader
    from gguftool.gguf.writer import GGUFWriter
    from gguftool.hf.vocab import pre_tokenizer_name, vocab_kvs
    from gguftool.model.tokenizer import Tokenizer

    settings = SETTINGS[name]
    vocab_gguf = models_dir / f"ggml-vocab-{name}.gguf"
    texts, expected = read_tests(vocab_gguf)
    folder = work / name
    ref_meta = rebuild_hf_folder(vocab_gguf, settings, folder)
    ok = True

    def report(label: str, good: bool, detail: str = "") -> None:
        nonlocal ok
        ok &= good
        print(f"  {'ok  ' if good else 'FAIL'} {label}{': ' + detail if detail else ''}")

    print(f"{name}: {len(ref_meta['tokenizer.ggml.tokens'])} tokens, {len(ref_meta['tokenizer.ggml.merges'])} "
          f"merges, {len(texts)} test strings")
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    bad = [i for i, t in enumerate(texts) if hf.encode(t, add_special_tokens=False).ids != expected[i]]
    report("rebuilt tokenizer.json reproduces the .out ids", not bad, f"{len(bad)} strings differ" if bad else "")
    pre, chkhsh = pre_tokenizer_name(hf)
    report("check hash names the pre-tokenizer", pre == ref_meta["tokenizer.ggml.pre"], f"{pre} ({chkhsh[:12]}…)")

    kvs, info = vocab_kvs(settings["style"], folder, json.loads((folder / "config.json").read_text()))
    gguf_path = work / f"{name}-gguftool-vocab.gguf"
    with GGUFReader(str(vocab_gguf)) as r:   # the model's own keys (llama.cpp needs them), then our tokenizer's
        model_kvs = [kv for kv in r.kvs if not kv.key.startswith("tokenizer.")]
    with GGUFWriter(str(gguf_path), overwrite=True) as w:
        w.add_kvs(model_kvs + kvs)
        w.write_header()
        w.finish()
    with GGUFReader(str(gguf_path)) as r:
        our_meta = {kv.key: r.get(kv.key) for kv in r.kvs}
    problems = compare_kvs(our_meta, ref_meta, CORE_KEYS)
    report("model, pre, tokens, token types and merges equal llama.cpp's converter output", not problems,
           "; ".join(problems))
    others = sorted(k for k in set(ref_meta) | set(our_meta) if k.startswith("tokenizer.") and k not in CORE_KEYS)
    for p in compare_kvs(our_meta, ref_meta, others):
        print(f"  info {p}")

    tok = Tokenizer.from_metadata(our_meta)
    bad = [i for i, t in enumerate(texts) if tok.tokenize(t, add_special=False) != expected[i]]
    report("gguftool tokenizer on the converted vocabulary", not bad, f"{len(bad)} strings differ" if bad else "")
    try:
        import llama_cpp
    except ImportError:
        report("llama.cpp tokenizer", False, "llama-cpp-python is not installed")
        return ok
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    bad = [i for i, t in enumerate(texts)
           if llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) != expected[i]]
    report("llama.cpp tokenizer on the converted vocabulary", not bad,
           f"{len(bad)} strings differ (first: {texts[bad[0]]!r})" if bad else "")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", default=DEFAULT_MODELS, help="llama.cpp's models/ directory")
    ap.add_argument("--names", default=",".join(SETTINGS), help=f"vocabularies to check ({', '.join(SETTINGS)})")
    a = ap.parse_args(argv)
    models_dir = Path(a.models_dir)
    if not models_dir.is_dir():
        print(f"error: {models_dir}: not a directory (see the docstring for where to get it)", file=sys.stderr)
        return 1
    all_ok = True
    with tempfile.TemporaryDirectory(prefix="gguftool-bpe-") as tmp:
        for name in a.names.split(","):
            if name not in SETTINGS:
                print(f"error: no settings for {name!r}", file=sys.stderr)
                return 1
            all_ok &= check(name, models_dir, Path(tmp))
    print("all checks passed" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

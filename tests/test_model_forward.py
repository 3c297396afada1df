"""The numpy forward pass against llama.cpp: small random-weight models of each supported architecture are
written as GGUF files and evaluated by both; the logits must agree to float32 rounding. F16 and quantized weights
check the activation conversion ggml's CPU matmul applies (fp16 rounding, Q8_0/Q8_1 blocks): without it the
logits of the quantized models differ by about 3%."""
from __future__ import annotations

import numpy as np
import pytest

from gguftool.errors import ImatrixError
from gguftool.model.forward import Model, ModelConfig, rms_norm, rope_cache

# --- building small GGUF models

N_VOCAB = 259          # <unk> <s> </s> + 256 byte tokens


def _spm_vocab(w):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [6] * 256)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def write_model(path, arch, rng, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=16, n_ff=96,
                tied=False, qkv_bias=False, swa=0, wtype=None, n_expert=0, n_expert_used=2, longrope_ctx=0,
                yarn=0.0):
    gguf = pytest.importorskip("gguf", reason="gguf-py writes the test models")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0 if arch != "qwen2" else 1000000.0)
    w.add_rope_dimension_count(head_dim)
    if arch in ("gemma2", "gemma3") and swa:
        w.add_sliding_window(swa)
    if yarn:           # YaRN with a small original context, so that the blend ramp spans the rotary dimensions
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(yarn)
        w.add_rope_scaling_orig_ctx_len(64)
    if longrope_ctx:   # phi3 LongRoPE: per-dimension factors (short/long by context size) and attention factor
        w.add_rope_scaling_orig_ctx_len(longrope_ctx)
        w.add_rope_scaling_attn_factors(1.19)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(8.0)     # small, so that the cap bends the scores of this test model
        w.add_final_logit_softcapping(30.0)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(n_ff)
    w.add_file_type(0)
    _spm_vocab(w)

    def t(name, *shape, scale=0.3, offset=0.0):
        a = (rng.standard_normal(shape[::-1]) * scale + offset).astype(np.float32)
        if wtype is not None and len(shape) >= 2 and name.endswith(".weight") and "gate_inp" not in name:
            qt = getattr(gguf.GGMLQuantizationType, wtype)
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, a)

    if longrope_ctx:
        w.add_tensor("rope_factors_long.weight", np.linspace(1.0, 8.0, head_dim // 2, dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.linspace(1.0, 1.5, head_dim // 2, dtype=np.float32))
    t("token_embd.weight", n_embd, N_VOCAB, scale=1.0)
    t("output_norm.weight", n_embd, scale=0.1, offset=1.0)
    if not tied:
        t("output.weight", n_embd, N_VOCAB, scale=0.2)
    for il in range(n_layer):
        p = f"blk.{il}."
        t(p + "attn_norm.weight", n_embd, scale=0.1, offset=1.0)
        if arch == "phi3":
            t(p + "attn_qkv.weight", n_embd, (n_head + 2 * n_head_kv) * head_dim, scale=0.2)
        else:
            t(p + "attn_q.weight", n_embd, n_head * head_dim, scale=0.2)
            t(p + "attn_k.weight", n_embd, n_head_kv * head_dim, scale=0.2)
            t(p + "attn_v.weight", n_embd, n_head_kv * head_dim, scale=0.2)
        t(p + "attn_output.weight", n_head * head_dim, n_embd, scale=0.2)
        if qkv_bias:
            t(p + "attn_q.bias", n_head * head_dim, scale=0.1)
            t(p + "attn_k.bias", n_head_kv * head_dim, scale=0.1)
            t(p + "attn_v.bias", n_head_kv * head_dim, scale=0.1)
        if arch in ("qwen3", "qwen3moe", "gemma3"):
            t(p + "attn_q_norm.weight", head_dim, scale=0.1, offset=1.0)
            t(p + "attn_k_norm.weight", head_dim, scale=0.1, offset=1.0)
        if arch in ("gemma2", "gemma3"):
            t(p + "post_attention_norm.weight", n_embd, scale=0.1, offset=1.0)
            t(p + "post_ffw_norm.weight", n_embd, scale=0.1, offset=1.0)
        t(p + "ffn_norm.weight", n_embd, scale=0.1, offset=1.0)
        if n_expert:
            t(p + "ffn_gate_inp.weight", n_embd, n_expert, scale=0.5)
            t(p + "ffn_gate_exps.weight", n_embd, n_ff, n_expert, scale=0.2)
            t(p + "ffn_up_exps.weight", n_embd, n_ff, n_expert, scale=0.2)
            t(p + "ffn_down_exps.weight", n_ff, n_embd, n_expert, scale=0.2)
        elif arch == "phi3":
            t(p + "ffn_up.weight", n_embd, 2 * n_ff, scale=0.2)
            t(p + "ffn_down.weight", n_ff, n_embd, scale=0.2)
        else:
            t(p + "ffn_gate.weight", n_embd, n_ff, scale=0.2)
            t(p + "ffn_up.weight", n_embd, n_ff, scale=0.2)
            t(p + "ffn_down.weight", n_ff, n_embd, scale=0.2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _open(path, n_threads=1):
    from gguftool.gguf.source import open_gguf_source
    src = open_gguf_source(str(path))
    return src, Model.from_source(src, n_threads=n_threads)


def _llama_logits(path, tokens):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the forward-pass oracle")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True,
                          flash_attn=True, verbose=False, n_threads=1)
    llm.eval(list(tokens))
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


CASES = [
    ("llama", {}),
    ("llama", {"tied": True, "n_head_kv": 4}),
    ("qwen2", {"qkv_bias": True}),
    ("qwen3", {}),
    ("gemma3", {"swa": 32}),
    ("llama", {"wtype": "F16"}),
    ("llama", {"wtype": "Q8_0"}),
    ("llama", {"wtype": "Q4_1"}),
    ("llama", {"wtype": "Q5_0"}),
    ("gemma2", {"swa": 32, "tied": True}),           # (gemma2 always uses token_embd as its output)
    ("gemma2", {"swa": 32, "tied": True, "wtype": "Q8_0"}),
    ("phi3", {}),
    ("phi3", {"wtype": "Q4_1"}),
    ("phi3", {"longrope_ctx": 4096}),                  # short factors (context below the original length)
    ("phi3", {"longrope_ctx": 32}),                    # long factors
    ("qwen2", {"yarn": 4.0}),
    ("llama", {"yarn": 8.0}),
    ("llama", {"n_expert": 4}),                        # Mixtral-style MoE
    ("qwen3moe", {"n_expert": 6, "n_expert_used": 3}),
    ("llama", {"n_expert": 4, "wtype": "Q8_0"}),
    ("qwen3moe", {"n_expert": 4, "wtype": "Q4_1"}),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,kw", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_logits_match_llama_cpp(tmp_path, arch, kw):
    rng = np.random.default_rng(1234)
    path = write_model(tmp_path / f"{arch}.gguf", arch, rng, **kw)
    tokens = rng.integers(3, N_VOCAB, size=96)
    tokens[0] = 1
    ref = _llama_logits(path, tokens)
    src, model = _open(path, n_threads=2)
    try:
        ours = model.forward(tokens[None, :])[0]
    finally:
        del model
        src.close()
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 2e-3, rel
    assert (ours.argmax(1) == ref.argmax(1)).mean() > 0.97


def test_hooks_report_every_matmul_input(tmp_path):
    rng = np.random.default_rng(7)
    path = write_model(tmp_path / "m.gguf", "llama", rng)
    src, model = _open(path)
    seen = {}

    def hook(names, x):
        for n in names:
            seen[n] = x.shape

    tokens = rng.integers(3, N_VOCAB, size=(2, 20))
    logits = model.forward(tokens, hook=hook, logits_from=10, logits_to=19, process_output=True)
    assert logits.shape == (2, 9, N_VOCAB)
    assert set(seen) == set(model.weight_names())
    assert seen["blk.0.attn_q.weight"] == (40, 64)
    assert seen["blk.1.attn_output.weight"] == (40, 64)
    assert seen["blk.1.ffn_down.weight"] == (40, 96)
    assert seen["output.weight"] == (40, 64)
    # batching: two sequences at once give the same logits as one at a time (up to the last bits of the F32 BLAS
    # products, whose blocking depends on the row count, spread by the float16 rounding of K and V: ~1e-5 here)
    one = model.forward(tokens[1:], logits_from=10, logits_to=19)
    np.testing.assert_allclose(one[0], logits[1], rtol=1e-4, atol=1e-4)
    # threads do not change the result
    model.set_threads(3)
    again = model.forward(tokens, logits_from=10, logits_to=19)
    np.testing.assert_allclose(again, logits, rtol=1e-4, atol=1e-4)
    del model
    src.close()


def test_last_layer_finishes_only_the_wanted_positions(tmp_path):
    """Logits of positions 10:19 (the last layer then runs its FFN for those rows only, as llama.cpp's graph does)
    are the full pass's logits of those positions, up to the last bits of BLAS's row-count-dependent blocking."""
    rng = np.random.default_rng(8)
    src, model = _open(write_model(tmp_path / "m.gguf", "llama", rng), n_threads=2)
    tokens = rng.integers(3, N_VOCAB, size=(2, 20))
    full = model.forward(tokens)
    part = model.forward(tokens, logits_from=10, logits_to=19)
    assert part.shape == (2, 9, N_VOCAB)
    np.testing.assert_allclose(part, full[:, 10:19], rtol=1e-4, atol=1e-4)
    assert not np.allclose(part, full[:, 9:18], rtol=1e-2, atol=1e-2)      # the rows are the wanted ones
    del model
    src.close()


def test_missing_tensor_and_unsupported_arch(tmp_path):
    rng = np.random.default_rng(3)
    path = write_model(tmp_path / "m.gguf", "llama", rng)
    from gguftool.gguf.source import open_gguf_source
    src = open_gguf_source(str(path))
    src.tensors = [t for t in src.tensors if t.name != "blk.1.ffn_up.weight"]
    with pytest.raises(ImatrixError, match="missing tensor blk.1.ffn_up.weight"):
        Model.from_source(src)
    src.close()
    meta = {"general.architecture": "falcon"}
    with pytest.raises(ImatrixError, match="unsupported architecture 'falcon'"):
        ModelConfig.from_metadata(meta)


def test_numeric_helpers():
    x = np.array([[3.0, 4.0]], dtype=np.float32)
    y = rms_norm(x, np.ones(2, np.float32), 0.0)
    np.testing.assert_allclose(y, x / np.sqrt(12.5), rtol=1e-6)
    cos, sin = rope_cache(4, 8, 10000.0, 1.0)
    assert cos.shape == (4, 4)
    np.testing.assert_allclose(cos[:, 0], np.cos(np.arange(4)), rtol=1e-6)
    np.testing.assert_allclose(sin[2, 1], np.sin(2 * 10000.0 ** (-2 / 8)), rtol=1e-5)


@pytest.mark.parametrize("wtype,tied", [("F16", False), ("BF16", True), ("Q8_0", True), ("Q4_1", False)])
def test_stored_weights_widened_by_slabs_give_the_float32_results(tmp_path, wtype, tied):
    # the weights stay in their stored form and are widened a block of rows at a time: the same numbers as the
    # whole model read as float32 first, whatever the block and slab sizes
    from gguftool.gguf.source import open_gguf_source
    from gguftool.model.weights import WeightStore

    rng = np.random.default_rng(11)
    path = write_model(tmp_path / "m.gguf", "llama", rng, wtype=wtype, tied=tied)
    tokens = rng.integers(3, N_VOCAB, size=(2, 24))
    src = open_gguf_source(str(path))
    try:
        def run(model):
            seen = {}
            out = model.forward(tokens, hook=lambda names, x: seen.update({n: x.copy() for n in names}),
                                process_output=True)
            return out, seen

        stored = Model.from_source(src, n_threads=2)
        assert isinstance(stored.w, WeightStore)
        full = Model(stored.cfg, {n: stored.w[n] for n in stored.w}, n_threads=2)
        full.act_kinds, full.block_minima = stored.act_kinds, stored.block_minima
        ref, ref_seen = run(full)
        out, seen = run(stored)           # the tiny products are one job each, as in the float32 model
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        assert seen.keys() == ref_seen.keys()
        for name in seen:
            np.testing.assert_allclose(seen[name], ref_seen[name], rtol=1e-5, atol=1e-5)
        # many small jobs and slabs: BLAS may round a block's last bit differently from the whole product, which
        # the activation and KV-cache rounding (Q8 blocks, F16) would amplify; without them the results agree to
        # float32 rounding
        stored.small_product, stored.block_values, stored.slab_values = 0, 16 * 64, 48 * 64
        stored.act_kinds = full.act_kinds = {}
        stored.kv_f16 = full.kv_f16 = False
        ref, _ = run(full)
        out, _ = run(stored)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        # the embedding rows of the tokens present, decoded alone
        ids = np.array([5, 3, 5, 200])
        np.testing.assert_array_equal(stored.w.gather("token_embd.weight", ids), stored.w["token_embd.weight"][ids])
    finally:
        src.close()


def test_float32_weights_of_a_mapped_file_are_views(tmp_path):
    from gguftool.gguf.source import open_gguf_source

    rng = np.random.default_rng(12)
    path = write_model(tmp_path / "m.gguf", "llama", rng)
    src = open_gguf_source(str(path))
    try:
        model = Model.from_source(src)
        model.forward(rng.integers(3, N_VOCAB, size=(1, 8)))
        assert model.w.is_mapped_f32("blk.0.attn_q.weight")
        rows = model.w.rows_into("blk.0.attn_q.weight", 0, 8, None)
        assert not rows.flags.writeable and not rows.flags.owndata      # a view of the file map
        del model, rows
    finally:
        src.close()


def test_f16_bf16_rounding_and_widening_kernels_match_numpy():
    # every float32 class: random bit patterns (NaN, inf, subnormals, huge), plus the rounding edges of F16
    from gguftool.model.activations import activations_as
    from gguftool.model.widen import bf16_rows, f16_bits, f16_rows, round_bf16, round_f16

    bits = np.random.default_rng(5).integers(0, 2**32, size=(64, 512), dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).copy()
    x[0, :8] = [65504.0, 65519.99, 65520.0, 6e-8, 2.98e-8, -0.0, 6.1035156e-05, 1.0009766]
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).astype(np.float32)
    got = round_f16(x)
    nan = np.isnan(ref)
    assert np.array_equal(nan, np.isnan(got))
    assert np.array_equal(ref.view(np.uint32)[~nan], got.view(np.uint32)[~nan])
    with np.errstate(over="ignore"):
        ref_bits = x.astype(np.float16).view(np.uint16)
    bits = f16_bits(x)                                 # the same rounding as F16 bits (model.tinyblas's input)
    assert bits.dtype == np.uint16 and np.array_equal(ref_bits[~nan], bits[~nan])
    assert np.isnan(bits.view(np.float16)[nan]).all()
    # the lanes without F16C (machines without it, or numba compiling for another CPU) give the same bits
    from gguftool.model import simd
    from gguftool.quants.decode import F16_TABLE
    sample = x.reshape(-1)[:4096]
    port = np.array([simd._f16_bits_lane_portable(v) for v in sample], dtype=np.uint16)
    ok = ~np.isnan(sample)
    assert np.array_equal(port[ok], ref_bits.reshape(-1)[:4096][ok]) and np.isnan(port[~ok].view(np.float16)).all()
    back = np.array([simd._widen_f16_lane_table(u, F16_TABLE) for u in port], dtype=np.float32)
    assert np.array_equal(back[ok], ref.reshape(-1)[:4096][ok])
    u = x.view(np.uint32)
    want = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    want = np.where(np.isnan(x), ((u >> 16) | np.uint32(64)) << 16, want)
    assert np.array_equal(round_bf16(x).view(np.uint32), want)
    assert np.array_equal(activations_as(x, "bf16")[0].view(np.uint32), want)
    words = bits[:, :256].astype(np.uint16)
    out = np.empty(words.shape, np.float32)
    f16_rows(words, out.view(np.uint32))
    h = words.view(np.float16).astype(np.float32)
    assert np.array_equal(np.isnan(h), np.isnan(out)) and np.array_equal(h[~np.isnan(h)], out[~np.isnan(h)])
    bf16_rows(words, out.view(np.uint32))
    assert np.array_equal(out.view(np.uint32), words.astype(np.uint32) << 16)

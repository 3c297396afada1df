"""Pre-quantized (FP8 / int8 + scales) checkpoints: decoding, dequantization, and whole conversions compared with
llama.cpp's converter.

References: fixtures/fp8/float8_torch.json (torch's float32 value of every FP8 code, scripts/make_fp8_table.py) and
fixtures/convert_reference/fp8-*.json (convert_hf_to_gguf.py --outtype f32 + llama-quantize on the checkpoints
scripts/make_fp8_checkpoint.py writes; the checkpoints themselves are generated here, seeded, into tmp_path).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import CONVERT_REF, FIXTURES, run_cli
from gguftool.hf.checkpoint import FP8_TABLES, Checkpoint, SafetensorsTensor
from gguftool.hf.prequant import ScaledWeight, find_prequantized
from make_fp8_checkpoint import make as make_checkpoint
from test_convert_cmd import _assert_same_as_reference, _digest, expected_file


# --- FP8 codes


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2"])
def test_fp8_table_matches_torch_bit_for_bit(dtype):
    """All 256 codes (zeros, subnormals, normals, the largest, infinities, NaN payloads) as torch widens them."""
    ref = json.loads((FIXTURES / "fp8" / "float8_torch.json").read_text())[dtype]
    mine = [f"{int(b):08x}" for b in FP8_TABLES[dtype].view(np.uint32)]
    assert mine == ref
    t = FP8_TABLES[dtype]
    if dtype == "F8_E4M3":
        assert t[0x7E] == 448.0 and np.isnan(t[0x7F]) and np.isnan(t[0xFF]) and t[0x01] == 2.0 ** -9
        assert not np.isinf(t).any()
    else:
        assert t[0x7B] == 57344.0 and np.isposinf(t[0x7C]) and np.isneginf(t[0xFC]) and t[0x01] == 2.0 ** -16
        assert np.isnan(t[[0x7D, 0x7E, 0x7F]]).all()


# --- dequantization of one weight


class _Mem:
    """A SafetensorsFile stand-in holding bytes in memory (buffer() is all SafetensorsTensor.array() uses)."""

    def __init__(self, data: bytes):
        self.path = Path("mem")
        self._b = data

    def buffer(self):
        return self._b


def _tensor(name: str, dtype: str, a: np.ndarray) -> SafetensorsTensor:
    raw = a.tobytes()
    return SafetensorsTensor(name, dtype, tuple(a.shape), _Mem(raw), 0, len(raw))  # type: ignore[arg-type]


def _reference_dequant(w: np.ndarray, s: np.ndarray, block) -> np.ndarray:
    """conversion/base.py dequant_simple, step by step in numpy: repeat the scale over its blocks, cut it to the
    weight's shape, unsqueeze it to the weight's rank, one float32 multiply."""
    s = s.astype(np.float32)
    if block is not None:
        off = s.ndim - len(block)
        for i, b in enumerate(block):
            s = np.repeat(s, b, axis=off + i)
        s = s[tuple(slice(0, d) for d in w.shape)]
    while s.ndim < w.ndim:
        s = s[..., None]
    return w.astype(np.float32) * s


@pytest.mark.parametrize("shape,block,sshape", [
    ((300, 200), (128, 128), (3, 2)),       # partial edge blocks both ways
    ((64, 130), (128, 128), (1, 2)),        # fewer rows than one block
    ((256, 256), (128, 128), (2, 2)),
    ((300, 200), (64, 32), (5, 7)),
    ((300, 200), None, (300, 1)),           # per channel
    ((300, 200), None, (300,)),             # per channel, 1-D scale (unsqueezed)
    ((300, 200), None, ()),                 # per tensor
    ((300, 200), None, (1,)),
])
def test_rows_equal_the_converters_dequant(shape, block, sshape):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, shape, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x12     # no NaN here (NaN != NaN); the table test covers them
    scale = (rng.random(sshape) * 0.01 + 1e-4).astype(np.float32)
    sw = ScaledWeight(_tensor("w", "F8_E4M3", codes), _tensor("w_scale_inv", "F32", scale), block)
    sw.check()
    want = _reference_dequant(FP8_TABLES["F8_E4M3"][codes], scale, block)
    assert sw.full().view(np.uint32).tolist() == want.view(np.uint32).tolist()
    for cut in (1, 7, 128, 129, shape[0]):   # any slab split gives the same rows
        got = np.concatenate([sw.rows(a, min(a + cut, shape[0])) for a in range(0, shape[0], cut)])
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_bf16_scale_and_e5m2_weight():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 0x7B, (130, 140), dtype=np.uint8)
    words = (rng.random((2, 2), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    sw = ScaledWeight(_tensor("w", "F8_E5M2", codes), _tensor("w_scale_inv", "BF16", words), (128, 128))
    want = _reference_dequant(FP8_TABLES["F8_E5M2"][codes], (words.astype(np.uint32) << 16).view(np.float32),
                              (128, 128))
    assert np.array_equal(sw.rows(0, 130).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("shape,block,sshape,msg", [
    ((300, 200), (128, 128), (2, 2), "128x128 blocks need a scale of shape [3, 2]"),
    ((300, 200), (128, 128), (3,), "128x128 blocks need a scale of shape [3, 2]"),
    ((300, 200), None, (200, 1), "must broadcast to the weight"),
    ((300, 200), None, (2, 300), "must broadcast to the weight"),
])
def test_scale_shape_checked(shape, block, sshape, msg):
    from gguftool.errors import ConvertError

    sw = ScaledWeight(_tensor("w", "F8_E4M3", np.zeros(shape, np.uint8)),
                      _tensor("w_scale", "F32", np.ones(sshape, np.float32)), block)
    with pytest.raises(ConvertError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        sw.check()


# --- whole checkpoints against llama.cpp's converter

# variant -> its reference (llama-cttensor: llama.cpp refuses compressed-tensors' "tensor" strategy; its tensors are
# llama-tensor's, under another config, so the ModelOpt conversion is the reference)
VARIANTS = {"llama-block": "fp8-llama-block", "qwen3-block": "fp8-qwen3-block", "llama-e5m2": "fp8-llama-e5m2",
            "llama-channel": "fp8-llama-channel", "qwen3-ctblock": "fp8-qwen3-ctblock",
            "llama-tensor": "fp8-llama-tensor", "llama-cttensor": "fp8-llama-tensor",
            "llama-mistral": "fp8-llama-mistral", "llama-int8": "fp8-llama-int8", "mixtral-block": "fp8-mixtral-block"}
FAST = {("llama-block", "Q4_K_M"), ("qwen3-block", "Q8_0"), ("llama-channel", "F16")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return {v: make_checkpoint(v, root / v) for v in VARIANTS}


# every convention as the converter's own F32 file (the dequantized values) and through llama-quantize (Q4_K_M);
# the two DeepSeek/Qwen block layouts at every type the reference holds (the converter's own F16/BF16/Q8_0 too)
CASES = [(v, t) for v in VARIANTS for t in ("F32", "Q4_K_M")] + [
    (v, t) for v in ("llama-block", "qwen3-block") for t in ("F16", "BF16", "Q8_0")]


@pytest.mark.parametrize("variant,type_", [
    pytest.param(v, t, marks=() if (v, t) in FAST else pytest.mark.slow) for v, t in CASES])
def test_identical_to_llama_cpp(checkpoints, tmp_path, variant, type_):
    ref = json.loads((CONVERT_REF / f"{VARIANTS[variant]}.json").read_text())
    out = tmp_path / "out.gguf"
    r = run_cli("convert", checkpoints[variant], "--type", type_, "-o", out)
    assert r.exit_code == 0, r.output
    if type_ == "F32":   # the converter's own file: tensors (its KV order differs from llama-quantize's F32)
        assert _digest(out)["tensors"] == ref["convert"]["tensors"]
    else:
        _assert_same_as_reference(out, expected_file(ref, type_))


def test_dry_run_reports_what_was_found(checkpoints):
    r = run_cli("convert", checkpoints["llama-block"], "--type", "Q4_K_M", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "pre-quantized: quant_method fp8, weight_block_size 128x128" in r.stdout
    assert "14 F8_E4M3 weight(s) x weight_scale_inv (F32, 128x128 blocks) -> dequantized to float32" in r.stdout
    assert "blk.0.attn_k.weight          <- F8_E4M3 [64, 320] x weight_scale_inv F32 [1, 3] (128x128 blocks)" in r.stdout
    r = run_cli("convert", checkpoints["llama-tensor"], "--dry-run")
    assert "quant_method modelopt, no block size" in r.stdout
    assert "14 F8_E4M3 weight(s) x weight_scale (F32, per tensor)" in r.stdout
    assert "16 activation scale tensor(s) dropped (.input_scale, .k_scale)" in r.stdout
    assert "output: " in r.stdout and "-BF16.gguf" in r.stdout   # auto: llama.cpp's heuristic (BF16 embeddings)
    with Checkpoint.open(checkpoints["llama-mistral"]) as ck:
        pq = find_prequantized(ck)
    assert len(pq.scaled) == 14 and all(n.endswith(".qscale_weight") for n in pq.scales)
    assert all(n.endswith(".qscale_act") for n in pq.dropped) and len(pq.dropped) == 14


# --- bad input: one line, exit 1


def _bad(path, *args) -> str:
    r = run_cli("convert", path, "--type", "Q8_0", *args, "-o", path / "out.gguf")
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert not (path / "out.gguf").exists()
    return lines[0]


def _edit_config(d: Path, change) -> None:
    cfg = json.loads((d / "config.json").read_text())
    change(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def test_bad_quantization_configs(tmp_path):
    d = make_checkpoint("qwen3-block", tmp_path / "m")
    _edit_config(d, lambda c: c["quantization_config"].update(quant_method="gptq"))
    assert "quant_method 'gptq' is not supported: dequantize it to BF16 first" in _bad(d)
    _edit_config(d, lambda c: c["quantization_config"].update(quant_method="fp8", weight_block_size=[128, 0]))
    assert "weight_block_size is [128, 0], expected null or a list of 1 to 3 positive integers" in _bad(d)
    _edit_config(d, lambda c: c["quantization_config"].update(weight_block_size=[64, 64]))
    assert "64x64 blocks need a scale of shape" in _bad(d)
    _edit_config(d, lambda c: c.pop("quantization_config"))
    assert "is the scale of a pre-quantized weight, but config.json has no quantization_config" in _bad(d)


def test_bad_scale_without_weight(tmp_path):
    d = make_checkpoint("qwen3-block", tmp_path / "m")
    raw = (d / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    h = json.loads(raw[8:8 + n])
    h["model.layers.0.mlp.up_proj.weightX"] = h.pop("model.layers.0.mlp.up_proj.weight")
    hb = json.dumps(h, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    (d / "model.safetensors").write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    assert "scale tensor 'model.layers.0.mlp.up_proj.weight_scale_inv' has no weight" in _bad(d)


# --- the real client


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["llama-block", "qwen3-block"])
def test_fp8_conversion_runs_in_llama_cpp(checkpoints, tmp_path, variant):
    """llama.cpp loads the Q8_0 and Q4_K_M files and predicts nearly as from the F32 conversion."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the real client")
    from test_convert_cmd import _top1

    outs = {}
    for t in ("F32", "Q8_0", "Q4_K_M"):
        outs[t] = tmp_path / f"{t}.gguf"
        assert run_cli("convert", checkpoints[variant], "--type", t, "-o", outs[t]).exit_code == 0
    text = "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex."
    toks, ref = _top1(outs["F32"], text)
    assert toks[0] == 1 and len(toks) > 10
    for t, floor in (("Q8_0", 0.7), ("Q4_K_M", 0.3)):   # a random model: its logits are close together
        got = _top1(outs[t], text)[1]
        print(f"{variant} {t}: top-1 agreement with F32 {np.mean(got == ref):.3f} over {len(toks)} tokens")
        assert np.mean(got == ref) >= floor


def test_generator_is_deterministic(tmp_path):
    a = make_checkpoint("llama-mistral", tmp_path / "a")
    b = make_checkpoint("llama-mistral", tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


# --- a DeepSeek-V3-style checkpoint in FP8 (MLA, routed and shared experts), as DeepSeek-V3/R1 and Kimi-K2 ship:
# the 128x128 block dequantization runs before the kv_b_proj split into attn_k_b / attn_v_b


@pytest.mark.slow
@pytest.mark.parametrize("type_", ["F32", "Q8_0", "Q4_K_M"])
def test_deepseek3_fp8_identical_to_llama_cpp(tmp_path_factory, tmp_path, type_):
    from make_fp8_checkpoint import fp8_copy
    from make_tiny_model import make_variant

    root = tmp_path_factory.getbasetemp() / "deepseek3-fp8"
    if not (root / "fp8" / "config.json").is_file():
        fp8_copy(make_variant(root / "bf16", "deepseek3"), root / "fp8")
    ref = json.loads((CONVERT_REF / "fp8-deepseek3.json").read_text())
    out = tmp_path / "out.gguf"
    r = run_cli("convert", root / "fp8", "--type", type_, "-o", out)
    assert r.exit_code == 0, r.output
    if type_ == "F32":
        assert _digest(out)["tensors"] == ref["convert"]["tensors"]
    else:
        _assert_same_as_reference(out, expected_file(ref, type_))

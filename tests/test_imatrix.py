"""imatrix collector, chunking, merging, file output and the CLI (small random models; no model packages)."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CALIB, TINY_LLAMA
from gguftool.cli import main
from gguftool.errors import ImatrixError
from gguftool.importance.collect import ImatrixCollector, chunk_nll, compute_imatrix
from gguftool.importance.files import Imatrix, ImatrixEntry, read_imatrix, write_imatrix_gguf, write_imatrix_legacy

from test_model_forward import write_model

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40)


# --- collector


def test_collector_sums_counts_and_filter():
    c = ImatrixCollector(chunk_size=4)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    c(("blk.0.attn_q.weight", "blk.0.attn_k.weight"), x)
    c(("blk.0.attn_q.weight",), x)
    c(("output.weight",), x)               # not collected without process_output
    c(("token_embd.weight",), x)           # never collected
    assert sorted(c.sums) == ["blk.0.attn_k.weight", "blk.0.attn_q.weight"]
    np.testing.assert_array_equal(c.sums["blk.0.attn_q.weight"][0], 2 * (x * x).sum(0))
    assert c.counts["blk.0.attn_q.weight"].tolist() == [8]
    assert c.counts["blk.0.attn_k.weight"].tolist() == [4]
    assert c.chunk_count == 2
    c2 = ImatrixCollector(chunk_size=4, process_output=True)
    c2(("output.weight",), x)
    assert list(c2.sums) == ["output.weight"]
    with pytest.raises(ImatrixError, match="non-finite"):
        c2(("blk.1.ffn_up.weight",), np.array([[np.inf, 1.0]], dtype=np.float32))


def test_merge_gguf_and_legacy_like_llama_imatrix():
    sums = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    gg = Imatrix({"blk.0.ffn_down.weight": ImatrixEntry(sums, np.array([10]))}, ["a.txt"], 1, 10)
    leg = Imatrix({"blk.0.ffn_down.weight": ImatrixEntry(sums, np.array([2]))}, ["b.txt"], 2, 0, is_legacy=True)
    c = ImatrixCollector(chunk_size=10)
    c.merge(gg)
    c.merge(leg)
    # legacy: values * chunk_size, ncall * chunk_size
    np.testing.assert_allclose(c.sums["blk.0.ffn_down.weight"][0], sums[0] + sums[0] * 10)
    assert c.counts["blk.0.ffn_down.weight"].tolist() == [10 + 2 * 10]
    assert c.datasets == ["a.txt", "b.txt"]
    res = c.result("c.txt")
    assert res.datasets == ["a.txt", "b.txt", "c.txt"]
    assert res.chunk_count == 3 and res.chunk_size == 10


def test_chunk_nll_is_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, 5)
    nll, nll2 = chunk_nll(logits, targets)
    l64 = logits.astype(np.float64)
    lse = np.log(np.exp(l64 - l64.max(1, keepdims=True)).sum(1)) + l64.max(1)
    v = lse - l64[np.arange(5), targets]
    assert nll == pytest.approx(v.sum(), rel=1e-6)
    assert nll2 == pytest.approx((v * v).sum(), rel=1e-6)


# --- a whole run on a small model


@pytest.fixture
def tiny(tmp_path):
    return write_model(tmp_path / "tiny.gguf", "llama", np.random.default_rng(5))


def _model(path):
    from gguftool.gguf.source import open_gguf_source
    from gguftool.model.forward import Model
    from gguftool.model.tokenizer import Tokenizer
    src = open_gguf_source(str(path))
    return src, Model.from_source(src), Tokenizer.from_metadata(src)


def test_compute_imatrix_chunks_bos_and_ppl(tiny):
    src, model, tok = _model(tiny)
    ctx = 64
    ids = tok.tokenize(TEXT)
    assert ids[0] == 1 and tok.add_bos
    run = compute_imatrix(model, tok, TEXT, n_ctx=ctx, n_chunks=3, batch_tokens=128)
    im = run.imatrix
    assert run.n_chunks == 3 and im.chunk_count == 3 and im.chunk_size == ctx
    assert len(im.entries) == 2 * 7
    for e in im.entries.values():
        assert e.counts.tolist() == [3 * ctx]
    # the first layer's Q input, recomputed chunk by chunk with BOS at the start of each chunk
    acc = np.zeros(64)
    nll = 0.0
    for i in range(3):
        chunk = np.array(ids[i * ctx:(i + 1) * ctx])
        chunk[0] = tok.bos_id
        got = {}
        lg = model.forward(chunk[None], hook=lambda n, x: got.setdefault(n[0], x.copy()),
                           logits_from=ctx // 2, logits_to=ctx - 1)
        acc += (got["blk.0.attn_q.weight"].astype(np.float64) ** 2).sum(0)
        nll += chunk_nll(lg[0], np.array(ids[i * ctx + ctx // 2 + 1:(i + 1) * ctx]))[0]
    np.testing.assert_allclose(im.entries["blk.0.attn_q.weight"].in_sum2[0], acc, rtol=1e-5)
    assert run.ppl == pytest.approx(math.exp(nll / (3 * (ctx - ctx // 2 - 1))), rel=1e-6)
    assert len(run.chunk_ppl) == 3
    # too little text: llama-imatrix needs 2 * ctx tokens
    with pytest.raises(ImatrixError, match="needs at least 128"):
        compute_imatrix(model, tok, "short text", n_ctx=64)
    del model
    src.close()


# --- CLI


def _run(*args):
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def test_cli_writes_gguf_and_dat_and_merges(tiny, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "im.gguf"
    code, text = _run("imatrix", str(tiny), "--calib", str(calib), "-o", str(out), "--ctx", "64", "--chunks", "2",
                      "-q", "-t", "2")
    assert code == 0, text
    assert "Final estimate: PPL = " in text
    im = read_imatrix(out)
    assert im.chunk_count == 2 and im.chunk_size == 64 and im.datasets == [str(calib)]
    assert im.entries["blk.1.ffn_down.weight"].counts.tolist() == [128]
    assert im.entries["blk.1.ffn_down.weight"].in_sum2.shape == (1, 96)
    # existing output is kept unless --force
    code, text = _run("imatrix", "-m", str(tiny), "--calib", str(calib), "-o", str(out), "--ctx", "64", "-q")
    assert code == 1 and text.strip().splitlines() == [f"Error: {out}: output file already exists (use --force to "
                                                       f"overwrite it)"]
    # legacy .dat
    dat = tmp_path / "im.dat"
    code, text = _run("imatrix", str(tiny), "--calib", str(calib), "-o", str(dat), "--ctx", "64", "--chunks", "2",
                      "--output-format", "dat", "-q")
    assert code == 0, text
    leg = read_imatrix(dat)
    assert leg.is_legacy and leg.chunk_count == 2
    e = leg.entries["blk.0.attn_q.weight"]
    np.testing.assert_allclose(e.in_sum2[0], im.entries["blk.0.attn_q.weight"].in_sum2[0] / 128 * 2, rtol=1e-5)
    # --in-file merge without text, and with text (counts add up)
    both = tmp_path / "both.gguf"
    code, text = _run("imatrix", "--in-file", str(out), "--in-file", str(dat), "-o", str(both), "--ctx", "64")
    assert code == 0, text
    m = read_imatrix(both)
    assert m.entries["blk.0.attn_q.weight"].counts.tolist() == [128 + 2 * 64]
    assert m.chunk_count == 4
    more = tmp_path / "more.gguf"
    code, text = _run("imatrix", str(tiny), "--calib", str(calib), "-o", str(more), "--ctx", "64", "--chunks", "2",
                      "--in-file", str(out), "-q")
    assert code == 0, text
    m2 = read_imatrix(more)
    assert m2.entries["blk.0.attn_q.weight"].counts.tolist() == [256]
    np.testing.assert_allclose(m2.entries["blk.0.attn_q.weight"].in_sum2,
                               2 * im.entries["blk.0.attn_q.weight"].in_sum2, rtol=1e-5)
    assert m2.datasets == [str(calib), str(calib)]


def test_cli_process_output_and_save_frequency(tiny, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "im.gguf"
    code, text = _run("imatrix", str(tiny), "--calib", str(calib), "-o", str(out), "--ctx", "64", "--chunks", "3",
                      "--process-output", "--save-frequency", "2", "-q", "-b", "64")
    assert code == 0, text
    im = read_imatrix(out)
    assert im.entries["output.weight"].counts.tolist() == [192]
    snap = read_imatrix(str(out) + ".at_2")
    assert snap.chunk_count == 2


def test_cli_bad_input_one_line_errors(tiny, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"caf\xe9 au lait" * 100)
    cases = [
        ([str(tiny), "--calib", str(empty)], f"Error: {empty}: calibration text is empty"),
        ([str(tiny), "--calib", str(short), "--ctx", "64"], "Error: the calibration text tokenizes to only 26 tokens; "
                                                            "a context of 64 needs at least 128"),
        ([str(tiny), "--calib", str(binary)], f"Error: {binary}: calibration text is not valid UTF-8 (byte 3: 0xe9)"),
        ([str(tmp_path / "nope.gguf"), "--calib", str(short)], f"Error: {tmp_path / 'nope.gguf'}: no such model "
                                                               "file or directory"),
        ([str(tiny), "--calib", str(tmp_path / "none.txt")], f"Error: {tmp_path / 'none.txt'}: no such calibration "
                                                             "file"),
        (["--calib", str(short)], "Error: no model given (MODEL or -m/--model)"),
        ([str(tiny)], "Error: no calibration text (--calib) and no --in-file imatrix to combine"),
    ]
    for args, expect in cases:
        code, text = _run("imatrix", *args, "-o", str(tmp_path / "o.gguf"), "-q")
        assert code == 1, (args, text)
        assert text.strip().splitlines() == [expect]


def test_cli_unsupported_arch_and_missing_tensor(tmp_path):
    gguf = pytest.importorskip("gguf", reason="gguf-py writes the test models")
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    bad = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(bad), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, text = _run("imatrix", str(bad), "--calib", str(calib), "-o", str(tmp_path / "o.gguf"), "-q")
    assert code == 1
    assert text.strip().splitlines() == ["Error: unsupported architecture 'falcon' (supported: llama, mistral, "
                                         "qwen2, qwen3, qwen3moe, gemma2, gemma3, phi3, deepseek2, gpt-oss)"]
    # a llama model without one of its weights
    full = write_model(tmp_path / "full.gguf", "llama", np.random.default_rng(1))
    r = gguf.GGUFReader(str(full))
    part = tmp_path / "part.gguf"
    w = gguf.GGUFWriter(str(part), "llama")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, f.contents(), t, sub_type=f.types[-1])
        else:
            w.add_key_value(k, f.contents(), t)
    for t in r.tensors:
        if t.name != "blk.0.ffn_gate.weight":
            w.add_tensor(t.name, np.array(t.data).reshape([int(x) for x in t.shape][::-1]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, text = _run("imatrix", str(part), "--calib", str(calib), "-o", str(tmp_path / "o.gguf"), "-q")
    assert code == 1
    assert text.strip().splitlines() == ["Error: the model is missing tensor blk.0.ffn_gate.weight"]


def test_written_files_roundtrip(tmp_path):
    sums = np.array([[1.5, 2.5]], dtype=np.float32)
    im = Imatrix({"blk.0.attn_q.weight": ImatrixEntry(sums, np.array([512]))}, ["calib.txt"], 1, 512)
    write_imatrix_gguf(tmp_path / "a.gguf", im)
    back = read_imatrix(tmp_path / "a.gguf")
    np.testing.assert_array_equal(back.entries["blk.0.attn_q.weight"].in_sum2, sums)
    write_imatrix_legacy(tmp_path / "a.dat", im, dataset="calib.txt")
    raw = (tmp_path / "a.dat").read_bytes()
    assert struct.unpack_from("<i", raw, 0)[0] == 1
    assert raw.endswith(struct.pack("<i", 1) + struct.pack("<i", 9) + b"calib.txt")


@pytest.mark.slow
def test_hf_checkpoint_input_equals_converted_gguf(tmp_path):
    """A Hugging Face checkpoint read directly gives the same imatrix as its F32 GGUF conversion."""
    ckpt, calib = TINY_LLAMA, CALIB
    conv = tmp_path / "tiny-f32.gguf"
    code, text = _run("convert", str(ckpt), "--type", "F32", "-o", str(conv))
    assert code == 0, text
    outs = []
    for model in (ckpt, conv):
        out = tmp_path / f"im{len(outs)}.gguf"
        code, text = _run("imatrix", str(model), "--calib", str(calib), "-o", str(out), "--ctx", "128",
                          "--chunks", "3", "-q")
        assert code == 0, text
        outs.append(read_imatrix(out))
    a, b = outs
    assert sorted(a.entries) == sorted(b.entries) and len(a.entries) == 14
    for n in a.entries:
        np.testing.assert_array_equal(a.entries[n].in_sum2, b.entries[n].in_sum2)
        assert a.entries[n].counts.tolist() == b.entries[n].counts.tolist() == [384]


@pytest.mark.slow
def test_cli_obsolete_weight_memory_option_changes_nothing(tmp_path):
    # --max-weight-memory (float32 weights kept in memory) is obsolete: the weights stay in their stored form
    args = [str(TINY_LLAMA), "--calib", str(CALIB),
            "--ctx", "128", "--chunks", "3", "-b", "256", "-q"]
    code, text = _run("imatrix", *args, "-o", str(tmp_path / "a.gguf"))
    assert code == 0, text
    code, text = _run("imatrix", *args, "-o", str(tmp_path / "b.gguf"), "--max-weight-memory", "0.001")
    assert code == 0, text
    assert "note:" not in text
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()

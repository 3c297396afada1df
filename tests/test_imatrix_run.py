"""compute_imatrix_file: the imatrix command as a library call (same file as the CLI, no printing, options checked
before any work)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner

from gguftool.cli import main
from gguftool.errors import ImatrixError
from gguftool.importance.files import read_imatrix
from gguftool.importance.run import compute_imatrix_file

from test_model_forward import write_model

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40)


@pytest.fixture
def tiny(tmp_path):
    return write_model(tmp_path / "tiny.gguf", "llama", np.random.default_rng(5))


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def test_library_call_writes_the_cli_file_and_prints_nothing(tiny, calib, tmp_path, capfd):
    seen = []
    out = tmp_path / "lib.gguf"
    res = compute_imatrix_file(tiny, calib, out, n_ctx=64, n_chunks=3, threads=2, batch=128, save_frequency=2,
                               progress=lambda done, total, ppl: seen.append((done, total, ppl)))
    assert capfd.readouterr() == ("", "")
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)] and all(math.isfinite(s[2]) for s in seen)
    assert res.output_path == str(out) and res.n_chunks == 3 and res.n_ctx == 64 and res.n_tokens > 3 * 64
    assert math.isclose(res.ppl, seen[-1][2])
    assert read_imatrix(str(out) + ".at_2").chunk_count == 2
    cli_out = tmp_path / "cli.gguf"
    r = CliRunner().invoke(main, ["imatrix", str(tiny), "--calib", str(calib), "-o", str(cli_out), "--ctx", "64",
                                  "--chunks", "3", "-t", "2", "-b", "128", "-q"])
    assert r.exit_code == 0, r.output
    assert cli_out.read_bytes() == out.read_bytes()
    assert f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_err:.5f}" in r.output


def test_combine_only(tiny, calib, tmp_path):
    a = tmp_path / "a.gguf"
    compute_imatrix_file(tiny, calib, a, n_ctx=64, n_chunks=2, compute_ppl=False)
    both = compute_imatrix_file(None, None, tmp_path / "b.dat", n_ctx=64, in_files=[a, a], output_format="dat")
    assert both.n_in_files == 2 and both.n_chunks == 0 and math.isnan(both.ppl)
    assert read_imatrix(tmp_path / "b.dat").chunk_count == 4


@pytest.mark.parametrize("kw,message", [
    ({"n_ctx": 2}, "the context size (--ctx) must be at least 3 to compute perplexity over its second half (got 2)"),
    ({"n_ctx": 0, "compute_ppl": False}, "the context size (--ctx) must be at least 1 (got 0)"),
    ({"n_chunks": 0}, "the chunk count (--chunks) must be > 0, or -1 for all (got 0)"),
    ({"n_chunks": -2}, "the chunk count (--chunks) must be > 0, or -1 for all (got -2)"),
    ({"batch": 0}, "the batch size (--batch-size) must be > 0 (got 0)"),
    ({"threads": -1}, "the thread count (--threads) must be >= 1 (got -1)"),
    ({"save_frequency": -1}, "the snapshot interval (--save-frequency) must be >= 0 (got -1)"),
    ({"output_format": "csv"}, "unknown imatrix output format 'csv' (gguf or dat)"),
    ({"max_weight_memory": -1}, "the weight memory (--max-weight-memory) must be >= 0 bytes (got -1)"),
])
def test_options_are_checked_before_any_file_is_read(tmp_path, kw, message):
    with pytest.raises(ImatrixError) as e:
        compute_imatrix_file(tmp_path / "missing.gguf", tmp_path / "missing.txt", tmp_path / "o.gguf", **kw)
    assert str(e.value) == message


@pytest.mark.parametrize("ctx", ["1", "2"])
def test_cli_small_context_is_one_error_line(tiny, calib, tmp_path, ctx):
    r = CliRunner().invoke(main, ["imatrix", str(tiny), "--calib", str(calib), "-o", str(tmp_path / "o.gguf"),
                                  "--ctx", ctx])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [f"Error: the context size (--ctx) must be at least 3 to compute "
                                             f"perplexity over its second half (got {ctx})"]
    assert not (tmp_path / "o.gguf").exists()


def test_cli_small_context_without_perplexity(tiny, calib, tmp_path):
    out = tmp_path / "o.gguf"
    r = CliRunner().invoke(main, ["imatrix", str(tiny), "--calib", str(calib), "-o", str(out), "--ctx", "2",
                                  "--chunks", "4", "--no-ppl", "-q"])
    assert r.exit_code == 0, r.output
    assert read_imatrix(out).entries["blk.0.attn_q.weight"].counts.tolist() == [8]


def test_cli_bad_metadata_names_the_file(tiny, calib, tmp_path):
    bad = tmp_path / "bad.gguf"
    r = CliRunner().invoke(main, ["edit", str(tiny), str(bad), "--set", "llama.attention.head_count=0"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["imatrix", str(bad), "--calib", str(calib), "-o", str(tmp_path / "o.gguf")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [f"Error: {bad}: bad metadata: llama.attention.head_count = 0 "
                                             "(expected 1 .. 64)"]

"""The Python API (gguftool.api, exported by gguftool): the same files as the command line, byte for byte."""
from __future__ import annotations

import subprocess
import sys

import pytest

import gguftool
from conftest import CALIB, ROOT, TINY_GGUF, TINY_LLAMA, run_cli
from gguftool.errors import PolicyError


@pytest.mark.slow
def test_convert_through_the_api_equals_the_cli(tmp_path):
    cli_out, api_out = tmp_path / "cli.gguf", tmp_path / "api.gguf"
    r = run_cli("convert", TINY_LLAMA, "--type", "Q4_K_M", "-o", cli_out)
    assert r.exit_code == 0, r.stderr
    summary = gguftool.convert(TINY_LLAMA, api_out, type="Q4_K_M")
    assert summary.paths == [str(api_out)]
    assert api_out.read_bytes() == cli_out.read_bytes()


@pytest.mark.slow
def test_quantize_file_through_the_api_equals_the_cli(tmp_path):
    cli_out, api_out = tmp_path / "cli.gguf", tmp_path / "api.gguf"
    opts = ["--tensor-type", "attn_v=q8_0", "--override-kv", "general.name=str:x"]
    r = run_cli("quantize", TINY_GGUF, cli_out, "--type", "Q4_0", "--allow-requantize", *opts)
    assert r.exit_code == 0, r.stderr
    options = gguftool.QuantizeOptions(tensor_types=["attn_v=q8_0"], override_kv=["general.name=str:x"])
    gguftool.quantize_file(TINY_GGUF, api_out, type="Q4_0", allow_requantize=True, options=options)
    assert api_out.read_bytes() == cli_out.read_bytes()


@pytest.mark.slow
def test_imatrix_through_the_api_equals_the_cli(tmp_path):
    cli_out, api_out = tmp_path / "cli.gguf", tmp_path / "api.gguf"
    r = run_cli("imatrix", TINY_LLAMA, "-f", CALIB, "-o", cli_out, "-c", "64", "--chunks", "3", "-t", "1", "-q")
    assert r.exit_code == 0, r.stderr
    result = gguftool.imatrix(TINY_LLAMA, CALIB, api_out, n_ctx=64, n_chunks=3, threads=1)
    assert isinstance(result, gguftool.ImatrixResult) and result.n_chunks == 3
    assert f"Final estimate: PPL = {result.ppl:.4f}" in r.stdout
    assert api_out.read_bytes() == cli_out.read_bytes()


def test_plan_before_writing(tmp_path):
    with gguftool.plan_convert(TINY_LLAMA, type="Q4_K_M") as job:
        assert job.output == str(TINY_LLAMA / "tiny-llama-Q4_K_M.gguf")     # the command line's default
        assert job.output_paths() == [job.output]
        assert str(TINY_LLAMA / "model.safetensors") in job.inputs
        assert job.ftype.name == "Q4_K_M" and len(job.plan.tensors) == 21
    with gguftool.plan_quantize(TINY_GGUF, type="Q8_0", dry_run=True) as job:
        assert job.output is None and job.inputs == [str(TINY_GGUF)]
        with pytest.raises(PolicyError, match="no output file given"):
            job.run()
    with pytest.raises(PolicyError, match="cannot be used together"):
        gguftool.plan_quantize(TINY_GGUF, tmp_path / "o.gguf", type="Q8_0",
                               options=gguftool.QuantizeOptions(include_weights=["a"], exclude_weights=["b"]))


def test_edit_and_read(tmp_path):
    out = tmp_path / "e.gguf"
    result = gguftool.edit_file(TINY_GGUF, out, set_items=["general.name=renamed"])
    assert result.set == ["general.name"]
    with gguftool.GGUFReader(out) as r:
        assert r.get("general.name") == "renamed"


def test_public_names_are_declared_and_typed():
    assert set(gguftool.__all__) == set(gguftool._LAZY) | {"__version__"}
    for name in gguftool.__all__:
        assert getattr(gguftool, name) is not None
    assert (ROOT / "gguftool" / "py.typed").is_file()
    # the lazy exports keep the light jobs light: importing the API module does not load numba
    code = "import sys, gguftool; gguftool.convert; gguftool.edit_file; print('numba' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"

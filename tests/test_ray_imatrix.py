"""``gguftool imatrix --ray``: the chunks evaluated by Ray workers give the single-process result, a worker killed
mid-run is survived, and the options fail with one line (Ray missing included).

A local Ray cluster of 2 worker slots is started once for the module (its worker processes are the "machines").
The batches merge in chunk order exactly as the local loop adds them, so the files are compared byte for byte
(counts exact, sums and perplexity bit for bit: the measured max relative difference is 0)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import CALIB, TINY_LLAMA, run_cli
from test_model_forward import write_model

pytest.importorskip("ray", reason="ray is in the test extra (pip install -e .[test]); the --ray tests need it")

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def cluster():
    from gguftool.distributed.cluster import LOCAL, connect
    ray = connect(LOCAL, num_cpus=2)
    yield ray
    ray.shutdown()


def _same_file(a, b):
    assert a.read_bytes() == b.read_bytes(), f"{b.name} differs from the single-process {a.name}"


@pytest.mark.slow
def test_cli_ray_writes_the_single_process_files(cluster, tmp_path):
    """tiny-llama (HF checkpoint) over the essays: GGUF with --in-file, --process-output and snapshots, and the
    legacy .dat, each byte-identical to the run without --ray (which uses 2 threads, the workers 1 each)."""
    common = [TINY_LLAMA, "--calib", CALIB, "-c", "128", "-b", "256", "-q"]
    earlier = tmp_path / "earlier.gguf"
    r = run_cli("imatrix", *common, "--chunks", "2", "-o", earlier)
    assert r.exit_code == 0, r.output
    opts = ["--chunks", "7", "--process-output", "--in-file", earlier, "--save-frequency", "3"]
    local, dist = tmp_path / "local" / "im.gguf", tmp_path / "ray" / "im.gguf"
    local.parent.mkdir()
    dist.parent.mkdir()
    r_local = run_cli("imatrix", *common, *opts, "-t", "2", "-o", local)
    assert r_local.exit_code == 0, r_local.output
    r_ray = run_cli("imatrix", *common, *opts, "-o", dist, "--ray-workers", "2", "--ray")
    assert r_ray.exit_code == 0, r_ray.output
    assert "ray: 2 worker(s)" in r_ray.stdout
    ppl = [line for line in r_local.stdout.splitlines() if line.startswith("Final estimate")]
    assert ppl and ppl[0] in r_ray.stdout
    _same_file(local, dist)
    for n in (3, 6):                                  # the snapshots too
        _same_file(local.parent / f"im.gguf.at_{n}", dist.parent / f"im.gguf.at_{n}")
    assert sorted(p.name for p in dist.parent.iterdir()) == ["im.gguf", "im.gguf.at_3", "im.gguf.at_6"]

    dat_local, dat_ray = tmp_path / "local.dat", tmp_path / "ray.dat"
    dat = ["--chunks", "5", "--output-format", "dat", "--no-ppl"]
    assert run_cli("imatrix", *common, *dat, "-o", dat_local).exit_code == 0
    r = run_cli("imatrix", *common, *dat, "-o", dat_ray, "--ray", "local")
    assert r.exit_code == 0, r.output
    _same_file(dat_local, dat_ray)


@pytest.mark.slow
def test_layer_split_writes_the_single_process_file(cluster, tmp_path):
    """--ray-stages 2: one worker as two actors holding a layer each (the first the embedding, the last the output
    head, collected with --process-output), the residual stream passed between them: the same file."""
    common = [TINY_LLAMA, "--calib", CALIB, "-c", "128", "-b", "256", "--chunks", "6", "--process-output", "-q"]
    local, dist = tmp_path / "local.gguf", tmp_path / "ray.gguf"
    assert run_cli("imatrix", *common, "-o", local).exit_code == 0
    r = run_cli("imatrix", *common, "-o", dist, "--ray-workers", "1", "--ray-stages", "2", "--ray")
    assert r.exit_code == 0, r.output
    assert "ray: 1 worker(s) of 2 stages (0.8 MiB passed between them)" in r.stdout   # 6 x 128 x 256 x 4 B
    _same_file(local, dist)


@pytest.mark.slow
def test_killed_worker_is_survived_moe(cluster, tmp_path):
    """A worker process that dies mid-run (os._exit on its 4th batch) is restarted and the batch evaluated again:
    every sum (MoE experts' per-expert rows included), count and running perplexity equals the local run's."""
    from gguftool.distributed.imatrix import CrashOnce, compute_imatrix_on_cluster
    from gguftool.gguf.source import open_gguf_source
    from gguftool.importance.collect import compute_imatrix
    from gguftool.model.forward import Model
    from gguftool.model.tokenizer import Tokenizer

    path = write_model(tmp_path / "moe.gguf", "llama", np.random.default_rng(6), n_expert=4)
    src = open_gguf_source(str(path))
    try:
        tok = Tokenizer.from_metadata(src)
        local = compute_imatrix(Model.from_source(src, n_threads=1), tok, TEXT, n_ctx=64, batch_tokens=128)
    finally:
        src.close()
    marker = tmp_path / "crashed"
    done = []
    dist = compute_imatrix_on_cluster(str(path), tok, TEXT, workers=2, n_ctx=64, batch_tokens=128,
                                      crash=CrashOnce(3, str(marker)), progress=lambda d, t, p: done.append(d))
    assert marker.exists(), "the fault was not injected"
    assert done == list(range(1, local.n_chunks + 1))          # progress once per chunk, in order
    assert dist.n_workers == 2 and dist.bytes_returned > 0
    a, b = local.imatrix, dist.run.imatrix
    assert sorted(a.entries) == sorted(b.entries)
    assert any(e.n_mat == 4 for e in a.entries.values())       # the expert weights are there
    for name, e in a.entries.items():
        assert np.array_equal(e.counts, b.entries[name].counts), name
        assert np.array_equal(e.in_sum2, b.entries[name].in_sum2), name
    assert dist.run.chunk_ppl == local.chunk_ppl and dist.run.ppl == local.ppl
    assert (b.chunk_count, b.chunk_size) == (a.chunk_count, a.chunk_size)


@pytest.mark.slow
def test_ray_bad_input_one_line_errors(cluster, tmp_path):
    out = tmp_path / "im.gguf"
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    cases = [
        (["--ray-workers", "0", "--ray"], "Error: the worker count (--ray-workers) must be >= 1 (got 0)"),
        (["--ray-workers", "2"], "Error: --ray-workers needs --ray"),
        (["--ray-stages", "2"], "Error: --ray-stages needs --ray"),
        (["--ray-stages", "0", "--ray"], "Error: the stage count (--ray-stages) must be >= 1 (got 0)"),
        (["--ray-stages", "2", "--ray-workers", "2", "--ray"],
         "Error: 2 workers of 1 thread(s) x 2 stages need 4 CPUs; the cluster has 2"),
        (["--ray-workers", "64", "--ray"], "Error: 64 workers of 1 thread(s) need 64 CPUs; the cluster has 2"),
        (["--calib", str(tmp_path / "none.txt"), "--ray"],
         f"Error: {tmp_path / 'none.txt'}: no such calibration file"),
    ]
    for extra, message in cases:
        args = [TINY_LLAMA, "-c", "64", "-o", out, *extra]
        if "--calib" not in extra:
            args[1:1] = ["--calib", calib]
        r = run_cli("imatrix", *args)
        assert r.exit_code == 1, (extra, r.output)
        assert r.output.strip() == message, extra
        assert not out.exists()


def test_without_ray_the_option_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)      # "import ray" fails as when the extra is not installed
    out = tmp_path / "im.gguf"
    r = run_cli("imatrix", TINY_LLAMA, "--calib", CALIB, "-o", out, "--ray")
    assert r.exit_code == 1
    assert r.output.strip() == "Error: --ray needs Ray: pip install 'gguftool[ray]'"
    assert not out.exists()

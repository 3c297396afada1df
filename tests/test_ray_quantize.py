"""convert / quantize --ray: the file a local Ray cluster writes equals the single-process one, byte for byte.

One local cluster (3 worker slots on this machine) serves the whole module. Byte identity is checked on the
synthetic models of scripts/make_synthetic_llama.py (a K mix with an imatrix; MoE experts cut into pieces between
experts, the bytes returned through the object store; a split output), on the tiny-llama checkpoint and on an FP8
checkpoint of scripts/make_fp8_checkpoint.py (two shards). A worker killed from outside in the middle of a run is
survived (Ray retries its task); a task that fails on bad data fails the run with the usual one-line error and
leaves nothing; an interrupt leaves nothing. Without Ray installed the option says how to get it.
"""
from __future__ import annotations

import filecmp
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import make_synthetic_llama as msl
from conftest import ROOT, TINY_LLAMA, run_cli

from gguftool.distributed.pieces import make_tasks
from gguftool.pipeline import io as pio
from gguftool.pipeline.policy import TensorPlan
from gguftool.gguf.constants import GGMLType


# --- the cluster and the models


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (the `test` extra installs it)")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray-models")
    small, moe = str(d / "small.gguf"), str(d / "moe.gguf")
    msl.write_model(small, msl.SMALL)
    msl.write_model(moe, msl.MOE)
    im, im_moe = str(d / "im.gguf"), str(d / "im_moe.gguf")
    msl.write_synthetic_imatrix(small, im)
    msl.write_synthetic_imatrix(moe, im_moe)
    return {"small": small, "moe": moe, "im": im, "im_moe": im_moe}


def _ok(r):
    assert r.exit_code == 0, r.stderr
    return r


def _same(a, b):
    assert os.path.getsize(a) == os.path.getsize(b)
    assert filecmp.cmp(a, b, shallow=False), f"{a} and {b} differ"


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


# --- byte identity


@pytest.mark.slow
def test_quantize_k_mix_with_imatrix_identical(cluster, models, tmp_path):
    local, dist = tmp_path / "local.gguf", tmp_path / "ray.gguf"
    args = ["--type", "Q4_K_M", "--imatrix", models["im"]]
    _ok(run_cli("quantize", models["small"], local, *args))
    before = _sha(models["small"])
    _ok(run_cli("quantize", models["small"], dist, *args, "--ray"))
    _same(local, dist)
    assert _sha(models["small"]) == before
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_quantize_moe_pieces_through_object_store_identical(cluster, models, tmp_path):
    """Expert tensors cut into pieces (one per expert: small tasks), the bytes returned to the driver."""
    import gguftool
    from gguftool.api import plan_quantize
    from gguftool.distributed.execute import ClusterOptions

    opts = gguftool.QuantizeOptions(imatrix=models["im_moe"])
    local, dist = tmp_path / "local.gguf", tmp_path / "ray.gguf"
    gguftool.quantize_file(models["moe"], local, type="Q3_K_M", options=opts)
    with plan_quantize(models["moe"], dist, type="Q3_K_M", options=opts) as job:
        seen = []
        job.run(cluster=ClusterOptions(shared_fs=False, task_bytes=256 << 10),
                progress=lambda n, tp: seen.append(n))
    _same(local, dist)
    assert sum(seen) == job.plan.src_bytes


@pytest.mark.slow
def test_quantize_split_output_identical(cluster, models, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = ["--type", "Q8_0", "--split-max-tensors", "30"]
    _ok(run_cli("quantize", models["small"], tmp_path / "a" / "out.gguf", *args))
    _ok(run_cli("quantize", models["small"], tmp_path / "b" / "out.gguf", *args, "--ray", "local",
                "--ray-no-shared-fs"))
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == [f"out-0000{i}-of-00003.gguf" for i in (1, 2, 3)] == sorted(os.listdir(tmp_path / "b"))
    for n in names:
        _same(tmp_path / "a" / n, tmp_path / "b" / n)


@pytest.mark.slow
def test_convert_tiny_llama_identical(cluster, tmp_path):
    local, dist = tmp_path / "local.gguf", tmp_path / "ray.gguf"
    _ok(run_cli("convert", TINY_LLAMA, "-o", local, "--type", "Q4_K_M"))
    _ok(run_cli("convert", TINY_LLAMA, "-o", dist, "--type", "Q4_K_M", "--ray"))
    _same(local, dist)


@pytest.mark.slow
def test_convert_sharded_fp8_checkpoint_identical(cluster, tmp_path):
    from make_fp8_checkpoint import make

    ck = tmp_path / "fp8"
    make("llama-block", ck)
    assert (ck / "model.safetensors.index.json").is_file()
    local, dist = tmp_path / "local.gguf", tmp_path / "ray.gguf"
    _ok(run_cli("convert", ck, "-o", local, "--type", "Q8_0"))
    _ok(run_cli("convert", ck, "-o", dist, "--type", "Q8_0", "--ray"))
    _same(local, dist)


# --- failures


def _task_pids():
    """The worker processes running a task now: Ray titles them ``ray::run_task`` (/proc/PID/cmdline; psutil is not
    among Ray 2.60's requirements)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if cmd.startswith(b"ray::run_task"):
            out.append(int(d))
    return out


@pytest.mark.slow
def test_killed_worker_is_survived(cluster, models, tmp_path):
    """SIGKILL to a worker process while it runs a task: Ray retries the task, the file is still identical."""
    import gguftool
    from gguftool.distributed.execute import ClusterOptions

    local, dist = tmp_path / "local.gguf", tmp_path / "ray.gguf"
    opts = gguftool.QuantizeOptions(imatrix=models["im"])
    gguftool.quantize_file(models["small"], local, type="Q4_K_M", options=opts)
    killed: list[int] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            for pid in _task_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        gguftool.quantize_file(models["small"], dist, type="Q4_K_M", options=opts,
                               cluster=ClusterOptions(task_bytes=128 << 10))
    finally:
        stop.set()
        t.join()
    assert killed, "no worker was found running a task"
    _same(local, dist)
    assert _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def bad_model(models, tmp_path_factory):
    """The small model with a NaN in blk.3.ffn_down.weight (quantizing it is an error; copying it is not)."""
    from gguftool.gguf.reader import GGUFReader

    path = tmp_path_factory.mktemp("ray-bad") / "nan.gguf"
    data = bytearray(open(models["small"], "rb").read())
    with GGUFReader(models["small"]) as r:
        t = next(t for t in r.tensors if t.name == "blk.3.ffn_down.weight")
        pos = r.data_offset + t.offset + 4 * 1000
    data[pos:pos + 4] = np.array([np.nan], np.float32).tobytes()
    path.write_bytes(bytes(data))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_failing_task_leaves_nothing(cluster, bad_model, tmp_path, shared):
    out = tmp_path / "out.gguf"
    before = _sha(bad_model)
    r = run_cli("quantize", bad_model, out, "--type", "Q4_0", "--ray", "local",
                *([] if shared else ["--ray-no-shared-fs"]))
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and "blk.3.ffn_down.weight" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []        # no output, no part file
    assert _sha(bad_model) == before


@pytest.mark.slow
def test_interrupt_leaves_nothing_and_keeps_an_existing_output(cluster, models, tmp_path):
    import gguftool
    from gguftool.distributed.execute import ClusterOptions

    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")

    def progress(n, tp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gguftool.quantize_file(models["small"], out, type="Q4_0", overwrite=True, progress=progress,
                               cluster=ClusterOptions(task_bytes=256 << 10))
    assert os.listdir(tmp_path) == ["out.gguf"] and out.read_bytes() == b"old"


@pytest.mark.slow
def test_stats_from_pieces_equal_the_single_process_ones(cluster, models, tmp_path):
    """--stats on a cluster: each tensor's RMS errors, added up from its pieces (experts cut between tasks), equal
    the single-process figures; the command line prints them."""
    import gguftool
    from gguftool.distributed.execute import ClusterOptions

    opts = gguftool.QuantizeOptions(imatrix=models["im_moe"])
    local = gguftool.quantize_file(models["moe"], tmp_path / "l.gguf", type="Q3_K_M", options=opts, stats=True)
    dist = gguftool.quantize_file(models["moe"], tmp_path / "r.gguf", type="Q3_K_M", options=opts, stats=True,
                                  cluster=ClusterOptions(task_bytes=256 << 10))
    want = {r.name: (r.rmse, r.weighted_rmse) for r in local.results}
    assert sum(v[0] is not None for v in want.values()) >= 8 and any(v[1] is not None for v in want.values())
    for r in dist.results:
        rmse, weighted = want[r.name]
        assert (r.rmse is None) == (rmse is None) and (r.weighted_rmse is None) == (weighted is None), r.name
        if rmse is not None:
            assert r.rmse == pytest.approx(rmse, rel=1e-12, abs=0), r.name
        if weighted is not None:
            assert r.weighted_rmse == pytest.approx(weighted, rel=1e-12, abs=0), r.name
    r = _ok(run_cli("quantize", models["small"], tmp_path / "o.gguf", "--type", "Q4_0", "--stats", "--ray"))
    assert "stats: " in r.output and "overall rmse" in r.output


def test_no_shared_fs_needs_ray(models, tmp_path):
    r = run_cli("quantize", models["small"], tmp_path / "o.gguf", "--type", "Q4_0", "--ray-no-shared-fs")
    assert r.exit_code == 1 and r.stderr.strip() == "Error: --ray-no-shared-fs is an option of --ray (give --ray too)"


@pytest.mark.parametrize("command", ["quantize", "convert"])
def test_without_ray_the_option_says_how_to_install(tmp_path, command):
    """Ray made unimportable in a fresh interpreter: one line naming the extra, nothing written."""
    out = tmp_path / "o.gguf"
    args = ([str(ROOT / "fixtures" / "tiny.gguf"), str(out), "--type", "Q8_0"] if command == "quantize"
            else [str(TINY_LLAMA), "-o", str(out), "--type", "Q8_0"])
    code = ("import sys; sys.modules['ray'] = None\n"
            "from gguftool.cli import main\n"
            f"main({[command, *args, '--ray']!r})")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == "Error: --ray needs Ray: pip install 'gguftool[ray]'", p.stderr
    assert os.listdir(tmp_path) == []


# --- the cutting into tasks


def _tp(name, shape, src=GGMLType.F32, new=GGMLType.Q8_0):
    return TensorPlan(name, shape, src, new, True)


def test_tasks_cover_every_byte_once_and_cut_between_slabs(monkeypatch):
    monkeypatch.setattr(pio, "SLAB_BYTES", 4 * 64 * 10)       # 10 rows of 64 per slab
    tensors = [_tp("a", (64, 95)), _tp("norm", (64,), new=GGMLType.F32), _tp("e", (64, 25, 3)),
               _tp("b", (64, 7))]
    placed, off = [], 4096
    for tp in tensors:
        placed.append((tp, 0, off))
        off += -(-tp.new_nbytes // 32) * 32
    tasks = make_tasks(placed, target_bytes=4 * 64 * 25)
    pieces = sorted((p for t in tasks for p in t.pieces), key=lambda p: p.offset)
    assert [t.src_bytes for t in tasks] == sorted((t.src_bytes for t in tasks), reverse=True)
    for tp, _, start in placed:
        mine = [p for p in pieces if p.tp is tp]
        assert mine[0].start == 0 and mine[-1].stop == tp.n_elements // 64
        assert all(a.stop == b.start for a, b in zip(mine, mine[1:]))
        assert mine[0].offset == start and sum(p.nbytes for p in mine) == tp.new_nbytes
        assert all(p.offset == start + p.start * tp.new_nbytes // (tp.n_elements // 64) for p in mine)
        # each piece is whole slabs: the slabs of its rows are those of the whole tensor in that range
        whole = list(pio.slabs(tp))
        assert [s for p in mine for s in pio.slabs(tp, p.start, p.stop)] == whole
    assert max(t.src_bytes for t in tasks) <= 4 * 64 * 25

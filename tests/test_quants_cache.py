"""numba's kernel cache: a folder keyed by the quants/ sources, outside the package, shared by processes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gguftool.quants import cache

ROOT = Path(__file__).resolve().parent.parent

# compiles (and caches) the API's small NaN/Inf screen only: quantizing to F32 needs no type kernel
_CHILD = """
import numba, numpy as np
from gguftool.quants import cache, quantize
assert quantize(np.zeros((2, 32), np.float32), "F32").shape == (2, 128)
print(numba.config.CACHE_DIR)
print(cache.cache_dir())
"""


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def test_digest_follows_every_source_file(tmp_path):
    pkg = tmp_path / "quants"
    shutil.copytree(Path(cache.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = cache.sources_digest(pkg)
    assert before == cache.sources_digest()
    helper = pkg / "bits.py"  # a helper the kernels inline, not a kernel module itself
    helper.write_text(helper.read_text() + "\n# changed\n")
    assert cache.sources_digest(pkg) != before


@pytest.mark.slow   # subprocesses: a second or more
def test_cache_folder_outside_the_package_and_shared(tmp_path):
    """Two processes starting at once both compile into the same user cache folder and both succeed."""
    env = _env(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        used, expected = out.split()
        assert used == expected
        assert Path(used).is_relative_to(tmp_path / "xdg" / "gguftool" / "numba")
    folder = Path(outs[0][0].split()[0])
    assert list(folder.rglob("*.nbi")), "no numba index written"
    assert list(folder.rglob("*.nbc")), "no compiled code written"


@pytest.mark.slow   # subprocesses: a second or more
def test_user_setting_wins(tmp_path):
    env = _env(tmp_path)
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True,
                         timeout=600).stdout.split()
    assert out[0] == str(tmp_path / "mine")
    assert not (tmp_path / "xdg" / "gguftool").exists()


@pytest.mark.slow   # subprocesses: a second or more
def test_unusable_cache_root_falls_back_to_numba_default(tmp_path):
    env = _env(tmp_path)
    (tmp_path / "xdg").write_text("a file where the cache root should be")
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True,
                         timeout=600).stdout.split()
    assert len(out) == 1  # numba.config.CACHE_DIR stayed empty (printed as an empty line); the run succeeded

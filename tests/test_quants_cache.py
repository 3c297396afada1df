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


# loads (or compiles) the NaN/Inf screen and Q8_0's parallel row driver, prints whether numba's implementation
# modules were imported (the full context refresh imports them), the cache misses and a digest of the bytes
_LIGHT_CHILD = """
import hashlib, sys
import numpy as np
from gguftool.quants import quantize, registry
from gguftool.quants import _first_nonfinite
from gguftool.gguf.constants import GGMLType
x = np.linspace(-3, 5, 4 * 256, dtype=np.float32).reshape(4, 256)
q = quantize(x, "Q8_0", threads=2)
f = quantize(x, "F32")
mod = registry.kernels(GGMLType.Q8_0)
misses = sum(mod.quantize_rows_screened.stats.cache_misses.values()) + sum(_first_nonfinite.stats.cache_misses.values())
print("numba.np.arraymath" in sys.modules, misses, hashlib.sha256(q.tobytes() + f.tobytes()).hexdigest())
"""


@pytest.mark.slow   # subprocesses and one small compilation
def test_warm_start_skips_the_full_context_refresh(tmp_path):
    """A warm process loads the cached kernels without importing numba's implementation registries, and the
    kernels it loads that way compute the same bytes as the ones the cold process compiled."""
    env = _env(tmp_path)
    cold = subprocess.run([sys.executable, "-c", _LIGHT_CHILD], env=env, capture_output=True, text=True,
                          check=True, timeout=900).stdout.split()
    warm = subprocess.run([sys.executable, "-c", _LIGHT_CHILD], env=env, capture_output=True, text=True,
                          check=True, timeout=900).stdout.split()
    assert cold[0] == "True" and int(cold[1]) == 2      # compiled: numba's compiler refreshed everything
    assert warm[0] == "False" and int(warm[1]) == 0     # loaded from the cache, light refresh only
    assert warm[2] == cold[2]

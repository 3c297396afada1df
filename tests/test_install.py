"""A fresh machine: README's first command, and the console script of a non-editable install from a built wheel.

An editable install (or pytest itself) imports modules that a plain `pip install .` does not, which once hid a
crash of `gguftool --help`; so the wheel is built from the tracked sources, installed into a new virtual
environment and its `gguftool` script run in subprocesses. Offline: no build isolation, no index.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY_LLAMA, run_cli


def _readme_first_command() -> list[list[str]]:
    """README's first command line, as argument lists (the `pip install .` step left out)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    line = text.split("```bash\n", 1)[1].splitlines()[0]
    steps = [shlex.split(part) for part in line.split("&&")]
    assert steps[0][:2] == ["pip", "install"], line
    return steps[1:]


@pytest.mark.slow
def test_readme_first_command_writes_into_the_current_folder(tmp_path, monkeypatch):
    # the checkout's fixture folder, as a clean clone has it (only the tracked files)
    (tmp_path / "fixtures").mkdir()
    shutil.copytree(TINY_LLAMA, tmp_path / "fixtures" / "tiny-llama", ignore=shutil.ignore_patterns("*.gguf"))
    monkeypatch.chdir(tmp_path)
    convert, inspect = _readme_first_command()
    assert convert[0] == "gguftool" and inspect[0] == "gguftool"
    before = sorted(p.name for p in (tmp_path / "fixtures" / "tiny-llama").iterdir())
    for _ in range(2):                      # and again: the command can be repeated
        r = run_cli(*convert[1:])
        assert r.exit_code == 0, r.stderr
    out = tmp_path / inspect[-1]
    assert out.parent == tmp_path and out.is_file()
    r = run_cli(*inspect[1:])
    assert r.exit_code == 0, r.stderr
    assert "llama.block_count" in r.stdout and "Q4_K" in r.stdout and "chat template: present" in r.stdout
    assert sorted(p.name for p in (tmp_path / "fixtures" / "tiny-llama").iterdir()) == before


@pytest.mark.slow
def test_wheel_installs_and_its_console_script_runs(tmp_path):
    pytest.importorskip("wheel", reason="building a wheel without build isolation (offline) needs the wheel "
                                        "package (test extra)")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "gguftool", src / "gguftool", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(dist), str(src)], check=True, env=env, cwd=tmp_path, timeout=600)
    (wheel,) = dist.glob("gguftool-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    str(wheel)], check=True, env=env, cwd=tmp_path, timeout=600)

    def run(*cmd):
        return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=300)

    # the installed copy is the one that runs (not the checkout, not an editable install)
    r = run(python, "-c", "import gguftool; print(gguftool.__file__)")
    assert r.returncode == 0 and Path(r.stdout.strip()).is_relative_to(venv), r.stdout + r.stderr
    r = run(python, "-c", "import importlib.resources as R; print(R.files('gguftool').joinpath('py.typed').is_file())")
    assert r.stdout.strip() == "True", r.stderr
    script = bindir / "gguftool"
    for cmd in ([script, "--help"], [script, "-h"], [script], [python, "-m", "gguftool", "--help"]):
        r = run(*cmd)
        assert r.returncode == 0 and r.stderr == "", (cmd, r.stderr)
        assert r.stdout.startswith("Usage: gguftool ") and "convert" in r.stdout and "imatrix" in r.stdout, cmd

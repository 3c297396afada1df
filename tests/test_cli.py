"""The command line as a whole: one meaning per flag across subcommands, results on stdout, quiet `| head`."""
from __future__ import annotations

import subprocess
import sys

import click
import pytest

from conftest import ROOT, TINY_GGUF, TINY_LLAMA, run_cli
from gguftool.cli import COMMANDS, main


def _commands() -> dict[str, click.Command]:
    ctx = click.Context(main)
    return {name: main.get_command(ctx, name) for name in COMMANDS}


# --- one grammar


def test_every_short_flag_means_one_thing_in_every_subcommand():
    meaning: dict[str, set[str]] = {}
    for name, cmd in _commands().items():
        for p in cmd.params:
            if isinstance(p, click.Option):
                longs = [o for o in p.opts + p.secondary_opts if o.startswith("--")]
                for short in (o for o in p.opts if not o.startswith("--")):
                    meaning.setdefault(short, set()).add(longs[0])
    assert {s: m for s, m in meaning.items() if len(m) > 1} == {}
    # llama.cpp's tools' letters (llama-imatrix, llama-perplexity)
    assert meaning["-t"] == {"--threads"} and meaning["-o"] == {"--output"} and meaning["-f"] == {"--file"}


def test_shared_options_are_declared_alike():
    cmds = _commands()

    def option(cmd, long):
        return next((p for p in cmd.params if isinstance(p, click.Option) and long in p.opts), None)

    threads = [option(cmds[n], "--threads") for n in ("convert", "quantize", "imatrix")]
    assert len({(tuple(p.opts), p.help, repr(p.type), p.default) for p in threads}) == 1
    force = [option(c, "--force") for n, c in cmds.items() if n != "inspect"]
    assert len({(tuple(p.opts), p.help) for p in force}) == 1 and force[0].opts == ["--force"]
    assert all(option(c, "--type") is None or option(c, "--type").opts == ["--type"] for c in cmds.values())
    assert "--outfile" in option(cmds["convert"], "--output").opts


def test_output_as_positional_or_option(tmp_path):
    out = tmp_path / "o.gguf"
    r = run_cli("edit", TINY_GGUF, "-o", out)
    assert r.exit_code == 0 and r.stdout == f"wrote {out}: no metadata changes\n"
    r = run_cli("edit", TINY_GGUF, out, "--output", out, "--force")
    assert r.exit_code == 0, r.stderr
    r = run_cli("edit", TINY_GGUF, out, "-o", tmp_path / "p.gguf")
    assert (r.exit_code, r.stderr) == (1, f"Error: two outputs given: {str(out)!r} and "
                                          f"{str(tmp_path / 'p.gguf')!r}\n")
    r = run_cli("edit", TINY_GGUF)
    assert (r.exit_code, r.stderr) == (1, "Error: missing OUT (or -o/--output)\n")


def test_results_on_stdout_warnings_and_progress_on_stderr(tmp_path):
    out = tmp_path / "q.gguf"
    r = run_cli("quantize", TINY_GGUF, out, "--type", "Q8_0", "--threads", "1", "--allow-requantize")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out}: ") and "wrote" not in r.stderr
    r = run_cli("convert", TINY_LLAMA, "--type", "Q8_0", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert "architecture: LlamaForCausalLM" in r.stdout and "output: " in r.stdout


# --- `gguftool ... | head`: the reader goes away, the command stops quietly

def _pipe_cases(tmp):
    calib = ROOT / "fixtures" / "calibration" / "essays.txt"
    return {
        "group help": ["--help"],
        "inspect": ["inspect", "--full", str(TINY_GGUF)],
        "edit": ["edit", str(TINY_GGUF), str(tmp / "e.gguf")],
        "quantize --dry-run": ["quantize", str(TINY_GGUF), "--type", "Q4_K_M", "--dry-run", "--allow-requantize"],
        "convert --dry-run": ["convert", str(TINY_LLAMA), "--type", "Q4_K_M", "--dry-run"],
        "imatrix": ["imatrix", str(TINY_LLAMA), "-f", str(calib), "-o", str(tmp / "im.gguf"), "-c", "64",
                    "--chunks", "1", "-q", "-t", "1"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_pipe_cases(ROOT)))
def test_closed_stdout_pipe_ends_quietly(case, tmp_path):
    args = _pipe_cases(tmp_path)[case]
    # the read end is closed before the child has started: its first write to stdout meets a broken pipe
    p = subprocess.Popen([sys.executable, "-m", "gguftool", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=tmp_path)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=300)
    assert "Traceback" not in err and "Error" not in err and "Exception" not in err, err
    assert p.returncode in (0, 1), err


def test_head_reads_the_first_lines_and_the_command_stops_quietly():
    # a real shell pipe into head
    p = subprocess.run(f"{sys.executable} -m gguftool inspect --full {TINY_GGUF} | head -n 2", shell=True,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 2 and p.stderr == "", p.stderr


def test_startup_keeps_the_collector_off_until_done_and_restores_it():
    import gc

    from gguftool.cli import startup

    assert gc.isenabled()
    with startup.process(exits=False):
        assert not gc.isenabled()
        startup.done()
        assert gc.isenabled()
        startup.done()               # a second call changes nothing
        assert gc.isenabled()
    assert gc.isenabled()
    with startup.process(exits=False):
        assert not gc.isenabled()
    assert gc.isenabled()            # a command that never ends its start-up: restored all the same
    gc.unfreeze()

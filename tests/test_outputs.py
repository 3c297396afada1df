"""How every output file is created, committed and protected (gguftool.outfile and the commands using it).

- nothing is left behind whatever ends a run: real SIGTERM, SIGHUP, SIGINT and SIGKILL sent to ``python -m
  gguftool quantize`` / ``convert`` while they write, an input truncated underneath (SIGBUS), and the named
  temporary file used where O_TMPFILE is refused;
- inputs are never outputs, even with --force (same path, hard link, symlink, ``dir/../file``), for every
  subcommand; temporary names never touch a user's file; --save-frequency snapshots follow the --force rule;
- split outputs appear all together or not at all;
- every command checks its output before the work.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gguftool import outfile
from gguftool.cli import main
from gguftool.errors import OutputError

ROOT = Path(__file__).resolve().parent.parent
TINY_HF = ROOT / "fixtures" / "tiny-llama"
CALIB = ROOT / "fixtures" / "calibration" / "essays.txt"
sys.path.insert(0, str(ROOT / "scripts"))

import make_synthetic_llama as msl  # noqa: E402


# --- helpers


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def one_error(code, err, pattern):
    import re

    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tree_hash(folder) -> dict:
    return {p.name: sha(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop(outfile.NO_TMPFILE_ENV, None)
    e.update(extra)
    return e


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Inputs large enough that a single-threaded run takes a second or more (the signal is sent within
    milliseconds of the output being opened): a synthetic F32 GGUF (64 MB) and a BF16 Hugging Face checkpoint
    (25 MB) with the tiny fixture's tokenizer."""
    d = tmp_path_factory.mktemp("big")
    gguf = d / "model.gguf"
    msl.write_model(str(gguf), msl.Shape(n_embd=512, n_ff=1536, n_layer=4, n_head=8, n_head_kv=2, n_vocab=4096))
    from make_tiny_model import CONFIG, make_weights, write_safetensors

    hf = d / "hf"
    hf.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(TINY_HF / name, hf / name)
    cfg = dict(CONFIG, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=4)
    import json

    (hf / "config.json").write_text(json.dumps(dict(json.loads((TINY_HF / "config.json").read_text()), **cfg)))
    write_safetensors(hf / "model.safetensors", make_weights(cfg))
    return {"gguf": gguf, "hf": hf}


def _written(pid: int, folder: Path) -> int:
    """How many bytes the process has written to an output file open in ``folder`` (an O_TMPFILE file shows as
    'folder/#N (deleted)'), -1 when it has none open."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return -1
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if os.path.dirname(target) == str(folder) and target.endswith(("(deleted)", ".tmp")):
                return os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            continue
    return -1


def _default_signals() -> None:
    """In the child: SIGINT and SIGHUP back to their defaults. A suite run under nohup or as a background job
    (`cmd &`) passes them on ignored, and gguftool rightly leaves ignored signals ignored; these tests play a user
    pressing Ctrl-C or closing the terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start_and_wait_for_output(args, out_dir: Path, at_least: int = 0, **env_extra) -> subprocess.Popen:
    """Start ``python -m gguftool ARGS`` and return once it has written ``at_least`` bytes of its output."""
    p = subprocess.Popen([sys.executable, "-m", "gguftool", *map(str, args)], env=env(**env_extra),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    deadline = time.monotonic() + 300
    while _written(p.pid, out_dir) < at_least:
        if p.poll() is not None:
            out, err = p.communicate()
            pytest.fail(f"the run ended before it started writing: {p.returncode}\n{err}")
        if time.monotonic() > deadline:
            p.kill()
            pytest.fail("the run did not start writing within 300 s")
        time.sleep(0.005)
    return p


if not sys.platform.startswith("linux"):
    pytestmark = pytest.mark.skip("the signal tests look at /proc")


# --- real signals mid-run: nothing left, inputs unchanged


def _quantize_args(big, out):
    return ["quantize", big["gguf"], out, "--type", "Q4_K_M", "--threads", "1"]


def _convert_args(big, out):
    return ["convert", big["hf"], "-o", out, "--type", "Q4_K_M", "--threads", "1"]


@pytest.mark.slow   # subprocesses: a second or more
@pytest.mark.parametrize("command", ["quantize", "convert"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT", "SIGKILL"])
def test_signal_mid_run_leaves_nothing(big, tmp_path, command, sig):
    inputs = big["gguf"].parent
    before = {**tree_hash(inputs), **{f"hf/{k}": v for k, v in tree_hash(big["hf"]).items()}}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("a user's file")
    args = (_quantize_args if command == "quantize" else _convert_args)(big, out_dir / "o.gguf")
    p = start_and_wait_for_output(args, out_dir)
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    if sig == "SIGKILL":
        assert p.returncode == -signal.SIGKILL
    else:
        assert p.returncode == 1, err
        assert err.strip().splitlines()[-1] == "Error: interrupted", err
        assert "Traceback" not in err
    assert sorted(os.listdir(out_dir)) == ["keep.txt"], err
    assert {**tree_hash(inputs), **{f"hf/{k}": v for k, v in tree_hash(big["hf"]).items()}} == before


@pytest.mark.slow   # subprocesses: a second or more
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_signal_during_imatrix(big, tmp_path, sig):
    # interrupted while computing (the checkpoint is mapped once the weights are loaded): no output, and the
    # snapshots written so far are complete files
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB.read_text())
    p = subprocess.Popen([sys.executable, "-m", "gguftool", "imatrix", big["hf"], "--calib", calib, "-o",
                          out_dir / "im.gguf", "--ctx", "64", "--save-frequency", "1", "-t", "1", "-q"],
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_default_signals)
    deadline = time.monotonic() + 300
    while True:
        try:
            if "model.safetensors" in Path(f"/proc/{p.pid}/maps").read_text():
                break
        except OSError:
            pass
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.005)
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and err.strip().splitlines()[-1] == "Error: interrupted", err
    assert "Traceback" not in err
    from gguftool.importance.files import read_imatrix

    for name in os.listdir(out_dir):
        assert name.startswith("im.gguf.at_"), os.listdir(out_dir)
        assert read_imatrix(out_dir / name).entries


@pytest.mark.slow   # subprocesses: a second or more
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signal_with_named_temp_file_fallback(big, tmp_path, sig):
    # where O_TMPFILE is refused the file has a name while it is written: the signal handlers remove it
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    p = start_and_wait_for_output(_quantize_args(big, out_dir / "o.gguf"), out_dir, **{outfile.NO_TMPFILE_ENV: "1"})
    assert [n for n in os.listdir(out_dir) if n.startswith(".o.gguf.") and n.endswith(".tmp")]
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and err.strip().splitlines()[-1] == "Error: interrupted", err
    assert "Traceback" not in err
    assert os.listdir(out_dir) == [], err


@pytest.mark.slow   # subprocesses: a second or more
def test_input_truncated_underneath(big, tmp_path):
    # the input shrinks while it is read: SIGBUS (memory map) or a read error; either way nothing is left
    src = tmp_path / "in.gguf"
    shutil.copyfile(big["gguf"], src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    p = start_and_wait_for_output(["quantize", src, out_dir / "o.gguf", "--type", "Q4_K_M", "--threads", "1"], out_dir,
                                  at_least=1 << 20)
    os.truncate(src, 4 << 20)
    _, err = p.communicate(timeout=300)
    assert p.returncode in (1, -signal.SIGBUS), err
    if p.returncode == 1:
        assert err.strip().splitlines()[-1].startswith("Error: ") and "Traceback" not in err
    assert os.listdir(out_dir) == []


@pytest.mark.slow   # subprocesses: a second or more
def test_completed_run_leaves_only_the_output(big, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = subprocess.run([sys.executable, "-m", "gguftool", "quantize", big["gguf"], out_dir / "o.gguf", "--type", "Q8_0"],
                       env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert os.listdir(out_dir) == ["o.gguf"]
    assert oct(os.stat(out_dir / "o.gguf").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# --- the O_TMPFILE-refused fallback, in process


def _write_one(path, **kw):
    from gguftool.gguf.constants import GGMLType
    from gguftool.gguf.writer import GGUFWriter

    w = GGUFWriter(path, **kw)
    w.add_tensor_info("t", (32,), GGMLType.F32)
    w.write_header()
    return w


def test_unnamed_file_until_finished(tmp_path):
    w = _write_one(tmp_path / "x.gguf")
    assert os.listdir(tmp_path) == []                     # O_TMPFILE: no name at all while written
    w.write_tensor_data("t", np.zeros(32, np.float32))
    w.finish()
    assert os.listdir(tmp_path) == ["x.gguf"]


@pytest.mark.parametrize("how", ["env", "EOPNOTSUPP", "EISDIR", "EINVAL"])
def test_named_fallback_when_o_tmpfile_is_refused(tmp_path, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv(outfile.NO_TMPFILE_ENV, "1")
    else:
        real_open = os.open

        def refusing_open(path, flags, *a, **kw):
            if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
                raise OSError(getattr(errno, how), os.strerror(getattr(errno, how)))
            return real_open(path, flags, *a, **kw)

        monkeypatch.setattr(os, "open", refusing_open)
    (tmp_path / "x.gguf").write_bytes(b"old")
    w = _write_one(tmp_path / "x.gguf", overwrite=True)
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[0].startswith(".x.gguf.") and names[0].endswith(".tmp")
    w.abort()
    assert os.listdir(tmp_path) == ["x.gguf"] and (tmp_path / "x.gguf").read_bytes() == b"old"
    w = _write_one(tmp_path / "x.gguf", overwrite=True)
    w.write_tensor_data("t", np.ones(32, np.float32))
    w.finish()
    assert os.listdir(tmp_path) == ["x.gguf"] and (tmp_path / "x.gguf").read_bytes()[:4] == b"GGUF"


def test_named_temp_file_never_takes_a_users_name(tmp_path, monkeypatch):
    monkeypatch.setenv(outfile.NO_TMPFILE_ENV, "1")
    names = iter(["aaaaaaaaaaaa", "aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(outfile.secrets, "token_hex", lambda n: next(names))
    user = tmp_path / ".x.gguf.aaaaaaaaaaaa.tmp"
    user.write_bytes(b"mine")
    with outfile.OutputFile(tmp_path / "x.gguf") as f:
        with f.stream() as s:
            s.write(b"new")
        assert (tmp_path / ".x.gguf.bbbbbbbbbbbb.tmp").exists()
        f.commit()
    assert user.read_bytes() == b"mine" and (tmp_path / "x.gguf").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == [user.name, "x.gguf"]


@pytest.mark.parametrize("fallback", [False, True])
def test_commit_without_overwrite_never_replaces_a_file_made_meanwhile(tmp_path, monkeypatch, fallback):
    if fallback:
        monkeypatch.setenv(outfile.NO_TMPFILE_ENV, "1")
    with outfile.OutputFile(tmp_path / "x") as f:
        f.stream().close()
        (tmp_path / "x").write_bytes(b"someone else's")
        with pytest.raises(OutputError, match="already exists"):
            f.commit()
    assert os.listdir(tmp_path) == ["x"] and (tmp_path / "x").read_bytes() == b"someone else's"


@pytest.mark.parametrize("fallback", [False, True])
def test_commit_all_is_all_or_none(tmp_path, monkeypatch, fallback):
    if fallback:
        monkeypatch.setenv(outfile.NO_TMPFILE_ENV, "1")
    (tmp_path / "old").write_bytes(b"old")
    files = [outfile.OutputFile(tmp_path / n, overwrite=(n == "old")) for n in ("a", "old", "c")]
    for i, f in enumerate(files):
        with f.stream() as s:
            s.write(b"part %d" % i)
    (tmp_path / "c").write_bytes(b"made meanwhile")   # the third cannot be linked: none appears
    with pytest.raises(OutputError, match="c: output file already exists"):
        outfile.commit_all(files)
    for f in files:
        f.abort()
    assert sorted(os.listdir(tmp_path)) == ["c", "old"] and (tmp_path / "old").read_bytes() == b"old"
    (tmp_path / "c").unlink()
    files = [outfile.OutputFile(tmp_path / n, overwrite=(n == "old")) for n in ("a", "old", "c")]
    for i, f in enumerate(files):
        with f.stream() as s:
            s.write(b"part %d" % i)
    outfile.commit_all(files)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == {
        "a": b"part 0", "old": b"part 1", "c": b"part 2"}


def test_split_output_all_or_none(tmp_path, monkeypatch):
    # an error while writing the last split: no split appears (the earlier ones are complete but unnamed)
    from gguftool.pipeline import execute as PL

    src = tmp_path / "in.gguf"
    msl.write_model(str(src), msl.Shape(n_layer=2, n_vocab=256))
    real = PL._write_tensor
    calls = []

    def failing(w, tp, *a):
        calls.append(tp.name)
        if len(calls) == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(w, tp, *a)

    monkeypatch.setattr(PL, "_write_tensor", failing)
    before = sorted(os.listdir(tmp_path))
    code, _, err = cli("quantize", src, tmp_path / "out.gguf", "--type", "Q8_0", "--split-max-tensors", "4")
    one_error(code, err, "No space left on device")
    assert sorted(os.listdir(tmp_path)) == before
    monkeypatch.setattr(PL, "_write_tensor", real)
    code, _, err = cli("quantize", src, tmp_path / "out.gguf", "--type", "Q8_0", "--split-max-tensors", "4")
    assert code == 0, err
    assert len(os.listdir(tmp_path)) == len(before) + 6       # 21 tensors in files of 4


# --- inputs are never outputs


def _variants(tmp_path, target: Path) -> list[Path]:
    """Other names of ``target``: a hard link, a symlink, and a path through a folder and '..'."""
    hard, sym = tmp_path / "hard.out", tmp_path / "sym.out"
    for p in (hard, sym):
        if os.path.lexists(p):
            p.unlink()
    os.link(target, hard)
    sym.symlink_to(target)
    sub = target.parent / "sub"
    sub.mkdir(exist_ok=True)
    return [target, hard, sym, sub / ".." / target.name]


def test_check_outputs_says_how_the_output_is_an_input(tmp_path):
    inp = tmp_path / "in.bin"
    inp.write_bytes(b"x")
    hows = []
    for out in _variants(tmp_path, inp):
        with pytest.raises(OutputError) as e:
            outfile.check_outputs([out], [inp], overwrite=True)
        assert str(e.value).startswith(f"{out} is the input file {inp} (")
        hows.append(str(e.value).split("(")[1].split(")")[0])
    assert hows == ["same path", "a hard link to it", "a symlink to it", "same file by another path"]
    with pytest.raises(OutputError, match="output path is not a file name"):
        outfile.check_outputs([f"{tmp_path}/new/"], overwrite=True)
    with pytest.raises(OutputError, match="output path is a directory"):
        outfile.check_outputs([inp.parent / "sub" / "."], overwrite=True)


@pytest.fixture
def small(tmp_path):
    d = tmp_path / "in"
    d.mkdir(exist_ok=True)
    gguf = d / "m.gguf"
    msl.write_model(str(gguf), msl.Shape(n_layer=2, n_vocab=256))
    im = d / "im.gguf"
    msl.write_synthetic_imatrix(str(gguf), str(im))
    tt = d / "types.txt"
    tt.write_text("attn_v=q8_0\n")
    return {"gguf": gguf, "imatrix": im, "types": tt}


def _assert_refused(tmp_path, target: Path, run):
    before = sha(target)
    for out in _variants(tmp_path, target):
        code, _, err = run(out)
        one_error(code, err, r" is the input file .*inputs are never overwritten")
    assert sha(target) == before
    assert not [n for n in os.listdir(target.parent) if n.endswith(".tmp")]


@pytest.mark.parametrize("which", ["gguf", "imatrix", "types"])
def test_quantize_refuses_its_inputs(small, tmp_path, which):
    _assert_refused(tmp_path, small[which], lambda out: cli(
        "quantize", small["gguf"], out, "--type", "Q4_K_M", "--imatrix", small["imatrix"], "--tensor-type-file",
        small["types"], "--force"))


@pytest.fixture
def hf(tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(TINY_HF, d)
    (d / "chat_template.jinja").write_text("{{ messages }}")
    return d


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                                  "chat_template.jinja"])
def test_convert_refuses_the_files_it_reads(hf, tmp_path, name):
    _assert_refused(tmp_path, hf / name, lambda out: cli("convert", hf, "-o", out, "--type", "Q8_0", "--force"))


def test_convert_source_lists_what_it_reads(hf):
    from gguftool.hf.source import open_hf_source

    src = open_hf_source(hf)
    try:
        names = sorted(os.path.basename(p) for p in src.input_files())
    finally:
        src.close()
    assert names == ["chat_template.jinja", "config.json", "model.safetensors", "tokenizer.model",
                     "tokenizer_config.json"]


def test_edit_refuses_its_inputs(small, tmp_path):
    tpl = small["gguf"].parent / "t.jinja"
    tpl.write_text("{{ x }}")
    for target in (small["gguf"], tpl):
        _assert_refused(tmp_path, target, lambda out: cli("edit", small["gguf"], out, "--chat-template-file", tpl,
                                                          "--force"))


@pytest.fixture
def calib(tmp_path):
    p = tmp_path / "in" / "calib.txt"
    p.parent.mkdir(exist_ok=True)
    p.write_text(CALIB.read_text()[:4000])
    return p


@pytest.mark.parametrize("which", ["model", "calib", "in_file"])
def test_imatrix_refuses_its_inputs(hf, calib, small, tmp_path, which):
    target = {"model": hf / "model.safetensors", "calib": calib, "in_file": small["imatrix"]}[which]
    _assert_refused(tmp_path, target, lambda out: cli(
        "imatrix", hf, "--calib", calib, "--in-file", small["imatrix"], "-o", out, "--force", "--ctx", "64", "-q"))


def test_imatrix_combine_refuses_its_inputs(small, tmp_path):
    _assert_refused(tmp_path, small["imatrix"], lambda out: cli(
        "imatrix", "--in-file", small["imatrix"], "-o", out, "--force"))


def test_dat_writer_leaves_a_users_tmp_file_alone(small, tmp_path):
    out = tmp_path / "o.dat"
    user = tmp_path / "o.dat.tmp"
    user.write_bytes(b"mine")
    code, _, err = cli("imatrix", "--in-file", small["imatrix"], "-o", out, "--output-format", "dat")
    assert code == 0, err
    assert user.read_bytes() == b"mine" and out.read_bytes()[:4] != b"GGUF"
    assert sorted(os.listdir(tmp_path)) == sorted(["in", "o.dat", "o.dat.tmp"])


# --- snapshots and checks before the work


def test_snapshots_follow_the_force_rule(hf, calib, tmp_path):
    out = tmp_path / "im.gguf"
    snap = tmp_path / "im.gguf.at_2"
    snap.write_bytes(b"an earlier run")
    other = tmp_path / "im.gguf.at_3"                 # not a multiple of 2: never written
    other.write_bytes(b"unrelated")
    args = ["imatrix", hf, "--calib", calib, "-o", out, "--ctx", "64", "--chunks", "2", "--save-frequency", "2",
            "-q"]
    code, _, err = cli(*args)
    one_error(code, err, rf"{snap}: output file already exists \(use --force")
    assert snap.read_bytes() == b"an earlier run" and not out.exists()
    code, _, err = cli(*args, "--force")
    assert code == 0, err
    assert snap.read_bytes()[:4] == b"GGUF" and out.exists() and other.read_bytes() == b"unrelated"
    # a snapshot name that is an input is refused even with --force
    snap.unlink()
    os.link(calib, snap)
    code, _, err = cli(*args, "--force")
    one_error(code, err, rf"{snap} is the input file {calib}")


@pytest.mark.parametrize("case", ["missing folder", "directory", "exists"])
def test_every_command_checks_its_output_before_the_work(hf, small, calib, tmp_path, case):
    out = {"missing folder": tmp_path / "nope" / "o.gguf", "directory": tmp_path,
           "exists": tmp_path / "exists.gguf"}[case]
    pattern = {"missing folder": "output directory .* does not exist", "directory": "output path is a directory",
               "exists": "already exists"}[case]
    if case == "exists":
        out.write_bytes(b"x")
    commands = [
        ["quantize", small["gguf"], out, "--type", "Q4_K_M"],
        ["convert", hf, "-o", out, "--type", "Q8_0"],
        ["edit", small["gguf"], out],
        ["imatrix", hf, "--calib", calib, "-o", out, "--ctx", "64", "-q"],
        ["imatrix", "--in-file", small["imatrix"], "-o", out],
    ]
    for args in commands:
        t0 = time.monotonic()
        code, _, err = cli(*args)
        if code == 1 and case == "directory" and "Usage:" in err:   # the option's own declaration (dir_okay=False) refused it
            assert "is a directory" in err
        else:
            one_error(code, err, pattern)
        assert time.monotonic() - t0 < 20, args


def test_unwritable_output_folder(small, tmp_path):
    """Refused before the work, by a real attempt to create a file: root's os.access() says yes even where the
    filesystem says no (sysfs), so the check must not rely on permissions bits alone."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    folders = [ro] if os.geteuid() != 0 else []
    if os.path.isdir("/sys/kernel"):
        folders.append(Path("/sys/kernel"))     # read-only for everyone, root included
    assert folders, "no unwritable folder to try on this machine"
    try:
        for folder in folders:
            code, _, err = cli("imatrix", "--in-file", small["imatrix"], "-o", folder / "o.gguf")
            one_error(code, err, "cannot write to the output directory")
    finally:
        ro.chmod(0o755)

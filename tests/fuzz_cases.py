"""Fuzz cases for the command line: hypothesis strategies that damage the tiny fixtures, and the checks every
run must pass whatever the input.

Used by tests/test_fuzz_cli.py (a bounded number of examples, in CI) and scripts/fuzz_cli.py (many more, plus
real signals). A case is a :class:`Case`: which subcommand, which class of damage, a one-line description of
the damage and a function that applies it to a fresh copy of the fixtures (a :class:`Workspace`), and the
command-line arguments. :func:`run_case` runs it in-process with click's CliRunner and :func:`problems` lists
what went wrong:

- ``exit-status``: the exit status is neither 0 nor 1;
- ``traceback``: an exception other than SystemExit escaped, or stderr holds ``Traceback``;
- ``error-lines``: exit status 1 without exactly one stderr line starting with ``Error:``;
- ``warning``: a Python warning (numpy RuntimeWarning ...) reached stderr;
- ``leftover``: a file the run created that is not its completed output (or any file after a failure; an
  output named .gguf that is not a whole GGUF file counts as left over too);
- ``changed-input``: a file that existed before the run (an input, or an output not to be overwritten) changed;
- ``resources``: the run ran out of its memory allowance ("out of memory") or took longer than allowed.

Nothing here writes into fixtures/: every case works on a copy in a temporary folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import struct
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
TINY_LLAMA = FIXTURES / "tiny-llama"
TINY_GGUF = FIXTURES / "tiny.gguf"
IMATRIX_GGUF = FIXTURES / "quantize_reference" / "llama_imatrix" / "tiny.imatrix.gguf"
IMATRIX_DAT = FIXTURES / "quantize_reference" / "llama_imatrix" / "tiny.imatrix.dat"

SUBCOMMANDS = ("convert", "quantize", "inspect", "edit", "imatrix", "perplexity")
MAX_SECONDS = 60.0          # a hang guard: a case that runs longer is stopped and reported as "resources"
                            # (not counting a kernel's first numba compilation, which is let finish)
MEMORY_HEADROOM = 1 << 30   # address space a case may add to the process before MemoryError
MAX_FILE_SIZE = 256 << 20   # no output of the tiny fixtures comes near; a larger write fails with EFBIG


# --- the workspace: a fresh copy of the fixtures per case
# words of tiny.gguf's 32-token vocabulary, so that its tokenizer needs no byte fallback it does not have
CALIB_TEXT = " ".join(["the GGUF of a model is in the file and it was for that on"] * 40)


@dataclass
class Workspace:
    """``root/in``: copies of the inputs (the case may damage them); ``root/out``: where outputs go."""
    root: Path

    @property
    def inp(self) -> Path:
        return self.root / "in"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def ckpt(self) -> Path:
        return self.inp / "tiny-llama"

    @property
    def gguf(self) -> Path:
        return self.inp / "tiny.gguf"

    @property
    def im_model(self) -> Path:
        """The synthetic F32 GGUF the imatrix fixtures were computed on (n_embd 256, n_ff 256, 2 layers)."""
        return self.inp / "im-model.gguf"

    @property
    def im_gguf(self) -> Path:
        return self.inp / "tiny.imatrix.gguf"

    @property
    def im_dat(self) -> Path:
        return self.inp / "tiny.imatrix.dat"

    @property
    def calib(self) -> Path:
        return self.inp / "calib.txt"


def make_workspace(root: Path, im_model: Path) -> Workspace:
    """Copy the fixtures (and ``im_model``, made once by :func:`make_im_model`) into ``root``."""
    ws = Workspace(Path(root))
    ws.inp.mkdir(parents=True)
    ws.out.mkdir()
    shutil.copytree(TINY_LLAMA, ws.ckpt)
    for src, dst in [(TINY_GGUF, ws.gguf), (im_model, ws.im_model), (IMATRIX_GGUF, ws.im_gguf),
                     (IMATRIX_DAT, ws.im_dat)]:
        shutil.copyfile(src, dst)
    ws.calib.write_text(CALIB_TEXT, encoding="utf-8")
    return ws


IM_MODEL_SHAPE = dict(n_embd=256, n_ff=256, n_layer=2, n_head=4, n_head_kv=2, n_vocab=512)


def synthetic_llama():
    """scripts/make_synthetic_llama.py as a module."""
    import sys
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    import make_synthetic_llama
    return make_synthetic_llama


def make_im_model(path: Path) -> Path:
    """Write the model llama-imatrix ran on to make the imatrix fixtures (as tests/test_quantize_cmd.py does)."""
    msl = synthetic_llama()
    if not path.exists():
        msl.write_model(str(path), msl.Shape(**IM_MODEL_SHAPE))
    return path


# --- a case
@dataclass
class Case:
    subcommand: str
    klass: str
    description: str                          # what was damaged, in words (the reproducer's first half)
    mutate: Callable[[Workspace], None]       # applies the damage to the workspace
    argv: Callable[[Workspace], list[str]]    # the command line, without the program name
    output: Callable[[Workspace], "str | None"] = lambda ws: None   # the output path the command may create
    force: bool = False                       # the command may replace an existing output

    def command(self, ws: Workspace) -> str:
        """The command line, with the workspace folder shown as $W."""
        def q(a: str) -> str:
            a = a.replace(str(ws.root), "$W")
            return a if re.fullmatch(r"[\w./$=:+,-]+", a) else "'" + a.replace("'", "'\\''") + "'"
        return "gguftool " + " ".join(q(a) for a in self.argv(ws))

    def __repr__(self) -> str:        # what hypothesis prints for a failing example
        return f"Case({self.subcommand}/{self.klass}: {self.description})"


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str
    exception: "BaseException | None"
    exc_text: str
    seconds: float
    leftovers: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)


# --- running a case and judging the outcome
def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root (symlinks: 'link:' + target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
                continue
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[rel] = h.hexdigest()
    return out


def _inode(path: str) -> "tuple[int, int] | None":
    try:
        st_ = os.stat(path)
    except OSError:
        return None
    return st_.st_dev, st_.st_ino


def complete_gguf(path: Path) -> bool:
    """The file is a whole GGUF file (its header parses and every tensor's data lies inside the file), or a whole
    legacy .dat imatrix (imatrix --output-format dat writes one under whatever name -o gives)."""
    from gguftool.errors import GGUFError
    from gguftool.gguf.reader import GGUFReader
    from gguftool.importance.files import read_imatrix
    try:
        with open(path, "rb") as f:
            is_gguf = f.read(4) == b"GGUF"
        if is_gguf:
            with GGUFReader(path):
                return True
        read_imatrix(path)
        return True
    except (GGUFError, OSError):
        return False


def allowed_outputs(case: Case, ws: Workspace) -> "re.Pattern | None":
    """The files a successful run may create or replace: the output and its split parts / snapshots."""
    out = case.output(ws)
    if out is None:
        return None
    rel = os.path.relpath(os.path.abspath(out), ws.root)
    stem = rel[:-5] if rel.endswith(".gguf") else rel
    return re.compile(re.escape(rel) + r"(\.at_\d+)?|" + re.escape(stem) + r"-\d{5}-of-\d{5}\.gguf")


def _judge(case: Case, ws: Workspace, before: dict[str, str], after: dict[str, str], ok: bool,
           input_inodes: set) -> tuple[list[str], list[str]]:
    pattern = allowed_outputs(case, ws)

    def replaceable(rel: str) -> bool:
        # a pre-existing file the run may replace: the output itself with --force, unless it is an input
        if not (ok and case.force and pattern is not None and pattern.fullmatch(rel)):
            return False
        return not before[rel].startswith("link:") and _inode(str(ws.root / rel)) not in input_inodes
    leftovers = sorted(rel for rel in after if rel not in before
                       and not (ok and pattern is not None and pattern.fullmatch(rel)
                                and (not rel.endswith(".gguf") or complete_gguf(ws.root / rel))))
    changed = sorted(rel for rel in before if after.get(rel) != before[rel] and not replaceable(rel))
    return leftovers, changed


class _Timeout(BaseException):
    """Raised by SIGALRM in a case that runs too long (a BaseException so that no handler swallows it)."""


def _on_alarm(signum, frame):
    # never inside numba's compiler: an interrupted compilation is not cached, so it would time out every time
    f = frame
    while f is not None:
        if f"{os.sep}numba{os.sep}core{os.sep}" in f.f_code.co_filename:
            signal.setitimer(signal.ITIMER_REAL, 5.0)
            return
        f = f.f_back
    raise _Timeout(f"case took more than {MAX_SECONDS:.0f} s")


def _set_limit(which: int, cap: int):
    """Lower the soft limit `which` to cap (not above the hard limit); returns the old limits."""
    old = resource.getrlimit(which)
    if old[1] != resource.RLIM_INFINITY:
        cap = min(cap, old[1])
    resource.setrlimit(which, (cap, old[1]))
    return old


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    import sys
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_case(case: Case, ws: Workspace) -> Outcome:
    """Apply the case's damage, run the command in-process, and record what it did to the workspace."""
    from click.testing import CliRunner
    from gguftool.cli import main

    case.mutate(ws)
    argv = case.argv(ws)                      # may write the files its arguments name
    before = snapshot(ws.root)
    input_inodes = {_inode(str(ws.root / rel)) for rel in before}
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(ws.out)                          # a default output name lands in out/, never in the repository
    old_alarm = signal.signal(signal.SIGALRM, _on_alarm)
    old_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a too-large write fails instead of killing us
    old_as = _set_limit(resource.RLIMIT_AS, _address_space() + MEMORY_HEADROOM)
    old_fsize = _set_limit(resource.RLIMIT_FSIZE, MAX_FILE_SIZE)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")     # every warning shows, not once per process ...
            warnings.showwarning = _show_warning   # ... on the command's stderr, as the user would see it
            signal.setitimer(signal.ITIMER_REAL, MAX_SECONDS)
            try:
                result = runner.invoke(main, argv, catch_exceptions=True)
            except _Timeout as e:       # not an Exception, so CliRunner lets it through
                result = None
                timeout = e
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_fsize)
        resource.setrlimit(resource.RLIMIT_AS, old_as)
        signal.signal(signal.SIGXFSZ, old_xfsz)
        signal.signal(signal.SIGALRM, old_alarm)
        os.chdir(cwd)
    seconds = time.perf_counter() - t0
    if result is None:
        exit_code, stdout, stderr, exc = -1, "", "", timeout
    else:
        exit_code, stdout, stderr, exc = result.exit_code, result.stdout, result.stderr, result.exception
    exc_text = ""
    if exc is not None and not isinstance(exc, SystemExit):
        exc_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    after = snapshot(ws.root)
    leftovers, changed = _judge(case, ws, before, after, exit_code == 0, input_inodes)
    return Outcome(exit_code, stdout, stderr, exc, exc_text, seconds, leftovers, changed)


def problems(o: Outcome) -> list[str]:
    """The failure kinds of an outcome (empty when the run behaved)."""
    kinds = []
    if o.exit_code not in (0, 1) and not isinstance(o.exception, _Timeout):
        kinds.append("exit-status")
    if (o.exception is not None and not isinstance(o.exception, SystemExit)) or "Traceback" in o.stderr:
        kinds.append("traceback" if not isinstance(o.exception, _Timeout) else "resources")
    if o.exit_code == 1 and sum(line.startswith("Error:") for line in o.stderr.splitlines()) != 1 \
            and "traceback" not in kinds:
        kinds.append("error-lines")
    if re.search(r"\w+Warning: ", o.stderr):
        kinds.append("warning")
    if o.leftovers:
        kinds.append("leftover")
    if o.changed:
        kinds.append("changed-input")
    if "out of memory" in o.stderr or "File too large" in o.stderr or isinstance(o.exception, MemoryError) \
            or o.seconds > MAX_SECONDS:
        kinds.append("resources")
    return sorted(set(kinds))


def explain(case: Case, ws: Workspace, o: Outcome) -> str:
    """A reproducer and what happened, for an assertion message or a saved failure."""
    lines = [f"subcommand: {case.subcommand}   class: {case.klass}",
             f"damage:     {case.description}",
             f"command:    {case.command(ws)}      ($W = a copy of fixtures: in/tiny-llama, in/tiny.gguf, "
             f"in/im-model.gguf, in/tiny.imatrix.gguf|.dat, in/calib.txt; out/)",
             f"exit {o.exit_code} in {o.seconds:.2f} s; problems: {', '.join(problems(o)) or 'none'}"]
    if o.leftovers:
        lines.append(f"left behind: {o.leftovers}")
    if o.changed:
        lines.append(f"changed: {o.changed}")
    lines.append("stderr (last 15 lines):\n  " + "\n  ".join(o.stderr.splitlines()[-15:]))
    if o.exc_text:
        lines.append("exception:\n" + o.exc_text[-3000:])
    return "\n".join(lines)


# --- values of the wrong type, for JSON files and GGUF metadata
ODD_NUMBERS = [0, -1, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**32, 2**63, 2**64, 10**30, -(2**31), 0.5, -0.0, 1e-30,
               1e308, -1e308, math.nan, math.inf, -math.inf]
ODD_JSON = st.one_of(
    st.sampled_from(ODD_NUMBERS),
    st.sampled_from(["", "abc", "1", "fast", "\u00e9\U0001F600", "x" * 300, None, True, False, [], [1], ["x"],
                     [None], [[1, 2]], {}, {"a": 1}, {"type": None}]),
    st.integers(-10**6, 10**8),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.sampled_from([0, 1, -1, 0.5, "x", None, 1e30]), max_size=6),
)


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")     # NaN/Infinity as Python's json writes them


def _json_file_damage(draw, path_name: str, base) -> tuple[str, bytes]:
    """Damage that applies to any JSON file: not JSON at all, not UTF-8, not an object, or cut short."""
    text = _dumps(base)
    kind = draw(st.sampled_from(["not-object", "not-utf8", "truncated", "empty", "garbage"]))
    if kind == "not-object":
        v = draw(st.sampled_from([[], [1, 2], "text", 3, None, True, [base]]))
        return f"{path_name} is {json.dumps(v)[:60]}", _dumps(v)
    if kind == "not-utf8":
        pos = draw(st.integers(0, len(text)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\x80\x80", b"\xfe\xff", b"\xed\xa0\x80"]))
        return f"{path_name} with bytes {bad!r} at offset {pos} (not UTF-8)", text[:pos] + bad + text[pos:]
    if kind == "truncated":
        n = draw(st.integers(0, max(0, len(text) - 1)))
        return f"{path_name} cut to {n} of {len(text)} bytes", text[:n]
    if kind == "empty":
        return f"{path_name} empty", b""
    junk = draw(st.binary(min_size=1, max_size=40))
    return f"{path_name} is the bytes {junk!r}", junk


# --- config.json
CONFIG_KEYS = ["architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings",
               "rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act", "tie_word_embeddings", "bos_token_id",
               "eos_token_id", "torch_dtype", "attention_bias", "mlp_bias", "head_dim", "partial_rotary_factor",
               "sliding_window", "num_local_experts", "num_experts_per_tok", "rope_parameters", "pad_token_id",
               "text_config", "layer_types"]
ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                 "Phi3ForCausalLM", "GPT2LMHeadModel", ""]


@st.composite
def rope_scaling(draw):
    kind = draw(st.sampled_from(["llama3", "yarn", "linear", "dynamic", "longrope", "su", "default", "x", 1, None]))
    rs = {draw(st.sampled_from(["rope_type", "type"])): kind}
    for key in draw(st.lists(st.sampled_from(["factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings", "long_factor", "short_factor",
                                              "beta_fast", "beta_slow", "attention_factor", "mscale"]),
                             max_size=5, unique=True)):
        if key in ("long_factor", "short_factor"):
            n = draw(st.sampled_from([0, 1, 31, 32, 33, 64]))
            rs[key] = draw(st.one_of(st.just([1.0] * n), st.just(["x"] * n), ODD_JSON))
        else:
            rs[key] = draw(st.one_of(st.sampled_from([1.0, 4.0, 8.0, 8192, 32]), ODD_JSON))
    return rs


@st.composite
def config_case(draw, subcommand: str, argv, output):
    cfg = json.loads((TINY_LLAMA / "config.json").read_text())
    if draw(st.integers(0, 9)) == 0:
        desc, data = _json_file_damage(draw, "config.json", cfg)
    else:
        edits = []
        for _ in range(draw(st.integers(1, 3))):
            op = draw(st.sampled_from(["set", "set", "delete", "rope_scaling", "architecture"]))
            key = draw(st.sampled_from(CONFIG_KEYS))
            if op == "set":
                cfg[key] = draw(ODD_JSON)
                edits.append(f"{key}={json.dumps(cfg[key])[:80]}")
            elif op == "delete":
                cfg.pop(key, None)
                edits.append(f"delete {key}")
            elif op == "rope_scaling":
                cfg["rope_scaling"] = draw(rope_scaling())
                edits.append(f"rope_scaling={json.dumps(cfg['rope_scaling'])[:160]}")
            else:
                arch = draw(st.sampled_from(ARCHITECTURES))
                cfg["architectures"] = [arch]
                edits.append(f"architectures=[{arch!r}]")
        desc, data = "config.json: " + "; ".join(edits), _dumps(cfg)
    return Case(subcommand, "config", desc, lambda ws: (ws.ckpt / "config.json").write_bytes(data), argv, output)


# --- tokenizer files
@st.composite
def tokenizer_case(draw, subcommand: str, argv, output):
    target = draw(st.sampled_from(["tokenizer_config.json", "tokenizer_config.json", "added_tokens.json",
                                   "special_tokens_map.json", "tokenizer.json", "generation_config.json",
                                   "tokenizer.model"]))
    if target == "tokenizer.model":
        raw = (TINY_LLAMA / "tokenizer.model").read_bytes()
        desc, data = _byte_damage(draw, "tokenizer.model", raw)
    else:
        base_path = TINY_LLAMA / target
        base = json.loads(base_path.read_text()) if base_path.exists() else {}
        if draw(st.integers(0, 3)) == 0:
            desc, data = _json_file_damage(draw, target, base)
        else:
            value = _tokenizer_shape(draw, target, base)
            desc, data = f"{target}: {json.dumps(value)[:200]}", _dumps(value)
    return Case(subcommand, "tokenizer", desc, lambda ws: (ws.ckpt / target).write_bytes(data), argv, output)


def _tokenizer_shape(draw, target: str, base):
    """A JSON value of the right kind (an object) holding entries of the wrong shape."""
    if target == "tokenizer_config.json":
        cfg = dict(base)
        key = draw(st.sampled_from(["added_tokens_decoder", "chat_template", "bos_token", "eos_token",
                                    "add_bos_token", "add_eos_token", "unk_token", "pad_token", "model_max_length",
                                    "tokenizer_class"]))
        if key == "added_tokens_decoder":
            cfg[key] = draw(st.sampled_from([
                {"x": {"content": "<x>"}}, {"5": {}}, {"5": {"content": 5}}, {"5": "<x>"}, {"-1": {"content": "a"}},
                {"999999999": {"content": "<big>", "special": True}}, {"0": {"content": "<s>"}}, [], "x",
                {"1.5": {"content": "a"}}, {"600": {"content": "<far>", "special": "yes"}}]))
        elif key == "chat_template":
            cfg[key] = draw(st.sampled_from([["{{ x }}"], [{"name": "default"}], [{"template": 5}], 5, {},
                                             [{"name": 1, "template": "t"}], "{% if %}", None, ""]))
        else:
            cfg[key] = draw(ODD_JSON)
        return cfg
    if target == "added_tokens.json":
        return draw(st.sampled_from([{"<x>": "5"}, {"<x>": -1}, {"<x>": 10**12}, {"<x>": 5.5}, {"<x>": None},
                                     {"<x>": 512}, {"<x>": 513, "<y>": 513}, {"": 600}, {"<s>": 3}]))
    if target == "special_tokens_map.json":
        return draw(st.sampled_from([{"bos_token": 5}, {"bos_token": {"content": 1}}, {"bos_token": {}},
                                     {"eos_token": ["</s>"]}, {"pad_token": "<not-a-token>"},
                                     {"additional_special_tokens": "x"}, {"additional_special_tokens": [1, None]}]))
    if target == "tokenizer.json":
        return draw(st.sampled_from([{}, {"model": 5}, {"model": {"type": "BPE", "vocab": [], "merges": "x"}},
                                     {"model": {"type": "BPE", "vocab": {"a": "b"}, "merges": [1]}},
                                     {"model": {"type": "Unigram", "vocab": [["a"]]}},
                                     {"added_tokens": [{"id": "x", "content": 1}]},
                                     {"model": {"type": "WordPiece"}}, {"pre_tokenizer": []}]))
    return draw(st.sampled_from([{"bos_token_id": "x"}, {"eos_token_id": [1, "x"]}, {"eos_token_id": 10**9},
                                 {"bos_token_id": -5}, {"eos_token_id": []}]))


def _byte_damage(draw, name: str, raw: bytes, protect: int = 0) -> tuple[str, bytes]:
    """Truncation, bit flips or overwritten bytes (positions >= protect)."""
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "extend"]))
    b = bytearray(raw)
    if kind == "truncate":
        n = draw(st.integers(0, len(raw) - 1))
        return f"{name} cut to {n} of {len(raw)} bytes", bytes(raw[:n])
    if kind == "extend":
        junk = draw(st.binary(min_size=1, max_size=64))
        return f"{name} with {len(junk)} bytes appended", raw + junk
    spots = draw(st.lists(st.integers(protect, len(raw) - 1), min_size=1, max_size=4))
    for p in spots:
        if kind == "flip":
            b[p] ^= 1 << draw(st.integers(0, 7))
        else:
            b[p] = draw(st.integers(0, 255))
    return f"{name} with bytes {kind == 'flip' and 'bit-flipped' or 'overwritten'} at {spots}", bytes(b)


# --- safetensors
def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join_safetensors(header: dict, data: bytes, pad: bool = True) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


@st.composite
def safetensors_case(draw, subcommand: str, argv, output):
    raw = (TINY_LLAMA / "model.safetensors").read_bytes()
    header, data = _split_safetensors(raw)
    names = sorted(k for k in header if k != "__metadata__")
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "offsets", "tensors", "length", "bytes", "metadata"]))
    name = draw(st.sampled_from(names))
    t = header[name]
    if kind == "dtype":
        t["dtype"] = draw(st.sampled_from(["F32", "F16", "I32", "I64", "F64", "I8", "U8", "BOOL", "F8_E4M3",
                                           "I16", "x", 5, None]))
        desc = f"{name}: dtype {t['dtype']!r}"
    elif kind == "shape":
        shape = list(t["shape"])
        op = draw(st.sampled_from(["swap", "drop", "add", "value"]))
        if op == "swap":
            shape = shape[::-1]
        elif op == "drop":
            shape = shape[1:]
        elif op == "add":
            shape = shape + [draw(st.sampled_from([1, 2]))]
        else:
            i = draw(st.integers(0, len(shape) - 1))
            shape[i] = draw(st.sampled_from([0, 1, -1, 2**40, 2**64, "x", None, 1.5, shape[i] * 2, shape[i] // 2]))
        t["shape"] = shape
        desc = f"{name}: shape {shape}"
    elif kind == "offsets":
        a, b = t["data_offsets"]
        other = header[draw(st.sampled_from(names))]["data_offsets"]
        new = draw(st.sampled_from([[other[0], other[0] + (b - a)], [a + 2, b + 2], [b, a], [a, len(data) + 4096],
                                    [len(data), len(data) + (b - a)], [a], [a, b, b], ["0", b], [-b, 0],
                                    [a, 2**64 + a], None, [a - (b - a) // 2, b - (b - a) // 2]]))
        t["data_offsets"] = new
        desc = f"{name}: data_offsets {new} (was [{a}, {b}], data section {len(data)} bytes)"
    elif kind == "tensors":
        op = draw(st.sampled_from(["remove", "rename", "add", "duplicate-data"]))
        if op == "remove":
            del header[name]
            desc = f"tensor {name} removed"
        elif op == "rename":
            new_name = draw(st.sampled_from(["model.layers.9.mlp.up_proj.weight", "x", "", name + ".bias",
                                             "model.layers.-1.self_attn.q_proj.weight", "lm_head.weight"]))
            header[new_name] = header.pop(name)
            desc = f"tensor {name} renamed {new_name!r}"
        elif op == "add":
            header["model.extra.weight"] = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
            desc = "extra tensor model.extra.weight F32 [4, 4] at [0, 64] (overlaps)"
        else:
            header["model.layers.0.extra.weight"] = dict(t)
            desc = f"tensor model.layers.0.extra.weight sharing {name}'s data"
    elif kind == "metadata":
        header["__metadata__"] = draw(st.sampled_from([{"format": "tf"}, {"format": 5}, [], "x", None,
                                                       {"total_size": "x"}]))
        desc = f"__metadata__ = {json.dumps(header['__metadata__'])}"
    if kind == "length":
        h = json.dumps(header, separators=(",", ":")).encode()
        n = draw(st.sampled_from([0, 1, len(h) - 1, len(h) + 1, len(h) + 7, 2**32, 2**63, 2**64 - 1,
                                  len(h) + len(data) + 1]))
        blob = struct.pack("<Q", n) + h + data
        desc = f"safetensors header length field {n} (JSON is {len(h)} bytes)"
    elif kind == "bytes":
        desc, blob = _byte_damage(draw, "model.safetensors", raw)
    else:
        blob = _join_safetensors(header, data)
    return Case(subcommand, "safetensors", desc, lambda ws: (ws.ckpt / "model.safetensors").write_bytes(blob),
                argv, output)


# --- GGUF files: metadata and tensor infos rebuilt with the library's writer, data section kept
def _gguf_parts(path: Path):
    from gguftool.gguf.reader import GGUFReader
    with GGUFReader(path) as r:
        raw = path.read_bytes()
        return list(r.kvs), list(r.tensors), r.alignment, raw[r.data_offset:], raw


def _rebuild(kvs, tensors, alignment: int, data: bytes) -> bytes:
    from gguftool.gguf.writer import build_header
    header, _ = build_header(kvs, tensors, alignment=alignment)
    return header + data


def _odd_kv(draw, key: str):
    """A KV for key of a random value type with an odd value."""
    import numpy as np
    from gguftool.gguf.constants import GGUFValueType as VT
    from gguftool.gguf.values import KV, GGUFArray

    vt = draw(st.sampled_from([VT.UINT32, VT.INT32, VT.UINT64, VT.INT64, VT.FLOAT32, VT.FLOAT64, VT.STRING,
                               VT.BOOL, VT.UINT8, VT.INT8, VT.UINT16, VT.ARRAY]))
    if vt in (VT.UINT32, VT.UINT64, VT.UINT8, VT.UINT16):
        bits = {VT.UINT8: 8, VT.UINT16: 16, VT.UINT32: 32, VT.UINT64: 64}[vt]
        v = draw(st.sampled_from([x for x in (0, 1, 2, 3, 5, 7, 17, 31, 64, 999, 2**bits - 1, 2**(bits - 1))
                                  if x < 2**bits]))
    elif vt in (VT.INT32, VT.INT64, VT.INT8):
        bits = {VT.INT8: 8, VT.INT32: 32, VT.INT64: 64}[vt]
        v = draw(st.sampled_from([0, -1, -(2**(bits - 1)), 2**(bits - 1) - 1, 1, 3]))
    elif vt in (VT.FLOAT32, VT.FLOAT64):
        v = draw(st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 1e-30, 1e30, 0.5, -0.0, 3e38]))
    elif vt == VT.STRING:
        v = draw(st.sampled_from(["", "x", "llama", "gpt2", "\u00e9" * 50, "32"]))
    elif vt == VT.BOOL:
        v = draw(st.booleans())
    else:
        et = draw(st.sampled_from([VT.STRING, VT.FLOAT32, VT.INT32, VT.UINT8]))
        n = draw(st.sampled_from([0, 1, 31, 33, 256]))
        vals = ["t"] * n if et == VT.STRING else np.zeros(n, {VT.FLOAT32: np.float32, VT.INT32: np.int32,
                                                                VT.UINT8: np.uint8}[et])
        return KV(key, vt, GGUFArray(et, vals)), f"{key} = array[{et.name}] of {n}"
    return KV(key, vt, v), f"{key} = {vt.name} {v!r}"


GGUF_MODEL_KEYS = ["llama.block_count", "llama.context_length", "llama.embedding_length",
                   "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                   "llama.rope.freq_base", "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon",
                   "llama.vocab_size", "llama.expert_count", "llama.expert_used_count", "llama.rope.scaling.type",
                   "llama.rope.scaling.factor", "llama.attention.key_length", "llama.attention.value_length",
                   "general.architecture", "general.alignment", "general.file_type", "split.count", "split.no",
                   "split.tensors.count", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                   "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                   "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                   "tokenizer.ggml.add_bos_token", "tokenizer.chat_template", "general.quantization_version"]
IMATRIX_KEYS = ["imatrix.chunk_count", "imatrix.chunk_size", "imatrix.datasets", "general.type"]


def gguf_damage(draw, path: Path, keys: list[str]) -> tuple[str, bytes]:
    """Damaged bytes of the GGUF file at path: a metadata value of the wrong type or range, a removed key, a
    tensor info of another shape / type / offset, or raw byte damage."""
    from gguftool.gguf.constants import GGMLType
    from gguftool.gguf.reader import TensorInfo

    kvs, tensors, alignment, data, raw = _gguf_parts(path)
    kind = draw(st.sampled_from(["kv", "kv", "kv", "remove", "tensor", "bytes"]))
    if kind == "bytes":
        return _byte_damage(draw, path.name, raw)
    if kind in ("kv", "remove"):
        key = draw(st.sampled_from(keys))
        kvs = [kv for kv in kvs if kv.key != key]
        if kind == "remove":
            desc = f"{path.name}: key {key} removed"
        else:
            kv, desc = _odd_kv(draw, key)
            kvs.append(kv)
            desc = f"{path.name}: {desc}"
            if key == "general.alignment" and isinstance(kv.value, int) and 0 < kv.value <= 4096 \
                    and kv.value & (kv.value - 1) == 0:
                alignment = kv.value
        return desc, _rebuild(kvs, tensors, alignment, data)
    i = draw(st.integers(0, len(tensors) - 1))
    t = tensors[i]
    op = draw(st.sampled_from(["shape", "type", "offset", "dims", "duplicate"]))
    shape, ttype, offset, name = tuple(t.shape), t.type, t.offset, t.name
    if op == "shape":
        j = draw(st.integers(0, len(shape) - 1))
        shape = shape[:j] + (draw(st.sampled_from([0, 1, 16, 64, shape[j] * 2, shape[j] // 2, 2**40])),) + shape[j + 1:]
    elif op == "dims":
        shape = draw(st.sampled_from([shape[:1], shape + (1,), shape + (2,), tuple(reversed(shape))]))
    elif op == "type":
        ttype = draw(st.sampled_from([GGMLType.F16, GGMLType.F32, GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.I32,
                                      GGMLType.BF16, GGMLType.Q2_K, GGMLType.I8]))
    elif op == "offset":
        offset = draw(st.sampled_from([0, alignment, len(data), len(data) + alignment, 2**40]))
    else:
        name = tensors[(i + 1) % len(tensors)].name
    desc = f"{path.name}: tensor {t.name} -> name {name}, shape {shape}, type {GGMLType(ttype).name}, offset {offset}"
    tensors[i] = TensorInfo(name, shape, ttype, offset, 0, 0)
    return desc, _rebuild(kvs, tensors, alignment, data)


@st.composite
def gguf_case(draw, subcommand: str, argv, output):
    """Damage tiny.gguf, the model of argv."""
    desc, blob = gguf_damage(draw, TINY_GGUF, GGUF_MODEL_KEYS)
    return Case(subcommand, "gguf-metadata", desc, lambda ws: ws.gguf.write_bytes(blob), argv, output)


# --- imatrix files
@st.composite
def imatrix_case(draw, subcommand: str, argv_for, output):
    """Damage one of the imatrix fixtures; argv_for(ws, path) gives the command that reads it."""
    fmt = draw(st.sampled_from(["gguf", "dat"]))
    if fmt == "gguf":
        desc, blob = gguf_damage(draw, IMATRIX_GGUF, IMATRIX_KEYS)
    else:
        desc, blob = _dat_damage(draw)

    def mutate(ws):
        (ws.im_gguf if fmt == "gguf" else ws.im_dat).write_bytes(blob)
    return Case(subcommand, "imatrix-file", desc, mutate,
                lambda ws: argv_for(ws, str(ws.im_gguf if fmt == "gguf" else ws.im_dat)), output)


def _dat_entries(raw: bytes):
    """The legacy .dat file as [(name, ncall, values bytes)], trailer bytes."""
    n = struct.unpack_from("<i", raw, 0)[0]
    pos, entries = 4, []
    for _ in range(n):
        ln = struct.unpack_from("<i", raw, pos)[0]
        name = raw[pos + 4:pos + 4 + ln]
        ncall, nval = struct.unpack_from("<ii", raw, pos + 4 + ln)
        pos += 12 + ln
        entries.append([name, ncall, nval, raw[pos:pos + 4 * nval]])
        pos += 4 * nval
    return entries, raw[pos:]


def _dat_join(entries, trailer: bytes, n: "int | None" = None) -> bytes:
    out = [struct.pack("<i", len(entries) if n is None else n)]
    for name, ncall, nval, vals in entries:
        out.append(struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, nval) + vals)
    return b"".join(out) + trailer


def _dat_damage(draw) -> tuple[str, bytes]:
    import numpy as np
    raw = IMATRIX_DAT.read_bytes()
    entries, trailer = _dat_entries(raw)
    kind = draw(st.sampled_from(["count", "ncall", "nval", "values", "name", "trailer", "bytes"]))
    if kind == "bytes":
        return _byte_damage(draw, "tiny.imatrix.dat", raw)
    i = draw(st.integers(0, len(entries) - 1))
    e = entries[i]
    if kind == "count":
        n = draw(st.sampled_from([0, -1, len(entries) + 1, 2**31 - 1, len(entries) - 1]))
        return f"tiny.imatrix.dat: entry count {n} (has {len(entries)})", _dat_join(entries, trailer, n)
    if kind == "ncall":
        e[1] = draw(st.sampled_from([0, -1, -(2**31), 2**31 - 1]))
        desc = f"tiny.imatrix.dat: {e[0].decode()} ncall {e[1]}"
    elif kind == "nval":
        e[2] = draw(st.sampled_from([0, -1, e[2] // 2, e[2] * 2, 2**31 - 1]))
        desc = f"tiny.imatrix.dat: {e[0].decode()} nval {e[2]} (values left as they were)"
    elif kind == "values":
        n = draw(st.sampled_from([16, 128, e[2] // 2, e[2] + 32]))
        fill = draw(st.sampled_from([0.0, -1.0, math.nan, math.inf, 1.0]))
        e[2], e[3] = n, np.full(n, fill, np.float32).tobytes()
        desc = f"tiny.imatrix.dat: {e[0].decode()} has {n} values of {fill} (model row length differs)"
    elif kind == "name":
        e[0] = draw(st.sampled_from([b"", b"blk.9.attn_q.weight", b"\xff\xfe", b"token_embd.weight",
                                     entries[(i + 1) % len(entries)][0]]))
        desc = f"tiny.imatrix.dat: entry {i} renamed {e[0]!r}"
    else:
        trailer = draw(st.sampled_from([b"", struct.pack("<i", -1), struct.pack("<ii", 3, 2**31 - 1) + b"x",
                                        struct.pack("<ii", 3, 4) + b"\xff\xfe\xfd\xfc", b"\x01"]))
        desc = f"tiny.imatrix.dat: trailer {trailer!r}"
    return desc, _dat_join(entries, trailer)


# --- odd command-line arguments; an argument is a function of the workspace (it may name a file it writes)
def _file(name: str, content: bytes):
    """An argument naming a file in the workspace's input folder, written with content when the case starts."""
    def arg(ws: Workspace) -> str:
        p = ws.inp / name
        if not p.exists():
            p.write_bytes(content)
        return str(p)
    arg.label = f"<{name}: {content[:40]!r}>"
    return arg


def _missing(ws: Workspace) -> str:
    return str(ws.inp / "missing.file")


_missing.label = "<missing file>"
NOT_UTF8 = b"attn_v=q8_0\n\xff\xfe\x80 blk\xc3\x28=q4_0\n"

SPLIT_ARGS = [["--split-max-size", v] for v in ["x", "0", "1", "1K", "-5M", "1e3", "1M", " 1G ", "99999999999999999999G"]] \
    + [["--split-max-tensors", v] for v in ["0", "1", "-1", "x", "3"]]
POLICY_ARGS = [
    ["--tensor-type", "x"], ["--tensor-type", "attn_q=Q9"], ["--tensor-type", "(=q8_0"], ["--tensor-type", "=q8_0"],
    ["--tensor-type", "attn_v=q4_0"], ["--tensor-type", "attn_v="], ["--tensor-type", "*=f16"],
    ["--tensor-type-file", _file("tt-bad-utf8.txt", NOT_UTF8)], ["--tensor-type-file", _missing],
    ["--tensor-type-file", _file("tt-bad-lines.txt", b"attn_q\n=x\n[=q8_0\n")],
    ["--tensor-type-file", _file("tt-empty.txt", b"")],
    ["--override-kv", "x"], ["--override-kv", "a=int:x"], ["--override-kv", "a=float:nan"],
    ["--override-kv", "a=str:"], ["--override-kv", "general.alignment=int:7"],
    ["--override-kv", "llama.block_count=int:0"], ["--override-kv", "a=bool:maybe"], ["--override-kv", "=int:1"],
    ["--override-kv", "llama.context_length=int:99999999999999999999"], ["--override-kv", "a=weird:1"],
    ["--output-tensor-type", "x"], ["--output-tensor-type", "Q4_K_M"], ["--token-embedding-type", "I32"],
    ["--token-embedding-type", "q4_k"], ["--imatrix", _missing], ["--imatrix", lambda ws: str(ws.calib)],
    ["--imatrix", lambda ws: str(ws.inp)], ["--include-weights", "x"], ["--exclude-weights", "*"],
    ["--include-weights", "a", "--exclude-weights", "b"], ["--pure"], ["--leave-output-tensor"], ["--stats"],
    ["--dry-run"],
]
TYPE_ARGS = [["--type", v] for v in ["Q9_K", "", "q4_k_m ", "IQ2_XXS", "TQ1_0", "Q4_K", "F64", "COPY", "auto", "7",
                                 "-1", "q8_0", "BF16", "Q2_K_S", "Q3_K_L", "q6_k"]]
THREAD_ARGS = [["--threads", v] for v in ["0", "-1", "x", "1", "1000", ""]]

CONVERT_ARGS = SPLIT_ARGS + POLICY_ARGS + TYPE_ARGS + THREAD_ARGS + [
    ["--vocab-only"], ["--name", ""], ["--name", "a\nb"], ["--name", "\u00e9" * 500]]
QUANTIZE_ARGS = SPLIT_ARGS + POLICY_ARGS + TYPE_ARGS + THREAD_ARGS + [["--allow-requantize"], ["--keep-split"]]
INSPECT_ARGS = [["--filter", "["], ["--filter", ""], ["--filter", "*"], ["--json", "--full"], ["--no-tensors"],
                ["--json", "--filter", "blk.*"], ["--full"]]
EDIT_ARGS = [["--set", v] for v in [
    "x", "general.name", "general.alignment=uint32:2147483648", "general.alignment=2147483648",
    "general.alignment=uint32:0", "general.alignment=3", "general.alignment=64", "llama.block_count=abc",
    "llama.block_count=-1", "llama.block_count=4294967296", "new.key=float:nan", "new.key=bool:2",
    "new.key=weird:1", "new.key=int:99999999999999999999", "tokenizer.ggml.tokens=x", "=x", "new.key=str:",
    "llama.rope.freq_base=fast", "general.architecture=str:gpt2", "new.key"]] + [
    ["--remove", v] for v in ["general.architecture", "nope", "tokenizer.ggml.tokens", "", "general.alignment"]] + [
    ["--chat-template-file", _file("tmpl-bad-utf8.jinja", b"{{ x }}\xff\xfe")], ["--chat-template-file", _missing],
    ["--chat-template-file", lambda ws: str(ws.inp)], ["--chat-template-file", _file("tmpl-empty.jinja", b"")]]
IMATRIX_ARGS = [[flag, v] for flag, vs in [
    ("--ctx", ["1", "2", "3", "0", "-5", "100000", "x"]), ("--chunks", ["0", "-2", "1", "100000"]),
    ("-t", ["0", "-3", "1000"]), ("-b", ["1", "0", "3", "-1"]), ("--save-frequency", ["1", "-1", "0"]),
    ("--output-format", ["dat", "x"]), ("--max-weight-memory", ["0", "1e-9", "-1", "nan"])] for v in vs] + [
    ["--process-output"], ["--no-ppl"], ["-f", _missing], ["-f", _file("calib-bad-utf8.txt", b"the fox \xff\xfe\x80 the")],
    ["-f", _file("calib-empty.txt", b"")], ["-f", _file("calib-one-word.txt", b"the")],
    ["-f", lambda ws: str(ws.gguf)], ["--in-file", lambda ws: str(ws.calib)], ["--in-file", _missing],
    ["-m", lambda ws: str(ws.ckpt)], ["-m", _missing]]
PERPLEXITY_ARGS = [[flag, v] for flag, vs in [
    ("--ctx", ["1", "2", "3", "0", "-5", "100000", "x"]), ("--chunks", ["0", "-2", "1", "100000"]),
    ("-t", ["0", "-3", "1000"]), ("-b", ["1", "0", "3", "-1"])] for v in vs] + [
    ["--json"], ["--kl-divergence"], ["--kl-divergence", "--kl-divergence-base", _missing],
    ["--kl-divergence", "--kl-divergence-base", lambda ws: str(ws.calib)],
    ["--kl-divergence", "--kl-divergence-base", lambda ws: str(ws.gguf)],
    ["--kl-divergence-base", lambda ws: str(ws.out / "base.kld")],
    ["-f", _missing], ["-f", _file("calib-bad-utf8.txt", b"the fox \xff\xfe\x80 the")],
    ["-f", _file("calib-empty.txt", b"")], ["-f", _file("calib-one-word.txt", b"the")], ["-f", lambda ws: str(ws.gguf)]]


def _label(a) -> str:
    text = a if isinstance(a, str) else getattr(a, "label", "<path>")
    return text if len(text) <= 40 else text[:37] + "..."


def _resolve(args, ws: Workspace) -> list[str]:
    return [a if isinstance(a, str) else a(ws) for a in args]


# --- the base command of each subcommand, and its output path
def _out(name: str):
    return lambda ws: str(ws.out / name)


def base_argv(subcommand: str, model: str, type_name: str = "Q8_0"):
    """(argv(ws), output(ws)) of a run of subcommand that should succeed on the undamaged fixtures.

    model: "ckpt" (tiny-llama checkpoint), "gguf" (tiny.gguf) or "im_model" (tiny-llama as GGUF)."""
    def model_path(ws):
        return str({"ckpt": ws.ckpt, "gguf": ws.gguf, "im_model": ws.im_model}[model])
    if subcommand == "convert":
        return (lambda ws: ["convert", model_path(ws), "--type", type_name, "-o", str(ws.out / "m.gguf"),
                            "--threads", "1"], _out("m.gguf"))
    if subcommand == "quantize":
        return (lambda ws: ["quantize", model_path(ws), str(ws.out / "q.gguf"), "--type", type_name, "--threads", "1"],
                _out("q.gguf"))
    if subcommand == "inspect":
        return (lambda ws: ["inspect", model_path(ws)], lambda ws: None)
    if subcommand == "edit":
        return (lambda ws: ["edit", model_path(ws), str(ws.out / "e.gguf"), "--set", "general.name=fuzz"],
                _out("e.gguf"))
    if subcommand == "imatrix":
        return (lambda ws: ["imatrix", model_path(ws), "-f", str(ws.calib), "-o", str(ws.out / "im.gguf"),
                            "--ctx", "16", "--chunks", "2", "-t", "1", "-q"], _out("im.gguf"))
    if subcommand == "perplexity":   # writes nothing unless --kl-divergence-base names a file to write
        return (lambda ws: ["perplexity", model_path(ws), "-f", str(ws.calib), "--ctx", "16", "--chunks", "2",
                            "-t", "1", "-q"], _out("base.kld"))
    raise ValueError(subcommand)


ARGS_POOL = {"convert": CONVERT_ARGS, "quantize": QUANTIZE_ARGS, "inspect": INSPECT_ARGS, "edit": EDIT_ARGS,
             "imatrix": IMATRIX_ARGS, "perplexity": PERPLEXITY_ARGS}
ARGS_MODEL = {"convert": "ckpt", "quantize": "im_model", "inspect": "gguf", "edit": "gguf", "imatrix": "im_model",
              "perplexity": "im_model"}


@st.composite
def args_case(draw, subcommand: str):
    argv, output = base_argv(subcommand, ARGS_MODEL[subcommand],
                             draw(st.sampled_from(["Q8_0", "F16", "Q4_K_M"])))
    extra = draw(st.lists(st.sampled_from(ARGS_POOL[subcommand]), min_size=1, max_size=3))
    flat = [a for group in extra for a in group]
    desc = "arguments " + " ".join(repr(_label(a)) for a in flat)
    split = any(a in ("--split-max-size", "--split-max-tensors", "--keep-split") for a in flat)
    return Case(subcommand, "args", desc, lambda ws: None, lambda ws: argv(ws) + _resolve(flat, ws),
                output, force=split)


# --- output paths that are inputs, links to inputs, directories, missing folders, existing files
def _input_files(subcommand: str, ws: Workspace) -> list[Path]:
    return {"convert": [ws.ckpt / n for n in ("config.json", "tokenizer.model", "model.safetensors",
                                              "tokenizer_config.json")],
            "quantize": [ws.im_model, ws.im_gguf, ws.inp / "tt.txt"],
            "edit": [ws.gguf, ws.inp / "t.jinja"],
            "imatrix": [ws.im_model, ws.calib, ws.im_gguf]}[subcommand]


def _with_output(subcommand: str, argv: list[str], out: str, ws: Workspace) -> list[str]:
    """The base command with its output path replaced by out, plus the options that read the extra inputs."""
    if subcommand == "convert":
        argv[argv.index("-o") + 1] = out
    elif subcommand == "quantize":
        argv[2] = out
        argv += ["--imatrix", str(ws.im_gguf), "--tensor-type-file", str(ws.inp / "tt.txt")]
    elif subcommand == "edit":
        argv[2] = out
        argv += ["--chat-template-file", str(ws.inp / "t.jinja")]
    else:
        argv[argv.index("-o") + 1] = out
        argv += ["--in-file", str(ws.im_gguf)]
    return argv


@st.composite
def paths_case(draw, subcommand: str):
    model = {"convert": "ckpt", "quantize": "im_model", "edit": "gguf", "imatrix": "im_model"}[subcommand]
    argv, _ = base_argv(subcommand, model)
    kind = draw(st.sampled_from(["input", "symlink", "hardlink", "dotdot", "directory", "missing-dir", "existing",
                                 "existing-force", "snapshot-exists"]
                                if subcommand == "imatrix" else
                                ["input", "symlink", "hardlink", "dotdot", "directory", "missing-dir", "existing",
                                 "existing-force"]))
    which = draw(st.integers(0, 3))
    force = kind not in ("existing", "snapshot-exists")

    def target(ws):
        files = _input_files(subcommand, ws)
        return files[which % len(files)]

    def out_path(ws) -> str:
        t = target(ws)
        return {"input": str(t), "symlink": str(ws.out / "link.gguf"), "hardlink": str(ws.out / "hard.gguf"),
                "dotdot": str(ws.out / ".." / t.relative_to(ws.root)), "directory": str(ws.out),
                "missing-dir": str(ws.out / "no" / "such" / "o.gguf")}.get(kind, str(ws.out / "o.gguf"))

    def mutate(ws):
        (ws.inp / "tt.txt").write_text("attn_v=q8_0\n", encoding="utf-8")
        (ws.inp / "t.jinja").write_text("{{ messages }}", encoding="utf-8")
        if kind == "symlink":
            os.symlink(target(ws), ws.out / "link.gguf")
        elif kind == "hardlink":
            os.link(target(ws), ws.out / "hard.gguf")
        elif kind in ("existing", "existing-force", "snapshot-exists"):
            (ws.out / "o.gguf").write_bytes(b"a file of the user's")
            if kind == "snapshot-exists":
                (ws.out / "o.gguf.at_1").write_bytes(b"another file of the user's")
                os.remove(ws.out / "o.gguf")

    def full_argv(ws):
        a = _with_output(subcommand, argv(ws), out_path(ws), ws)
        if kind == "snapshot-exists":
            a += ["--save-frequency", "1"]
        return a + (["--force"] if force else [])

    def output(ws):
        # what a successful run may create: the named output, unless it is (a link to) an input
        return None if kind in ("input", "symlink", "hardlink", "dotdot") else out_path(ws)
    desc = f"output path: {kind}" + (f" of input #{which}" if kind in ("input", "symlink", "hardlink", "dotdot")
                                     else "") + (" with --force" if force else "")
    return Case(subcommand, "paths", desc, mutate, full_argv, output, force=kind == "existing-force")


# --- the registry: (subcommand, class) -> strategy of cases
def _quantize_with_imatrix(ws: Workspace, path: str) -> list[str]:
    return ["quantize", str(ws.im_model), str(ws.out / "q.gguf"), "--type", "Q4_K_M", "--threads", "1",
            "--imatrix", path]


def _imatrix_with_in_file(ws: Workspace, path: str) -> list[str]:
    return ["imatrix", str(ws.im_model), "-f", str(ws.calib), "-o", str(ws.out / "im.gguf"), "--ctx", "16",
            "--chunks", "2", "-t", "1", "-q", "--in-file", path]


def _edit_imatrix(ws: Workspace, path: str) -> list[str]:
    return ["edit", path, str(ws.out / "e.gguf"), "--set", "imatrix.chunk_count=3"]


def _gguf_for(subcommand: str):
    argv, out = base_argv(subcommand, "gguf")
    return gguf_case(subcommand, argv, out)


def _hf_for(subcommand: str, maker):
    argv, out = base_argv(subcommand, "ckpt")
    return maker(subcommand, argv, out)


STRATEGIES = {
    ("convert", "config"): _hf_for("convert", config_case),
    ("convert", "tokenizer"): _hf_for("convert", tokenizer_case),
    ("convert", "safetensors"): _hf_for("convert", safetensors_case),
    ("convert", "args"): args_case("convert"),
    ("convert", "paths"): paths_case("convert"),
    ("quantize", "gguf-metadata"): _gguf_for("quantize"),
    ("quantize", "imatrix-file"): imatrix_case("quantize", _quantize_with_imatrix, _out("q.gguf")),
    ("quantize", "args"): args_case("quantize"),
    ("quantize", "paths"): paths_case("quantize"),
    ("inspect", "gguf-metadata"): _gguf_for("inspect"),
    ("inspect", "imatrix-file"): imatrix_case("inspect", lambda ws, p: ["inspect", p], lambda ws: None),
    ("inspect", "args"): args_case("inspect"),
    ("edit", "gguf-metadata"): _gguf_for("edit"),
    ("edit", "imatrix-file"): imatrix_case("edit", _edit_imatrix, _out("e.gguf")),
    ("edit", "args"): args_case("edit"),
    ("edit", "paths"): paths_case("edit"),
    ("imatrix", "gguf-metadata"): _gguf_for("imatrix"),
    ("imatrix", "config"): _hf_for("imatrix", config_case),
    ("imatrix", "tokenizer"): _hf_for("imatrix", tokenizer_case),
    ("imatrix", "safetensors"): _hf_for("imatrix", safetensors_case),
    ("imatrix", "imatrix-file"): imatrix_case("imatrix", _imatrix_with_in_file, _out("im.gguf")),
    ("imatrix", "args"): args_case("imatrix"),
    ("imatrix", "paths"): paths_case("imatrix"),
    ("perplexity", "gguf-metadata"): _gguf_for("perplexity"),
    ("perplexity", "config"): _hf_for("perplexity", config_case),
    ("perplexity", "tokenizer"): _hf_for("perplexity", tokenizer_case),
    ("perplexity", "safetensors"): _hf_for("perplexity", safetensors_case),
    ("perplexity", "args"): args_case("perplexity"),
}

#!/usr/bin/env python
"""Fuzz the command line at length: many damaged-input cases per subcommand and class, and real signals.

    python scripts/fuzz_cli.py --cases 5000 --signal-cases 100 --seed 1

Two parts, one table:

- **Damaged inputs and odd arguments**: the classes of tests/fuzz_cases.py (the strategies tests/test_fuzz_cli.py
  runs a bounded number of in CI), ``--cases`` spread evenly over every (subcommand, class). Each
  (subcommand, class) runs in a worker process of its own (``--worker``), in-process through click's CliRunner,
  so a hard crash (segfault, SIGBUS) is counted as ``crash`` instead of ending the run.
- **Signals**: ``python -m gguftool convert|quantize|imatrix`` on a model big enough to take a few seconds
  (made once with scripts/make_tiny_model.py and scripts/make_synthetic_llama.py), sent SIGINT, SIGTERM, SIGHUP or
  SIGKILL at a random moment, or with its input file truncated underneath it (class ``truncate``).

A case fails when it exits with a status other than 0 or 1 (a signal's own death, -N, is accepted for the
signal that was sent, and SIGBUS for a truncated input), prints a traceback, leaves a file that is not its
completed output (temp files included), changes a file it did not own, or, exiting 1, does not print exactly
one ``Error:`` line (or lets a warning through, or runs out of its memory/time allowance: column "other").

Prints per (subcommand, class): cases tried, tracebacks, leftover files, changed inputs, bad exit statuses and
other failures; saves one reproducer per failure kind (subcommand, class, problem and, for a traceback, where it
was raised) under ``--failures``; exits 1 if any case failed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

COLUMNS = ["tracebacks", "leftovers", "changed", "bad exits", "other"]
COLUMN_OF = {"traceback": "tracebacks", "leftover": "leftovers", "changed-input": "changed",
             "exit-status": "bad exits"}     # error-lines, warning, resources, crash -> "other"


# --- the damaged-input part: one worker process per (subcommand, class)
def _signature(outcome) -> str:
    """Where a traceback came from: exception type and the innermost gguftool frame."""
    exc = outcome.exception
    if exc is None or isinstance(exc, SystemExit):
        return ""
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if "gguftool" in frame.filename:
            where = f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}"
    return f"{type(exc).__name__}@{where}"


def _save_reproducer(folder: Path, case, text: str, make_ws) -> None:
    """The damaged inputs (the case applied again to fresh copies) and the explanation."""
    if folder.exists():
        return
    ws = make_ws(folder / "W")
    case.mutate(ws)
    command = case.command(ws)
    (folder / "README.txt").write_text(
        text + f"\n\nreproduce: cd {folder / 'W' / 'out'} && W={folder / 'W'} {command}\n", encoding="utf-8")


def worker(subcommand: str, klass: str, n: int, seed: int, results: Path, failures: Path) -> None:
    """Run n cases of one class; one JSON line per case in results (the current case first, as a marker)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    import fuzz_cases as F

    base = Path(tempfile.mkdtemp(prefix="gguftool-fuzz-"))
    im_model = F.make_im_model(base / "im-model.gguf")
    out = open(results, "a", encoding="utf-8")

    def make_ws(root: Path):
        return F.make_workspace(root, im_model)

    @settings(max_examples=n, database=None, derandomize=False, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @hseed(seed)
    @given(case=F.STRATEGIES[(subcommand, klass)])
    def run(case):
        out.write(json.dumps({"start": case.description}) + "\n")
        out.flush()
        with tempfile.TemporaryDirectory(dir=base) as d:
            ws = make_ws(Path(d))
            try:
                o = F.run_case(case, ws)
            except Exception:      # the harness itself failed: report it, keep going
                out.write(json.dumps({"harness": traceback.format_exc(), "case": case.description}) + "\n")
                return
            kinds = F.problems(o)
            keys = []
            for k in kinds:
                key = f"{subcommand}.{klass}.{k}" + (f".{_signature(o)}" if k == "traceback" else "")
                keys.append(key)
                _save_reproducer(failures / _safe(key), case, F.explain(case, ws, o), make_ws)
            out.write(json.dumps({"case": case.description, "exit": o.exit_code, "seconds": round(o.seconds, 3),
                                  "problems": kinds, "keys": keys}) + "\n")
            out.flush()
    try:
        run()
    finally:
        out.close()
        shutil.rmtree(base, ignore_errors=True)


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "._-@" else "_" for c in key)[:150]


def run_worker_batch(subcommand, klass, n, seed, failures: Path, stats) -> None:
    with tempfile.NamedTemporaryFile(prefix="fuzz-results-", suffix=".jsonl", delete=False) as tf:
        results = Path(tf.name)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", subcommand, klass, str(n), str(seed),
           str(results), str(failures)]
    env = _child_env()
    try:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=120 + 60 * n)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = "timeout", (e.stderr or b"").decode("utf-8", "replace") if isinstance(e.stderr, bytes) else ""
    row = stats[(subcommand, klass)]
    last_start = None
    for line in results.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "start" in rec:
            last_start = rec["start"]
        elif "harness" in rec:
            print(f"harness error in {subcommand}/{klass} on {rec['case']}:\n{rec['harness']}", file=sys.stderr)
            last_start = None
        else:
            last_start = None
            row["cases"] += 1
            for k, key in zip(rec["problems"], rec["keys"]):
                row[COLUMN_OF.get(k, "other")] += 1
                row["kinds"].add(key)
            if rec["problems"]:
                row["failed"] += 1
    results.unlink()
    if rc != 0 or last_start is not None:
        # the worker died (or hypothesis failed): count the case it was running as a crash
        row["cases"] += 1
        row["other"] += 1
        row["failed"] += 1
        key = f"{subcommand}.{klass}.crash"
        row["kinds"].add(key)
        folder = failures / _safe(key)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "README.txt").write_text(f"worker exit {rc} while running: {last_start}\n\n{err[-5000:]}\n",
                                           encoding="utf-8")


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = "1"          # a shared machine: one core per case
    return env


# --- the signal part
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP, "SIGKILL": signal.SIGKILL}
SIGNAL_CLASSES = list(SIGNALS) + ["truncate"]
SIGNAL_SUBCOMMANDS = ("convert", "quantize", "imatrix")


def make_signal_inputs(d: Path) -> dict:
    """A BF16 checkpoint (~25 MB) and an F32 GGUF (~50 MB) that take a few seconds each to process."""
    import fuzz_cases as F
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_tiny_model as mtm

    ckpt = d / "big-llama"
    if not (ckpt / "model.safetensors").exists():
        ckpt.mkdir(parents=True, exist_ok=True)
        cfg = json.loads((F.TINY_LLAMA / "config.json").read_text())
        cfg.update(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4)
        for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
            shutil.copyfile(F.TINY_LLAMA / name, ckpt / name)
        (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
        mtm.write_safetensors(ckpt / "model.safetensors.part", mtm.make_weights(cfg, seed=3), "BF16")
        os.replace(ckpt / "model.safetensors.part", ckpt / "model.safetensors")
    gguf = d / "big.gguf"
    if not gguf.exists():
        msl = F.synthetic_llama()
        msl.write_model(str(gguf), msl.Shape(n_embd=512, n_ff=1536, n_layer=4, n_head=8, n_head_kv=2,
                                             n_vocab=1024))
    calib = d / "calib.txt"
    calib.write_text(F.CALIB_TEXT * 4, encoding="utf-8")
    return {"ckpt": ckpt, "gguf": gguf, "calib": calib}


def signal_argv(subcommand: str, model: Path, calib: Path, out: Path) -> list[str]:
    if subcommand == "convert":
        return ["convert", str(model), "--type", "Q4_K_M", "-o", str(out / "o.gguf"), "--threads", "1"]
    if subcommand == "quantize":
        return ["quantize", str(model), str(out / "o.gguf"), "--type", "Q4_K_M", "--threads", "1"]
    return ["imatrix", str(model), "-f", str(calib), "-o", str(out / "o.gguf"), "--ctx", "64", "--chunks", "12",
            "-t", "1", "-q"]


def _hash_tree(paths) -> dict:
    import fuzz_cases as F
    out = {}
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.update({str(p / k): v for k, v in F.snapshot(p).items()})
        else:
            out.update({str(p.parent / k): v for k, v in F.snapshot(p.parent).items() if k == p.name})
    return out


def run_signal_case(subcommand: str, klass: str, inputs: dict, base: Path, rng: random.Random,
                    duration: float) -> tuple[list[str], str]:
    """One run killed or starved; returns (problems, explanation)."""
    import fuzz_cases as F
    case_dir = Path(tempfile.mkdtemp(dir=base, prefix=f"{subcommand}-{klass}-"))
    out = case_dir / "out"
    out.mkdir()
    model = inputs["ckpt"] if subcommand == "convert" else inputs["gguf"]
    truncated = None
    if klass == "truncate":
        # a private copy of the input, cut while the command reads it
        if subcommand == "convert":
            model = case_dir / "ckpt"
            shutil.copytree(inputs["ckpt"], model)
            truncated = model / "model.safetensors"
        else:
            model = case_dir / "model.gguf"
            shutil.copyfile(inputs["gguf"], model)
            truncated = model
    watched = [model, inputs["calib"]] if klass != "truncate" else [inputs["calib"]]
    before_inputs = _hash_tree(watched)
    argv = signal_argv(subcommand, model, inputs["calib"], out)
    delay = rng.uniform(0.3, max(0.5, duration * 1.1))
    t0 = time.monotonic()
    with open(case_dir / "stderr", "wb") as err, open(case_dir / "stdout", "wb") as so:
        p = subprocess.Popen([sys.executable, "-m", "gguftool", *argv], cwd=out, env=_child_env(), stdout=so,
                             stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            p.wait(timeout=delay)
            what = f"finished before the {klass} at {delay:.2f} s"
        except subprocess.TimeoutExpired:
            if klass == "truncate":
                keep = rng.randrange(0, truncated.stat().st_size)
                os.truncate(truncated, keep)
                what = f"{truncated.name} truncated to {keep} bytes at {delay:.2f} s"
            else:
                p.send_signal(SIGNALS[klass])
                what = f"{klass} sent at {delay:.2f} s"
        try:
            rc = p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
            what += "; still running 120 s later, killed"
    seconds = time.monotonic() - t0
    stderr = (case_dir / "stderr").read_text(encoding="utf-8", errors="replace")
    left = sorted(str(q.relative_to(case_dir)) for q in out.rglob("*")
                  if not (q == out / "o.gguf" and F.complete_gguf(q)))   # a finished output may stay
    if truncated is not None:      # anything new beside the truncated input is debris too
        left += sorted(str(q.relative_to(case_dir)) for q in truncated.parent.iterdir()
                       if q.name.endswith(".tmp") or ".gguf" in q.name and q != truncated)
    changed = sorted(k for k, v in _hash_tree(watched).items() if before_inputs.get(k) != v)
    accepted = {0, 1}
    if klass in SIGNALS:
        accepted |= {-SIGNALS[klass], 128 + SIGNALS[klass]}
    else:
        accepted |= {-signal.SIGBUS}
    kinds = []
    if rc not in accepted:
        kinds.append("exit-status")
    if "Traceback" in stderr:
        kinds.append("traceback")
    if rc == 1 and "traceback" not in kinds and \
            sum(line.startswith("Error:") for line in stderr.splitlines()) != 1:
        kinds.append("error-lines")
    if left:
        kinds.append("leftover")
    if changed:
        kinds.append("changed-input")
    text = "\n".join([
        f"subcommand: {subcommand}   class: {klass}",
        f"command:    cd {out} && python -m gguftool {' '.join(argv)}",
        "inputs:     made by make_signal_inputs() in scripts/fuzz_cli.py (big-llama BF16 checkpoint, big.gguf F32);"
        " the case folder is removed after the run",
        f"what:       {what}; exit {rc} after {seconds:.2f} s; problems: {', '.join(kinds) or 'none'}",
        f"left behind: {left}" if left else "", f"changed: {changed}" if changed else "",
        "stderr (last 20 lines):\n  " + "\n  ".join(stderr.splitlines()[-20:])])
    shutil.rmtree(case_dir, ignore_errors=True)
    return kinds, text


def measure(subcommand: str, inputs: dict, base: Path) -> float:
    """Seconds one undisturbed run takes (the signals are sent within that span)."""
    d = Path(tempfile.mkdtemp(dir=base, prefix=f"measure-{subcommand}-"))
    t0 = time.monotonic()
    model = inputs["ckpt"] if subcommand == "convert" else inputs["gguf"]
    p = subprocess.run([sys.executable, "-m", "gguftool", *signal_argv(subcommand, model, inputs["calib"], d)],
                       cwd=d, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.monotonic() - t0
    shutil.rmtree(d, ignore_errors=True)
    if p.returncode != 0:
        raise SystemExit(f"the undisturbed {subcommand} run failed:\n{p.stderr[-3000:]}")
    return seconds


# --- the table
def print_table(stats: dict) -> None:
    header = ["subcommand", "class", "cases"] + COLUMNS
    rows = [[s, k, str(r["cases"])] + [str(r[c]) for c in COLUMNS] for (s, k), r in stats.items()]
    total = ["all", "", str(sum(r["cases"] for r in stats.values()))] + \
        [str(sum(r[c] for r in stats.values())) for c in COLUMNS]
    widths = [max(len(x[i]) for x in [header, total] + rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) \
            + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows + [total]:
        print(line(r))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=500, help="damaged-input cases in all (spread over the classes)")
    ap.add_argument("--signal-cases", type=int, default=60, help="signal and truncation cases in all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated subcommands and/or subcommand/class to run")
    ap.add_argument("--failures", type=Path, default=Path("fuzz-failures"),
                    help="folder for one reproducer per failure kind (default: ./fuzz-failures)")
    ap.add_argument("--workdir", type=Path, help="where the signal cases' big inputs are made and kept")
    ap.add_argument("--worker", nargs=6, metavar=("SUB", "CLASS", "N", "SEED", "RESULTS", "FAILURES"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        sub, klass, n, seed, results, failures = a.worker
        worker(sub, klass, int(n), int(seed), Path(results), Path(failures))
        return 0

    import fuzz_cases as F

    only = {x for x in a.only.split(",") if x}

    def wanted(sub, klass):
        return not only or sub in only or f"{sub}/{klass}" in only
    a.failures.mkdir(parents=True, exist_ok=True)
    stats = defaultdict(lambda: {"cases": 0, "failed": 0, "kinds": set(), **{c: 0 for c in COLUMNS}})
    classes = [key for key in F.STRATEGIES if wanted(*key)]
    t0 = time.monotonic()
    if a.cases > 0 and classes:
        per = max(1, a.cases // len(classes))
        for i, (sub, klass) in enumerate(classes):
            print(f"[{time.monotonic() - t0:6.0f} s] {sub}/{klass}: {per} cases", file=sys.stderr, flush=True)
            run_worker_batch(sub, klass, per, a.seed * 1000 + i, a.failures, stats)
    sig_classes = [(s, k) for s in SIGNAL_SUBCOMMANDS for k in SIGNAL_CLASSES if wanted(s, k)]
    if a.signal_cases > 0 and sig_classes:
        base = a.workdir or Path(tempfile.mkdtemp(prefix="gguftool-fuzz-signals-"))
        base.mkdir(parents=True, exist_ok=True)
        print(f"[{time.monotonic() - t0:6.0f} s] making the signal cases' inputs in {base}", file=sys.stderr,
              flush=True)
        inputs = make_signal_inputs(base)
        rng = random.Random(a.seed)
        durations = {s: measure(s, inputs, base) for s in {s for s, _ in sig_classes}}
        print(f"[{time.monotonic() - t0:6.0f} s] undisturbed runs: "
              + ", ".join(f"{s} {d:.1f} s" for s, d in durations.items()), file=sys.stderr, flush=True)
        per = max(1, a.signal_cases // len(sig_classes))
        for n in range(per):
            for sub, klass in sig_classes:
                kinds, text = run_signal_case(sub, klass, inputs, base, rng, durations[sub])
                row = stats[(sub, "signal:" + klass)]
                row["cases"] += 1
                for k in kinds:
                    row[COLUMN_OF.get(k, "other")] += 1
                    key = f"{sub}.signal-{klass}.{k}"
                    row["kinds"].add(key)
                    folder = a.failures / _safe(key)
                    if not folder.exists():
                        folder.mkdir(parents=True)
                        (folder / "README.txt").write_text(text + "\n", encoding="utf-8")
                row["failed"] += bool(kinds)
            print(f"[{time.monotonic() - t0:6.0f} s] signals: round {n + 1}/{per} done", file=sys.stderr,
                  flush=True)
        if a.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    print_table(stats)
    kinds = sorted(set().union(*(r["kinds"] for r in stats.values()))) if stats else []
    failed = sum(r["failed"] for r in stats.values())
    print(f"\n{failed} failing cases of {sum(r['cases'] for r in stats.values())}; {len(kinds)} failure kinds"
          + (f", one reproducer each in {a.failures}/:" if kinds else ""))
    for k in kinds:
        print("  " + k)
    print(f"({time.monotonic() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

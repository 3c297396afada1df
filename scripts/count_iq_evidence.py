#!/usr/bin/env python
"""Count the byte-identity evidence for the IQ / TQ / MXFP4 types (issue 13's closing note), per type.

- golden: the arrays in fixtures/golden/iq/<TYPE>.npz that tests/test_quants_golden_iq.py compares (`q__*` and
  `qi__*`), and their rows (rows llama.cpp aborted on, `bad__*`, are not compared and not counted);
- live oracle (--live, runs the tests: 2 min 40 s on 2 shared cores, load 5): the rows the tests feed to
  llama.cpp's ggml_quantize_chunk through tests/llama_oracle.py, counted by wrapping GGMLOracle.quantize while
  pytest runs tests/test_quants_iq*.py (needs llama-cpp-python);
- whole files: the IQ/TQ/MXFP4 ftypes of fixtures/quantize_reference/*.json (synthetic 256 and 576 wide, dense
  and MoE; test_quantize_cmd.py) and the SmolLM2 cases test_quantize_cmd.py compares with them in CI, of fixtures/convert_reference/*iq*.json
  (convert), and the real-model rows of docs/iq_whole_files.jsonl (scripts/compare_quantize_models.py's log on
  SmolLM2 and Gemma-3; only rows with identical tensors are counted).

    python scripts/count_iq_evidence.py [--live]
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FTYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ1_S", "IQ1_M",
          "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4_MOE"]


def golden_counts() -> dict[str, tuple[int, int]]:
    """TYPE -> (arrays compared, rows compared)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "fixtures", "golden", "iq", "*.npz"))):
        name = os.path.basename(path)[:-4]
        d = np.load(path)
        arrays = rows = 0
        for k in d.files:
            if not (k.startswith("q__") or k.startswith("qi__")):
                continue
            arrays += 1
            bad = "bad__" + k.split("__", 1)[1]
            n = d[k].shape[0]
            rows += n - (int(d[bad].sum()) if bad in d.files else 0)
        out[name] = (arrays, rows)
    return out


_PLUGIN = '''
import collections, json, os

import numpy as np

import llama_oracle
import make_golden_iq
from gguftool.gguf.constants import GGMLType

_counts = collections.Counter()
_orig = llama_oracle.GGMLOracle.quantize
_orig_child = make_golden_iq.quantize_in_child


def _counting(self, qtype, x, imatrix=None):
    _counts[(GGMLType.parse(qtype).name, imatrix is not None)] += 1 if np.ndim(x) == 1 else len(x)
    return _orig(self, qtype, x, imatrix)


def _child_counting(ggml, t, x, im):
    # the forked child's own count dies with it: count here the rows it returned (None = llama.cpp aborted)
    out = _orig_child(ggml, t, x, im)
    if out is not None:
        _counts[(GGMLType.parse(t).name, im is not None)] += len(x)
    return out


llama_oracle.GGMLOracle.quantize = _counting
make_golden_iq.quantize_in_child = _child_counting


def pytest_sessionfinish(session, exitstatus):
    with open(os.environ["COUNT_IQ_OUT"], "w") as f:
        json.dump([[t, im, n] for (t, im), n in sorted(_counts.items())], f)
'''


def live_counts() -> dict[str, tuple[int, int]]:
    """TYPE -> (rows without imatrix, rows with) fed to the live oracle by the IQ test files."""
    with tempfile.TemporaryDirectory(prefix="count-iq-") as tmp:
        with open(os.path.join(tmp, "count_iq_plugin.py"), "w") as f:
            f.write(_PLUGIN)
        out = os.path.join(tmp, "counts.json")
        env = {**os.environ, "COUNT_IQ_OUT": out,
               "PYTHONPATH": os.pathsep.join([tmp, os.path.join(ROOT, "tests"), os.path.join(ROOT, "scripts"), ROOT])}
        files = sorted(glob.glob(os.path.join(ROOT, "tests", "test_quants_iq*.py")))
        # pytest's cache stays on: tests/conftest.py keeps the concatenated Gemma-3 file in it (without it the
        # Gemma-3 real-row test errors at setup); -rs names any skipped test in the summary line's neighbours
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "count_iq_plugin", *files], cwd=ROOT,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = r.stdout.strip().splitlines()
        print(tail[-1] if tail else "(pytest printed nothing)", file=sys.stderr)
        if r.returncode != 0 or not os.path.exists(out):
            # rows of a failing (or skipped-out) run are no evidence of identity: show why and stop
            print("\n".join(tail[-40:]), file=sys.stderr)
            raise SystemExit(f"the IQ tests did not pass (pytest exit {r.returncode}): no live counts")
        res: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        with open(out) as f:
            for t, im, n in json.load(f):
                res[t][int(im)] += n
    return {t: (a, b) for t, (a, b) in res.items()}


def whole_file_counts() -> dict[str, collections.Counter]:
    """ftype -> Counter(source -> files)."""
    res: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    # the SmolLM2 references hold llama-quantize's hashes for 13 cases, but only the ones test_quantize_cmd.py
    # parametrizes are compared in CI (the others need the script's run): count those
    with open(os.path.join(ROOT, "tests", "test_quantize_cmd.py")) as f:
        ci_smol = set(re.findall(r'\("(plan_smollm2_iq[a-z_]*\.json)", "([A-Z0-9_]+)"\)', f.read()))
    for path in sorted(glob.glob(os.path.join(ROOT, "fixtures", "quantize_reference", "*.json"))):
        d = json.load(open(path))
        fn = os.path.basename(path)
        src = ("smollm2 CI" if "smollm2" in fn else "synthetic 576" if "576" in fn else "synthetic 256")
        for ft in d["types"]:
            if ft in FTYPES and (src != "smollm2 CI" or (fn, ft) in ci_smol):
                res[ft][src] += 1
    for path in sorted(glob.glob(os.path.join(ROOT, "fixtures", "convert_reference", "*.json"))):
        d = json.load(open(path))
        for ft in d.get("quantized", {}):
            if ft in FTYPES:
                res[ft]["convert"] += 1
    log = os.path.join(ROOT, "docs", "iq_whole_files.jsonl")
    if os.path.exists(log):
        seen = set()
        with open(log) as f:
            for line in f:
                r = json.loads(line)
                key = (r["model"], r["ftype"], r["imatrix"])
                if r.get("tensors_identical") and key not in seen:
                    seen.add(key)
                    res[r["ftype"]][r["model"] + " (script)"] += 1
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--live", action="store_true", help="also run the IQ tests to count the live-oracle rows")
    a = ap.parse_args(argv)
    g = golden_counts()
    print("golden (fixtures/golden/iq): type, arrays, rows")
    for t, (n, r) in g.items():
        print(f"  {t:8} {n:4d} {r:6d}")
    print(f"  {'total':8} {sum(n for n, _ in g.values()):4d} {sum(r for _, r in g.values()):6d}")
    if a.live:
        lv = live_counts()
        print("live oracle (tests/test_quants_iq*.py): type, rows without imatrix, rows with")
        for t in sorted(lv):
            print(f"  {t:8} {lv[t][0]:6d} {lv[t][1]:6d}")
        print(f"  {'total':8} {sum(v[0] for v in lv.values()):6d} {sum(v[1] for v in lv.values()):6d}")
    w = whole_file_counts()
    srcs = ["synthetic 256", "synthetic 576", "smollm2 CI", "smollm2 (script)", "gemma3 (script)", "convert"]
    print("whole files identical to llama.cpp's, per ftype: " + ", ".join(srcs) + ", total")
    for ft in FTYPES:
        c = w.get(ft, collections.Counter())
        print(f"  {ft:9} " + " ".join(f"{c[s]:3d}" for s in srcs) + f" {sum(c.values()):4d}")
    print(f"  {'total':9} " + " ".join(f"{sum(w[f][s] for f in FTYPES):3d}" for s in srcs)
          + f" {sum(sum(w[f].values()) for f in FTYPES):4d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

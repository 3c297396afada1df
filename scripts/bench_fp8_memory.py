#!/usr/bin/env python
"""Peak memory of converting FP8 checkpoints of growing size: does it depend on the model's size?

    python scripts/bench_fp8_memory.py [--layers 4 12] [--type Q8_0] [--dir /tmp/fp8-bench] [--bf16]
                                       [--llama-cpp DIR --python PY]

Makes (once, under --dir) FP8 checkpoints with scripts/make_fp8_checkpoint.py's llama-block layout at Llama-3-8B
widths (hidden 4096, ffn 14336, 32 heads, 8 KV heads, 128x128 F32 weight_scale_inv blocks) and the given layer
counts, then runs ``gguftool convert --type TYPE`` on each and prints its peak RssAnon (anonymous memory: the pages
of the memory-mapped checkpoint are left out, as they are the page cache's), next to the checkpoint's size and
the largest tensor in float32. ``--bf16`` also converts a BF16 checkpoint of the same shape (the same weights,
dequantized), the memory FP8 input should match. With ``--llama-cpp`` and ``--python`` (a Python with torch),
llama.cpp's convert_hf_to_gguf.py --outtype q8_0 runs on the same checkpoints for comparison.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WIDTHS = ["--hidden", "4096", "--ffn", "14336", "--heads", "32", "--kv-heads", "8"]


def peak_rss_anon(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RssAnon bytes) of cmd, sampled from /proc/PID/status every 10 ms; raises if it fails."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = [0]

    def watch():
        while p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.01)

    t = threading.Thread(target=watch)
    t.start()
    _, err = p.communicate()
    t.join()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-2000:]}")
    return time.perf_counter() - t0, peak[0]


def to_bf16(src: Path, dst: Path) -> None:
    """The FP8 checkpoint dequantized to BF16 (gguftool's reading, rounded to BF16), one tensor at a time."""
    import json

    import numpy as np
    sys.path.insert(0, str(ROOT))
    from gguftool.hf.checkpoint import Checkpoint
    from gguftool.hf.prequant import find_prequantized

    dst.mkdir(parents=True, exist_ok=True)
    with Checkpoint.open(src) as ck:
        pq = find_prequantized(ck)
        names = [n for n in ck.tensors if not pq.skipped(n)]
        header, off = {}, 0
        for n in sorted(names):
            nb = 2 * int(np.prod(ck.tensors[n].shape))
            header[n] = {"dtype": "BF16", "shape": list(ck.tensors[n].shape), "data_offsets": [off, off + nb]}
            off += nb
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        with open(dst / "model.safetensors", "wb") as f:
            f.write(len(h).to_bytes(8, "little") + h)
            for n in sorted(names):
                a = pq.scaled[n].full() if n in pq.scaled else ck.tensors[n].read_f32()
                u = np.ascontiguousarray(a, np.float32).view(np.uint32)
                f.write(((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes())
        cfg = dict(ck.config)
    cfg.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for n in ("tokenizer.model", "tokenizer_config.json"):
        (dst / n).write_bytes((src / n).read_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--type", default="Q8_0")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fp8-bench"))
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--llama-cpp", type=Path)
    ap.add_argument("--python")
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    largest = 14336 * 4096 * 4
    print(f"load: {os.getloadavg()}; largest tensor in float32: {largest / 2**20:.0f} MiB")
    print("| checkpoint | size GB | gguftool s | gguftool peak RssAnon MiB | llama.cpp s | llama.cpp peak RssAnon MiB |")
    print("|---|---|---|---|---|---|")
    for n in a.layers:
        ck = a.dir / f"fp8-L{n}"
        if not (ck / "config.json").is_file():
            subprocess.run([sys.executable, str(HERE / "make_fp8_checkpoint.py"), "llama-block", str(ck),
                            "--layers", str(n), *WIDTHS, "--random-codes"], check=True, stdout=subprocess.DEVNULL)
        todo = [(f"FP8 {n} layers", ck)]
        if a.bf16:
            bf = a.dir / f"bf16-L{n}"
            if not (bf / "config.json").is_file():
                to_bf16(ck, bf)
            todo.append((f"BF16 {n} layers", bf))
        for label, path in todo:
            size = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 1e9
            out = a.dir / "out.gguf"
            s, peak = peak_rss_anon([sys.executable, "-m", "gguftool", "convert", str(path), "--type", a.type,
                                     "-o", str(out), "--force", "--threads", a.threads], env)
            os.remove(out)
            ref = ("", "")
            if a.llama_cpp and a.python:
                lenv = dict(os.environ, PYTHONPATH=str(a.llama_cpp / "gguf-py"))
                rs, rpeak = peak_rss_anon([a.python, str(a.llama_cpp / "convert_hf_to_gguf.py"), str(path),
                                           "--outtype", a.type.lower(), "--outfile", str(out)], lenv)
                os.remove(out)
                ref = (f"{rs:.1f}", f"{rpeak / 2**20:.0f}")
            print(f"| {label} | {size:.2f} | {s:.1f} | {peak / 2**20:.0f} | {ref[0]} | {ref[1]} |", flush=True)


if __name__ == "__main__":
    main()

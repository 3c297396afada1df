#!/usr/bin/env python
"""Check gguftool's IQ2/IQ1 lattice tables against the ones llama.cpp builds, by building llama.cpp's.

    python scripts/check_iq2_tables.py PATH/TO/llama.cpp/ggml [--libdir DIR]

Compiles a small C program that includes ggml/src/ggml-quants.c, runs iq2xs_init_impl for IQ2_XXS, IQ2_XS,
IQ1_S (shared with IQ1_M) and IQ2_S, and dumps the grid (uint64 per point), the map (int32 x 43692) and the
neighbour lists (uint16); links against a libggml-base.so (llama-cpp-python's by default) for ggml's helpers.
Prints each table's sha256 next to gguftool's (gguftool.quants.iq_grids_2.tables) and exits 1 on a mismatch.
The hashes it printed are the ones tests/test_quants_iq2_grids.py pins (the C build is single-threaded here;
llama.cpp's OpenMP build fills the same slots, each list at its precomputed offset).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

C_SOURCE = r"""
#include "ggml-quants.c"
#include <stdio.h>
static void dump(const char * dir, const char * what, int g, const void * p, size_t n) {
    char name[4096];
    snprintf(name, sizeof name, "%s/%s%d.bin", dir, what, g);
    FILE * f = fopen(name, "wb");
    fwrite(p, 1, n, f);
    fclose(f);
}
int main(int argc, char ** argv) {
    enum ggml_type ts[4] = {GGML_TYPE_IQ2_XXS, GGML_TYPE_IQ2_XS, GGML_TYPE_IQ1_S, GGML_TYPE_IQ2_S};
    for (int t = 0; t < 4; ++t) {
        iq2xs_init_impl(ts[t]);
        int g = iq2_data_index(ts[t]);
        int end = 0;
        for (int i = 0; i < 43692; ++i) {
            int m = iq2_data[g].map[i];
            if (m < 0) {
                int o = -m - 1;
                int e = o + 1 + iq2_data[g].neighbours[o];
                if (e > end) end = e;
            }
        }
        dump(argv[1], "grid", g, iq2_data[g].grid, 8 * (size_t)iq2_grid_size(ts[t]));
        dump(argv[1], "map", g, iq2_data[g].map, 4 * 43692);
        dump(argv[1], "neighbours", g, iq2_data[g].neighbours, 2 * (size_t)end);
    }
    return 0;
}
"""


def _default_libdir() -> str:
    import llama_cpp

    return os.path.join(os.path.dirname(llama_cpp.__file__), "lib")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ggml", type=Path, help="llama.cpp's ggml directory (holding src/ and include/)")
    ap.add_argument("--libdir", help="directory of a libggml-base.so (default: llama-cpp-python's)")
    a = ap.parse_args(argv)
    libdir = a.libdir or _default_libdir()
    from gguftool.quants import iq_grids_2 as g

    ok = True
    with tempfile.TemporaryDirectory(prefix="iq2tables-") as tmp:
        src = Path(tmp, "dump.c")
        src.write_text(C_SOURCE)
        exe = Path(tmp, "dump")
        subprocess.run(["cc", "-O1", "-w", f"-I{a.ggml / 'src'}", f"-I{a.ggml / 'include'}", str(src), "-o", str(exe),
                        f"-L{libdir}", "-lggml-base", "-lm", f"-Wl,-rpath,{libdir}"], check=True)
        subprocess.run([str(exe), tmp], check=True)
        for kind, name in ((g.IQ2_XXS, "IQ2_XXS"), (g.IQ2_XS, "IQ2_XS"), (g.IQ1, "IQ1_S/IQ1_M"), (g.IQ2_S, "IQ2_S")):
            t = g.tables(kind)
            ours = {"grid": t.grid.tobytes(), "map": t.kmap.astype("<i4").tobytes(),
                    "neighbours": t.neighbours.astype("<u2").tobytes()}
            for what, data in ours.items():
                ref = Path(tmp, f"{what}{kind}.bin").read_bytes()
                same = ref == data
                ok &= same
                print(f"{name:12s} {what:10s} llama.cpp {hashlib.sha256(ref).hexdigest()} "
                      f"{'same' if same else 'DIFFERENT'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

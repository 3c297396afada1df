"""Mutation fuzzing of real GGUF headers: any damage must end in a FormatError (or a valid file), never another
exception, a hang or a large allocation.

Seeds: the headers of the real models (SmolLM2, Gemma-3; their vocabulary arrays cut to 64 entries so that a
case is fast) and a synthetic header with every value type. The tensor data region is a sparse file of the
right size, so tensor extents are checked as in the real files. Run more cases with
``python tests/test_fuzz_header.py --cases 20000``.
"""
from __future__ import annotations

import os
import random
import struct
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from gguftool.errors import FormatError
from gguftool.gguf.constants import GGMLType, GGUFValueType as VT
from gguftool.gguf.reader import GGUFReader
from gguftool.gguf.values import KV, GGUFArray
from gguftool.gguf.writer import build_header

MAX_PEAK_BYTES = 32 << 20   # Python/numpy allocations allowed while parsing one mutated header
MAX_SECONDS = 2.0


# --- seeds
def _shrink(value):
    if isinstance(value, GGUFArray):
        vals = value.values[:64]
        if value.element_type == VT.ARRAY:
            vals = [_shrink(v) for v in vals]
        return GGUFArray(value.element_type, vals)
    return value


def seed_from_file(path: Path) -> tuple[bytes, int]:
    """(header bytes, total file size) of a real model with its long arrays cut to 64 elements."""
    with GGUFReader(path) as r:
        kvs = [KV(kv.key, kv.type, _shrink(kv.value)) for kv in r.kvs]
        header, _ = build_header(kvs, r.tensors, version=r.version, alignment=r.alignment)
        data_size = r.file_size - r.data_offset
    return header, len(header) + data_size


def synthetic_seed() -> tuple[bytes, int]:
    from gguftool.gguf.reader import TensorInfo
    kvs = [KV("u8", VT.UINT8, 1), KV("i8", VT.INT8, -1), KV("u16", VT.UINT16, 2), KV("i16", VT.INT16, -2),
           KV("u32", VT.UINT32, 3), KV("i32", VT.INT32, -3), KV("f32", VT.FLOAT32, 0.5), KV("b", VT.BOOL, True),
           KV("s", VT.STRING, "string"), KV("u64", VT.UINT64, 4), KV("i64", VT.INT64, -4),
           KV("f64", VT.FLOAT64, 0.25), KV("general.alignment", VT.UINT32, 64),
           KV("as", VT.ARRAY, GGUFArray(VT.STRING, ["a", "bc", ""])),
           KV("af", VT.ARRAY, GGUFArray(VT.FLOAT32, np.ones(5, np.float32))),
           KV("an", VT.ARRAY, GGUFArray(VT.ARRAY, [GGUFArray(VT.UINT16, [1, 2]), GGUFArray(VT.STRING, ["x"])]))]
    tensors = [TensorInfo("w", (256, 2), GGMLType.Q4_K, 0, 288, 512),
               TensorInfo("n", (8,), GGMLType.F32, 320, 32, 8),
               TensorInfo("e", (64,), GGMLType.Q8_0, 384, 68, 64)]
    header, _ = build_header(kvs, tensors, alignment=64)
    return header, len(header) + 512


# --- mutations
_INTERESTING_U64 = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1, 0x0101010101010101]


def mutate(header: bytes, rng: random.Random) -> tuple[bytes, int, int]:
    """A damaged copy of the header, -1 if it is a truncation (else 0), and the kind of mutation."""
    b = bytearray(header)
    kind = rng.randrange(7)
    if kind == 0:                                    # flip a few random bits
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:                                  # random bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 2:                                  # an extreme u64 somewhere (lengths, counts, dims, offsets)
        pos = rng.randrange(len(b) - 8)
        b[pos:pos + 8] = struct.pack("<Q", rng.choice(_INTERESTING_U64))
    elif kind == 3:                                  # an extreme u32 (types, n_dims, version)
        pos = rng.randrange(len(b) - 4)
        b[pos:pos + 4] = struct.pack("<I", rng.choice([0, 5, 9, 13, 42, 2**31 - 1, 2**32 - 1]))
    elif kind == 4:                                  # the counts in the fixed header
        pos = rng.choice([4, 8, 16])
        b[pos:pos + 8 if pos else 4] = struct.pack("<Q", rng.choice(_INTERESTING_U64))[:8 if pos else 4]
    elif kind == 5:                                  # delete or duplicate a slice
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randint(1, 64))
        b = b[:i] + b[j:] if rng.random() < 0.5 else b[:j] + b[i:j] + b[j:]
    else:                                            # truncate the file somewhere in the header
        return bytes(b[:rng.randrange(len(b))]), -1, kind
    return bytes(b), 0, kind


def check_case(path: Path, header: bytes, total: int, trace: bool = True) -> str:
    """Write the case as a sparse file and parse it; return 'ok' or 'error' (anything else raises).
    With ``trace`` the peak of Python/numpy allocations is measured (tracemalloc; slows parsing ~10x)."""
    with open(path, "wb") as f:
        f.write(header)
        if total > len(header):
            f.truncate(total)
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with GGUFReader(path) as r:
            r.metadata  # noqa: B018  (materialise every value)
            outcome = "ok"
    except FormatError as e:
        assert str(e).startswith(f"{path}: "), str(e)
        outcome = "error"
    finally:
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        if trace:
            tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    assert elapsed < MAX_SECONDS, f"parsing took {elapsed:.1f} s"
    assert peak < MAX_PEAK_BYTES, f"parsing allocated {peak >> 20} MiB"
    return outcome


def run_cases(seed: tuple[bytes, int], n: int, rng_seed: int, workdir: Path) -> dict:
    header, total = seed
    rng = random.Random(rng_seed)
    counts = {"ok": 0, "error": 0}
    path = workdir / "case.gguf"
    for i in range(n):
        data, delta, kind = mutate(header, rng)
        size = len(data) if delta < 0 else total - len(header) + len(data)
        # allocations are traced for the mutations that plant huge lengths and counts, and every 8th case
        trace = kind in (2, 4) or i % 8 == 0
        try:
            counts[check_case(path, data, size, trace)] += 1
        except AssertionError as e:
            raise AssertionError(f"case {i} (seed {rng_seed}): {e}") from None
    return counts


# --- tests
def test_unmutated_seeds_are_valid(tmp_path):
    header, total = synthetic_seed()
    assert check_case(tmp_path / "s.gguf", header, total) == "ok"


def test_fuzz_synthetic(tmp_path):
    counts = run_cases(synthetic_seed(), 300, 1234, tmp_path)
    assert counts["error"] > 150  # most mutations must be caught


@pytest.mark.slow
@pytest.mark.parametrize("fixture, seed", [("smollm2_gguf", 1), ("gemma3_gguf", 2)])
def test_fuzz_real_headers(fixture, seed, request, tmp_path):
    path = request.getfixturevalue(fixture)
    s = seed_from_file(path)
    assert check_case(tmp_path / "s.gguf", *s) == "ok"
    counts = run_cases(s, 250, seed, tmp_path)
    assert counts["error"] > 100


def test_full_real_header_truncations(smollm2_gguf, tmp_path):
    # the unshrunk header (49,152 tokens, 48,900 merges), cut inside the big arrays and the tensor infos
    raw = Path(smollm2_gguf).open("rb").read(2 << 20)
    with GGUFReader(smollm2_gguf) as r:
        big = [n for n, kv in enumerate(r.kvs) if isinstance(kv.value, GGUFArray) and len(kv.value) > 1000]
        cuts = [r.kv_offsets[k] + d for k in big for d in (9, 40, 100_000)]
        cuts += [t.info_offset + 5 for t in r.tensors[::50]] + [r.header_end - 1]
    for n in cuts:
        assert check_case(tmp_path / "cut.gguf", raw[:n], n, trace=False) == "error"


if __name__ == "__main__":  # more cases than CI runs: python tests/test_fuzz_header.py --cases 20000 [FILE ...]
    import argparse
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--cases", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    seeds = [("synthetic", synthetic_seed())] + [(str(f), seed_from_file(f)) for f in args.files]
    with tempfile.TemporaryDirectory() as d:
        for name, s in seeds:
            t0 = time.perf_counter()
            c = run_cases(s, args.cases, args.seed, Path(d))
            print(f"{name}: {args.cases} cases, {c['error']} FormatError, {c['ok']} still valid, "
                  f"{time.perf_counter() - t0:.1f} s")
    sys.exit(0)


def test_cli_on_damaged_files_prints_one_error_line(tmp_path):
    # the same kind of damage through `gguftool inspect` and `gguftool edit`: exit 0, or exit 1 with exactly one
    # "Error: ..." line on stderr and nothing on stdout (never a traceback)
    from conftest import cli_runner
    from gguftool.cli import main

    runner = cli_runner()
    header, total = synthetic_seed()
    rng = random.Random(99)
    path, out = tmp_path / "case.gguf", tmp_path / "out.gguf"
    failures = 0
    for i in range(60):
        data, delta, _ = mutate(header, rng)
        with open(path, "wb") as f:
            f.write(data)
            if delta == 0:
                f.truncate(total - len(header) + len(data))
        for args in (["inspect", str(path)], ["inspect", "--json", str(path)],
                     ["edit", "--force", str(path), str(out)]):
            r = runner.invoke(main, args, catch_exceptions=False)
            if r.exit_code == 0:
                continue
            failures += 1
            assert r.exit_code == 1, (i, args, r.exit_code)
            assert r.stdout == ""
            lines = r.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"Error: {path}: "), (i, args, r.stderr)
    assert failures > 60
    assert sorted(os.listdir(tmp_path)) in (["case.gguf"], ["case.gguf", "out.gguf"])

"""Importance-matrix (imatrix) files: the GGUF format and llama.cpp's legacy ``.dat`` format.

In memory an imatrix is :class:`Imatrix`: for every weight tensor name an :class:`ImatrixEntry` holding the
raw per-column sums of squared activations (``in_sum2``, float32, one row of ``ne0`` values per expert matrix)
and how many activations went into each matrix (``counts``), plus the datasets and chunk counters.

GGUF format (tools/imatrix/imatrix.cpp ``save_imatrix``; read by common/imatrix-loader.cpp)::

    general.type = "imatrix", imatrix.datasets = [str], imatrix.chunk_count u32, imatrix.chunk_size u32
    tensors, sorted by name:  <name>.in_sum2  F32 [ne0, n_mat]   <name>.counts  F32 [1, n_mat]

Legacy ``.dat`` (``save_imatrix_legacy``), little-endian::

    i32 n_entries, then per entry: i32 len | name | i32 ncall | i32 nval | f32 values[nval]
    optional trailer: i32 chunk_count | i32 len | dataset name
    values = in_sum2 / count * ncall, ncall = ceil(max(counts) / chunk_size)

The quantization weights are what tools/quantize/quantize.cpp ``load_imatrix`` computes:
GGUF: ``in_sum2 / count`` per matrix (1.0 where count is 0); legacy: ``values / ncall`` (values as they are
when ncall is 0). Both are float32 divisions, as in C.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from ..errors import ImatrixError
from ..outfile import OutputFile, check_outputs

__all__ = ["ImatrixEntry", "Imatrix", "read_imatrix", "write_imatrix_gguf", "write_imatrix_legacy",
           "snapshot_path", "existing_snapshots",
           "KEY_DATASETS", "KEY_CHUNK_COUNT", "KEY_CHUNK_SIZE"]

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"


# --- in-memory form


@dataclass
class ImatrixEntry:
    in_sum2: np.ndarray   # float32, shape (n_mat, ne0): sum of x^2 per input column, per expert matrix
    counts: np.ndarray    # int64, shape (n_mat,): activations accumulated per matrix

    @property
    def ne0(self) -> int:
        return int(self.in_sum2.shape[1])

    @property
    def n_mat(self) -> int:
        return int(self.in_sum2.shape[0])


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False     # read from a .dat file (then counts hold ncall, one per entry)
    has_metadata: bool = True   # GGUF files: imatrix.datasets, chunk_count and chunk_size all present

    def weights(self) -> dict[str, np.ndarray]:
        """name -> float32 per-column weights, flat (n_mat * ne0), as llama-quantize computes them."""
        out: dict[str, np.ndarray] = {}
        for name, e in self.entries.items():
            sums = np.asarray(e.in_sum2, dtype=np.float32)
            if self.is_legacy:
                ncall = int(e.counts[0]) if e.counts.size else 0
                w = sums / np.float32(ncall) if ncall > 0 else sums.copy()
            else:
                cnt = np.asarray(e.counts, dtype=np.int64).astype(np.float32)[:, None]
                with np.errstate(divide="ignore", invalid="ignore"):
                    w = np.where(cnt > 0, sums / np.where(cnt > 0, cnt, np.float32(1)), np.float32(1))
            out[name] = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
        return out

    def filtered(self, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> "Imatrix":
        """quantize.cpp prepare_imatrix: drop entries whose name contains an --exclude-weights string, then
        (if --include-weights are given) keep only entries whose name contains one of them (substring match)."""
        include, exclude = list(include), list(exclude)
        names = [n for n in self.entries if not any(x in n for x in exclude)]
        if include:
            names = [n for n in names if any(x in n for x in include)]
        return Imatrix({n: self.entries[n] for n in names}, list(self.datasets), self.chunk_count,
                       self.chunk_size, self.is_legacy, self.has_metadata)


# --- reading


def read_imatrix(path: "str | os.PathLike[str]") -> Imatrix:
    """Read a GGUF or legacy .dat imatrix (chosen by the file's magic). Raises ImatrixError / FormatError."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise ImatrixError(f"{path}: no such imatrix file") from None
    except IsADirectoryError:
        raise ImatrixError(f"{path}: is a directory, not an imatrix file") from None
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: str) -> Imatrix:
    from ..gguf.constants import GGMLType, GGUFValueType
    from ..gguf.reader import GGUFReader
    from ..gguf.values import GGUFArray

    with GGUFReader(path) as r:
        if not r.tensors:
            raise ImatrixError(f"{path}: imatrix file has no tensors")
        datasets_kv = r.kv(KEY_DATASETS)
        datasets: list[str] = []
        if datasets_kv is not None and isinstance(datasets_kv.value, GGUFArray) \
                and datasets_kv.value.element_type == GGUFValueType.STRING:
            datasets = [str(s) for s in datasets_kv.value.values]

        def u32(key: str) -> int:
            kv = r.kv(key)
            if kv is None:
                return 0
            if not isinstance(kv.value, int) or isinstance(kv.value, bool):
                raise ImatrixError(f"{path}: key {key} must be an integer, got {kv.value!r}")
            return int(kv.value)

        has_metadata = r.kv(KEY_DATASETS) is not None and r.kv(KEY_CHUNK_COUNT) is not None \
            and r.kv(KEY_CHUNK_SIZE) is not None
        pairs: dict[str, list] = {}
        for t in r.tensors:
            for suffix, slot in ((SUFFIX_SUMS, 0), (SUFFIX_COUNTS, 1)):
                if t.name.endswith(suffix) and len(t.name) > len(suffix):
                    pairs.setdefault(t.name[:-len(suffix)], [None, None])[slot] = t
        entries: dict[str, ImatrixEntry] = {}
        for name in sorted(pairs):
            sums_t, counts_t = pairs[name]
            if sums_t is None or counts_t is None:
                raise ImatrixError(f"{path}: mismatched sums and counts for {name} (one of {name}{SUFFIX_SUMS} / "
                                   f"{name}{SUFFIX_COUNTS} is missing)")
            if sums_t.type != GGMLType.F32 or counts_t.type != GGMLType.F32:
                raise ImatrixError(f"{path}: sums and counts for {name} must be F32 (got {sums_t.type.name}, "
                                   f"{counts_t.type.name})")
            n_mat = counts_t.n_elements
            nval = sums_t.n_elements
            if n_mat < 1 or nval < 1 or nval % n_mat:
                raise ImatrixError(f"{path}: {name}: {nval} sums do not split into {n_mat} matrices")
            sums = np.array(r.tensor_array(sums_t), dtype=np.float32).reshape(n_mat, nval // n_mat)
            cf = np.array(r.tensor_array(counts_t), dtype=np.float64).reshape(n_mat)
            if not np.all(np.isfinite(cf)) or np.any(np.abs(cf) > 2.0 ** 62):
                raise ImatrixError(f"{path}: {name}: counts are not finite integers")
            counts = (np.sign(cf) * np.floor(np.abs(cf) + 0.5)).astype(np.int64)  # lround: half away from 0
            entries[name] = ImatrixEntry(sums, counts)
        return Imatrix(entries, datasets, u32(KEY_CHUNK_COUNT), u32(KEY_CHUNK_SIZE), is_legacy=False,
                       has_metadata=has_metadata)


class _Cursor:
    def __init__(self, path: str, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def i32(self, what: str) -> int:
        if self.left() < 4:
            raise ImatrixError(f"{self.path}: at byte {self.pos}: truncated while reading {what}")
        v = struct.unpack_from("<i", self.data, self.pos)[0]
        self.pos += 4
        return v

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left():
            raise ImatrixError(f"{self.path}: at byte {self.pos}: {what} needs {n} bytes but only {self.left()} "
                               f"are left (truncated or not an imatrix file?)")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b


def _read_legacy(path: str) -> Imatrix:
    with open(path, "rb") as f:
        data = f.read()
    c = _Cursor(path, data)
    if len(data) < 4:
        raise ImatrixError(f"{path}: not an imatrix file (too short: {len(data)} bytes)")
    n_entries = c.i32("the entry count")
    # each entry needs at least 4 + 1 + 4 + 4 + 4 bytes: reject impossible counts before looping
    if n_entries < 1 or n_entries > c.left() // 17:
        raise ImatrixError(f"{path}: not an imatrix file (neither GGUF nor legacy .dat: entry count {n_entries})")
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        start = c.pos
        n = c.i32(f"the name length of entry {i}")
        if n < 1 or n > 4096:
            raise ImatrixError(f"{path}: at byte {start}: entry {i} has a bad name length {n}")
        name = c.take(n, f"name of entry {i}").decode("utf-8", "replace")
        ncall = c.i32(f"ncall of entry {i}")
        nval = c.i32(f"value count of entry {i}")
        if nval < 1:
            raise ImatrixError(f"{path}: entry {name}: bad value count {nval}")
        vals = np.frombuffer(c.take(4 * nval, f"values of entry {name}"), dtype="<f4").astype(np.float32)
        entries[name] = ImatrixEntry(vals.reshape(1, nval), np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if c.left() >= 4:
        chunk_count = c.i32("the chunk count")
        if c.left() >= 4:
            n = c.i32("the dataset name length")
            if 0 < n <= c.left():
                datasets.append(c.take(n, "the dataset name").split(b"\0", 1)[0].decode("utf-8", "replace"))
    return Imatrix(dict(sorted(entries.items())), datasets, chunk_count, 0, is_legacy=True, has_metadata=False)


# --- writing


def _trim(shape: tuple[int, ...]) -> tuple[int, ...]:
    """ggml_n_dims: llama.cpp drops trailing dimensions of size 1 when writing tensor infos."""
    s = list(shape)
    while len(s) > 1 and s[-1] == 1:
        s.pop()
    return tuple(s)


def write_imatrix_gguf(path: "str | os.PathLike[str]", im: Imatrix, *, overwrite: bool = True) -> None:
    """Write the GGUF imatrix format as llama-imatrix's save_imatrix does (in place only when complete)."""
    from ..gguf.constants import GGMLType, GGUFValueType
    from ..gguf.values import kv_array, kv_str, kv_u32
    from ..gguf.writer import GGUFWriter

    names = sorted(im.entries)
    with GGUFWriter(path, overwrite=overwrite) as w:
        w.add_kv(kv_str("general.type", "imatrix"))
        w.add_kv(kv_array(KEY_DATASETS, GGUFValueType.STRING, list(im.datasets)))
        w.add_kv(kv_u32(KEY_CHUNK_COUNT, im.chunk_count))
        w.add_kv(kv_u32(KEY_CHUNK_SIZE, im.chunk_size))
        for n in names:
            e = im.entries[n]
            w.add_tensor_info(n + SUFFIX_SUMS, _trim((e.ne0, e.n_mat)), GGMLType.F32)
            w.add_tensor_info(n + SUFFIX_COUNTS, _trim((1, e.n_mat)), GGMLType.F32)
        w.write_header()
        for n in names:
            e = im.entries[n]
            w.write_tensor_data(n + SUFFIX_SUMS, np.ascontiguousarray(e.in_sum2, dtype="<f4"))
            w.write_tensor_data(n + SUFFIX_COUNTS, np.asarray(e.counts, dtype=np.float64).astype("<f4"))
        w.finish()


def write_imatrix_legacy(path: "str | os.PathLike[str]", im: Imatrix, dataset: str = "", *,
                         overwrite: bool = True) -> None:
    """Write the legacy .dat format as save_imatrix_legacy does: values = in_sum2 / count * ncall with
    ncall = ceil(max(counts) / chunk_size); entries without any data are skipped. In place only when complete
    (gguftool.outfile)."""
    if im.chunk_size <= 0:
        raise ImatrixError("writing a legacy imatrix needs chunk_size > 0")
    parts = []
    n_entries = 0
    for name in sorted(im.entries):
        e = im.entries[name]
        counts = np.asarray(e.counts, dtype=np.int64)
        if counts.size == 0 or not np.any(counts):
            continue
        ncall = int((int(counts.max()) + im.chunk_size - 1) // im.chunk_size)
        cnt = counts.astype(np.float32)[:, None]
        vals = np.asarray(e.in_sum2, dtype=np.float32)
        zero = cnt == 0
        vals = np.where(zero, np.float32(1), vals) / np.where(zero, np.float32(1), cnt) * np.float32(ncall)
        raw = name.encode()
        parts.append(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, vals.size)
                     + np.ascontiguousarray(vals, dtype="<f4").tobytes())
        n_entries += 1
    ds = (dataset or (im.datasets[-1] if im.datasets else "")).encode()
    blob = struct.pack("<i", n_entries) + b"".join(parts) + struct.pack("<i", im.chunk_count) \
        + struct.pack("<i", len(ds)) + ds
    check_outputs([path], overwrite=overwrite)
    with OutputFile(path, overwrite=overwrite) as out:
        with out.stream() as f:
            f.write(blob)
        out.commit()


def snapshot_path(output: "str | os.PathLike[str]", n_chunks: int) -> str:
    """The file llama-imatrix --save-frequency writes after ``n_chunks`` chunks: OUTPUT.at_N."""
    return f"{os.fspath(output)}.at_{n_chunks}"


def existing_snapshots(output: "str | os.PathLike[str]", every: int) -> list[str]:
    """The files already in OUTPUT's folder that a run saving a snapshot every ``every`` chunks may write to
    (OUTPUT.at_N for N a multiple of ``every``), so that they can be checked before the run."""
    output = os.fspath(output)
    if every <= 0:
        return []
    folder, prefix = os.path.dirname(output) or ".", os.path.basename(output) + ".at_"
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = []
    for name in sorted(names):
        n = name[len(prefix):]
        if name.startswith(prefix) and n.isdigit() and n == str(int(n)) and int(n) > 0 and int(n) % every == 0:
            found.append(os.path.join(os.path.dirname(output), name))
    return found

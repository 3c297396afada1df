"""A Hugging Face checkpoint on disk: config.json plus one or more safetensors files, read lazily.

Only the safetensors headers are parsed up front (every length and offset checked against the file size); the
tensor data stays in a read-only memory map and one tensor at a time is turned into a numpy array on demand, so
converting a model never holds more than one tensor in anonymous memory.

Tensor order follows llama.cpp's ``convert_hf_to_gguf.py`` (``ModelBase.index_tensors``): the shard files sorted
by name (from ``model.safetensors.index.json`` when present, else every ``model*.safetensors`` in the folder),
and within each shard the tensor names sorted (as gguf-py's ``SafetensorsLocal`` sorts them).
"""
from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConvertError
from .schema import Obj, Str, checked

# --- safetensors dtypes
# dtype name -> (bytes per element, numpy dtype used to view the stored bytes)
SUPPORTED_DTYPES: dict[str, tuple[int, np.dtype]] = {
    "F32": (4, np.dtype("<f4")),
    "F16": (2, np.dtype("<f2")),
    "BF16": (2, np.dtype("<u2")),  # viewed as raw 16-bit words, widened to float32 by shifting
    "F8_E4M3": (1, np.dtype("u1")),  # FP8 codes, widened to float32 through a table (fp8_table)
    "F8_E5M2": (1, np.dtype("u1")),
    "I8": (1, np.dtype("i1")),     # int8 weights of compressed-tensors int-quantized checkpoints
}
# Every dtype the safetensors format defines, with its element size, so that an unsupported one can be named
# (and its byte length still checked) instead of being reported as garbage.
_OTHER_DTYPES = {
    "F64": 8, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E8M0": 1, "F6_E2M3": 1, "F6_E3M2": 1, "F4": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


def bf16_to_f32(words: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly (bf16 is the top half of an f32)."""
    return (words.astype(np.uint32) << 16).view(np.float32)


def fp8_table(exp_bits: int, man_bits: int, has_inf: bool) -> np.ndarray:
    """float32 value of each of the 256 codes of an 8-bit float (sign, exp_bits, man_bits), as torch widens them.

    E4M3 (``float8_e4m3fn``: bias 7, no infinities, S.1111.111 is NaN) and E5M2 (bias 15, IEEE-like: exponent all
    ones is infinity with a zero mantissa, NaN otherwise). Subnormals (exponent 0) are mantissa * 2^(1-bias-man).
    NaN keeps its sign and mantissa bits, moved to the top of the float32 mantissa, with the quiet bit set (the
    bit patterns torch's conversion gives; checked code for code in tests/test_hf_prequant.py)."""
    bias = (1 << (exp_bits - 1)) - 1
    emax = (1 << exp_bits) - 1
    bits = np.zeros(256, np.uint32)
    for code in range(256):
        sign, e, m = code >> 7, (code >> man_bits) & emax, code & ((1 << man_bits) - 1)
        if e == emax and (has_inf or m == (1 << man_bits) - 1):
            if has_inf and m == 0:
                v = np.uint32(0x7F800000)
            else:
                v = np.uint32(0x7F800000 | (m << (23 - man_bits)) | 0x00400000)
            bits[code] = v | np.uint32(sign << 31)
            continue
        mag = (m * 2.0 ** (1 - bias - man_bits) if e == 0 else (1 + m / (1 << man_bits)) * 2.0 ** (e - bias))
        bits[code] = np.array([-mag if sign else mag], np.float32).view(np.uint32)[0]
    return bits.view(np.float32)


FP8_TABLES = {"F8_E4M3": fp8_table(4, 3, False), "F8_E5M2": fp8_table(5, 2, True)}


def widen_f32(dtype: str, a: np.ndarray) -> np.ndarray:
    """Stored values of a safetensors ``dtype`` (as SafetensorsTensor.array() gives them) -> float32 values; may
    return ``a`` itself for F32."""
    if dtype == "BF16":
        return bf16_to_f32(a)
    if dtype in FP8_TABLES:
        return FP8_TABLES[dtype][a]
    return a.astype(np.float32, copy=False)


def widen_compute(dtype: str, a: np.ndarray) -> np.ndarray:
    """Stored values -> the dtype llama.cpp's converter computes with: F16 and F32 stay, every other dtype is
    widened to float32 (``data_torch.to(torch.float32)`` in ModelBase.prepare_tensors)."""
    return a if dtype in ("F16", "F32") else widen_f32(dtype, a)


@dataclass(frozen=True)
class SafetensorsTensor:
    """One tensor of a safetensors file: where its bytes are, not the bytes themselves."""

    name: str
    dtype: str                 # a safetensors dtype name; those of SUPPORTED_DTYPES can be read (array())
    shape: tuple[int, ...]     # as stored (PyTorch order: slowest dimension first)
    file: "SafetensorsFile"
    offset: int                # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    def array(self) -> np.ndarray:
        """The stored values as a read-only view of the memory map (uint16 words for BF16, codes for FP8)."""
        np_dtype = SUPPORTED_DTYPES[self.dtype][1]
        buf = self.file.buffer()
        if self.offset + self.nbytes > len(buf):   # checked against the header when opened: shrunk since then
            raise ConvertError(f"{self.file.path}: the file is {len(buf)} bytes now, too short for tensor "
                               f"{self.name!r} (bytes {self.offset}..{self.offset + self.nbytes}): "
                               f"was it truncated or replaced while being read?")
        arr = np.frombuffer(buf, dtype=np_dtype, count=self.n_elements, offset=self.offset)
        return arr.reshape(self.shape)

    def read_f32(self) -> np.ndarray:
        """The tensor as a new float32 array in its stored shape."""
        return np.array(widen_f32(self.dtype, self.array()), dtype=np.float32, copy=True)


class SafetensorsFile:
    """A parsed safetensors header; the data is memory-mapped on first use."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        self._header_len = 0
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, SafetensorsTensor] = {}
        self._parse()

    # --- header
    def _parse(self) -> None:
        p = self.path
        try:
            size = os.path.getsize(p)
        except OSError as e:
            raise ConvertError(f"{p}: cannot open safetensors file ({e.strerror})") from None
        if size < 8:
            raise ConvertError(f"{p}: not a safetensors file: {size} bytes, too short for the 8-byte header length")
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise ConvertError(f"{p}: corrupt safetensors header: header length {n} at offset 0 exceeds the "
                                   f"file size {size} (truncated or not a safetensors file)")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"{p}: corrupt safetensors header: not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ConvertError(f"{p}: corrupt safetensors header: expected a JSON object")
        self._header_len = n
        data_start = 8 + n
        data_size = size - data_start
        for name, meta in header.items():
            if name == "__metadata__":
                if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                    raise ConvertError(f"{p}: corrupt safetensors header: __metadata__ must be an object of strings, "
                                       f"got {json.dumps(meta)[:60]}")
                self.metadata = dict(meta)
                continue
            self.tensors[name] = self._tensor_entry(name, meta, data_start, data_size)
        self._check_overlaps()

    def _check_overlaps(self) -> None:
        """Two tensors may not share bytes (the safetensors library refuses such a file too): sorted by offset,
        each non-empty tensor must start at or after the end of the one before."""
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values() if t.nbytes)
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ConvertError(f"{self.path}: corrupt safetensors header: the data of tensors {a!r} and {b!r} "
                                   f"overlap (bytes {start - 8 - self._header_len} to "
                                   f"{end - 8 - self._header_len} of the data section)")

    def _tensor_entry(self, name: str, meta, data_start: int, data_size: int) -> SafetensorsTensor:
        p = self.path
        if not isinstance(meta, dict):
            raise ConvertError(f"{p}: corrupt safetensors header: entry for tensor {name!r} is not an object")
        dtype, shape, offs = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise ConvertError(f"{p}: corrupt safetensors header: tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                  for o in offs)):
            raise ConvertError(f"{p}: corrupt safetensors header: tensor {name!r} has data_offsets {offs!r}, "
                               f"expected two integers [begin, end]")
        if not 0 <= offs[0] <= offs[1] <= data_size:
            raise ConvertError(f"{p}: corrupt safetensors header: tensor {name!r} has data_offsets {offs!r} outside "
                               f"the {data_size} data bytes (truncated file?)")
        # a dtype gguftool cannot convert is refused when the tensor is to be written (llama.cpp's converter
        # drops some tensors, such as rotary_emb.inv_freq, whatever their dtype)
        if not isinstance(dtype, str):
            raise ConvertError(f"{p}: corrupt safetensors header: tensor {name!r} has dtype {dtype!r}, not a name")
        if dtype in SUPPORTED_DTYPES:
            itemsize = SUPPORTED_DTYPES[dtype][0]
        elif dtype in _OTHER_DTYPES:
            itemsize = _OTHER_DTYPES[dtype]
        else:
            raise ConvertError(f"{p}: corrupt safetensors header: tensor {name!r} has unknown dtype {dtype!r}")
        n_el = 1
        for d in shape:
            n_el *= d
        if n_el * itemsize != offs[1] - offs[0]:
            raise ConvertError(f"{p}: corrupt safetensors header: tensor {name!r} {dtype}{shape} needs "
                               f"{n_el * itemsize} bytes but data_offsets {offs} give {offs[1] - offs[0]}")
        return SafetensorsTensor(name, dtype, tuple(shape), self, data_start + offs[0], offs[1] - offs[0])

    # --- data
    def buffer(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    raise ConvertError(f"{self.path}: empty file")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a numpy view still refers to it; the OS unmaps it when that goes
                pass
            self._mm = None


# --- checkpoint folder
CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """config.json + safetensors shards of one Hugging Face model folder."""

    directory: Path
    config: dict
    files: list[SafetensorsFile]
    tensors: dict[str, SafetensorsTensor] = field(default_factory=dict)  # llama.cpp's order

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        """Open a checkpoint from its folder or from one of its ``.safetensors`` files."""
        path = Path(path)
        if not path.exists():
            raise ConvertError(f"{path}: no such file or directory")
        if path.is_dir():
            directory, given = path, None
        else:
            if not path.name.endswith(".safetensors"):
                raise ConvertError(f"{path}: expected a .safetensors file or a checkpoint directory")
            directory, given = path.parent, path
        config = load_config(directory)
        files = [SafetensorsFile(p) for p in shard_paths(directory, given)]
        ck = cls(directory, config, files)
        for f in files:
            for name in sorted(f.tensors):
                ck.tensors[name] = f.tensors[name]
        index = directory / INDEX_NAME
        if index.is_file():
            listed = set(_weight_map(index))
            missing, extra = sorted(listed - set(ck.tensors)), sorted(set(ck.tensors) - listed)
            if missing or extra:
                raise ConvertError(f"{index}: weight_map and shard files disagree: "
                                   + (f"missing tensor(s) {', '.join(missing[:3])}" if missing else "")
                                   + ("; " if missing and extra else "")
                                   + (f"unlisted tensor(s) {', '.join(extra[:3])}" if extra else ""))
        return ck

    def input_files(self) -> list[Path]:
        """config.json, the index (when there is one) and the safetensors files."""
        index = self.directory / INDEX_NAME
        return [self.directory / CONFIG_NAME] + ([index] if index.is_file() else []) + [f.path for f in self.files]

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def dominant_dtype(self) -> str | None:
        """dtype of the first tensor with 2+ dimensions (llama.cpp's --outtype auto heuristic), or None."""
        for t in self.tensors.values():
            if len(t.shape) >= 2:
                return t.dtype
        return None


def load_config(directory: Path) -> dict:
    p = directory / CONFIG_NAME
    if not p.is_file():
        raise ConvertError(f"{directory}: missing {CONFIG_NAME} (the model's hyperparameters)")
    try:
        with open(p, encoding="utf-8") as f:
            cfg = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{p}: expected a JSON object")
    return cfg


def shard_paths(directory: Path, given: Path | None = None) -> list[Path]:
    """The safetensors files of a checkpoint, in llama.cpp's order (sorted by file name)."""
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = _weight_map(index)
        if not weight_map:
            raise ConvertError(f"{index}: has no 'weight_map'")
        names = sorted(set(weight_map.values()))
        paths = [directory / n for n in names]
        missing = [n for n, p in zip(names, paths) if not p.is_file()]
        if missing:
            raise ConvertError(f"{index}: shard file(s) missing: {', '.join(missing)}")
        return paths
    names = sorted(n for n in os.listdir(directory) if n.startswith("model") and n.endswith(".safetensors"))
    if given is not None and given.name not in names:
        return [given]
    if not names:
        raise ConvertError(f"{directory}: no model*.safetensors file and no {INDEX_NAME}")
    return [directory / n for n in names]


_INDEX_SCHEMA = Obj({"weight_map": Obj(values=Str())}, required=("weight_map",))


def _weight_map(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's tensor name -> shard file name, checked for shape."""
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{index}: not a valid index ({e})") from None
    return checked(str(index), data, _INDEX_SCHEMA)["weight_map"]

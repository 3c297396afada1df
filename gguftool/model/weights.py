"""The float32 weights of a model for the forward pass, read from its TensorSource on first use, within a budget.

llama.cpp multiplies by quantized / F16 weights directly; the numpy forward pass needs float32, which for a 7B
model is ~28 GB, more than the quantized file and often more than the machine has. A ``WeightStore`` keeps what
fits a memory budget and re-reads the rest from the source each time it is needed:

- float32 data that is a view of a memory-mapped file (F32 GGUF tensors, plain F32 safetensors) costs no
  memory of its own (the page cache holds it) and is always kept;
- other tensors are dequantized/widened on first use and kept while the budget allows ("resident");
- a tensor that does not fit is "streamed": read again at each use and kept only until a tensor of another
  layer is streamed (the forward pass uses a layer's weights together, from several threads).

The first forward pass therefore decides, in the order the weights are used, which are resident. With the
budget at least the model's float32 size, every weight is read once, as before.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Iterator

import numpy as np

_LAYER = re.compile(r"^blk\.(\d+)\.")


def layer_of(name: str) -> int:
    """The layer index of a ``blk.N.*`` tensor name, -1 for other tensors."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def float32_nbytes(tensor) -> int:
    """Bytes of tensor's float32 form."""
    n = 1
    for d in tensor.shape:
        n *= int(d)
    return 4 * n


def default_weight_budget() -> int:
    """Half the memory the system reports available (MemAvailable), or 4 GiB when it cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


class WeightStore(Mapping):
    """name -> float32 array (numpy order: a 2-D ggml tensor (ne0, ne1) is (ne1, ne0)); see the module docstring.

    tensors: the source's tensors. budget_bytes: memory for resident weights (None: no limit)."""

    def __init__(self, tensors, budget_bytes: int | None = None):
        self._src = {t.name: t for t in tensors}
        self._budget = budget_bytes
        self._resident: dict[str, np.ndarray] = {}
        self._streamed: dict[str, np.ndarray] = {}
        self._streamed_layer: int | None = None
        self.streamed_names: set[str] = set()     # tensors that did not fit (decided on first use)
        self.resident_bytes = 0
        self.stream_reads = 0                     # how many times a streamed tensor was read
        self._lock = threading.Lock()

    # --- Mapping
    def __getitem__(self, name: str) -> np.ndarray:
        a = self._resident.get(name)
        if a is None:
            a = self._streamed.get(name)
        if a is not None:
            return a
        if name not in self._src:
            raise KeyError(name)
        with self._lock:  # one read per tensor even when several threads ask at once
            a = self._resident.get(name)
            if a is None:
                a = self._streamed.get(name)
            if a is None:
                a = self._load(name)
        return a

    def __contains__(self, name) -> bool:
        return name in self._src

    def __iter__(self) -> Iterator[str]:
        return iter(self._src)

    def __len__(self) -> int:
        return len(self._src)

    # --- shapes without reading
    def shape(self, name: str) -> tuple[int, ...]:
        """The numpy shape tensor ``name`` has once read (reversed ggml shape; a 1-D tensor stays 1-D)."""
        return tuple(int(d) for d in reversed(self._src[name].shape))

    # --- reading
    def _read(self, name: str) -> np.ndarray:
        t = self._src[name]
        a = t.read_f32()
        a = a.reshape(-1) if len(t.shape) == 1 else a.reshape(self.shape(name))
        return np.ascontiguousarray(a, dtype=np.float32)

    def _load(self, name: str) -> np.ndarray:
        if name in self.streamed_names:
            return self._stream(name, self._read(name))
        a = self._read(name)
        cost = a.nbytes if a.flags.writeable else 0  # a read-only array is a view of a file map
        if self._budget is not None and cost and self.resident_bytes + cost > self._budget:
            self.streamed_names.add(name)
            return self._stream(name, a)
        self._resident[name] = a
        self.resident_bytes += cost
        return a

    def _stream(self, name: str, a: np.ndarray) -> np.ndarray:
        layer = layer_of(name)
        if layer != self._streamed_layer:
            self._streamed = {}   # the previous layer's streamed tensors are no longer needed
            self._streamed_layer = layer
        self._streamed[name] = a
        self.stream_reads += 1
        return a

    @property
    def streamed_bytes(self) -> int:
        return sum(float32_nbytes(self._src[n]) for n in self.streamed_names)

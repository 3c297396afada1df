"""Writing a file behind the caller's back: GGUFWriter's ``write_behind`` option.

:class:`WriteBehind` stands in for an open output file. Writes are queued (no copy: the caller's buffers are
kept), and once at least :data:`BATCH_BYTES` are queued and no batch is in flight, everything queued goes to a
background thread that writes it with ``os.writev``. That system call runs without the GIL, so the page-cache
copy of the output overlaps whatever the caller does next (for the quantize pipeline: the next slab's numba
kernels, which hold the GIL). Order is kept (one batch in flight at a time); ``flush()`` and ``close()`` write
what is left; a write error is raised by the next write, flush or close.
"""
from __future__ import annotations

import os
import threading
from typing import BinaryIO

__all__ = ["WriteBehind", "BATCH_BYTES", "available"]

# queued bytes that make a batch worth a thread hand-over (smaller writes wait for more)
BATCH_BYTES = 1 << 20
_MAX_IOV = 512      # buffers per writev call (IOV_MAX is 1024 on Linux)


def available() -> bool:
    """Whether this platform has os.writev (not on Windows): without it, write synchronously."""
    return hasattr(os, "writev")


class WriteBehind:
    """A write-only file over ``f`` (an open binary file, flushed here first; closed by ``close()``).

    The buffers given to ``write`` are written later, by another thread: they must not be modified afterwards."""

    def __init__(self, f: BinaryIO):
        f.flush()
        self._f = f
        self._fd = f.fileno()
        self._queue: list[memoryview | bytes] = []
        self._queued = 0
        self._idle = threading.Event()
        self._idle.set()
        self._err: BaseException | None = None
        self._closed = False

    def fileno(self) -> int:
        return self._fd

    def write(self, data) -> int:
        if self._err is not None:
            raise self._err
        mv = data if isinstance(data, bytes) else memoryview(data).cast("B")
        self._queue.append(mv)
        self._queued += len(mv)
        if self._queued >= BATCH_BYTES and self._idle.is_set():
            self._start_batch()
        return len(mv)

    def flush(self) -> None:
        self._wait()
        self._write_all(self._take())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            self._f.close()

    # --- internals
    def _take(self) -> list[memoryview | bytes]:
        q, self._queue, self._queued = self._queue, [], 0
        return q

    def _write_all(self, bufs: list[memoryview | bytes]) -> None:
        i = 0
        while i < len(bufs):
            batch = bufs[i:i + _MAX_IOV]
            i += len(batch)
            while batch:
                k = os.writev(self._fd, batch)
                while batch and k >= len(batch[0]):
                    k -= len(batch[0])
                    batch.pop(0)
                if batch and k:
                    batch[0] = memoryview(batch[0])[k:]

    def _wait(self) -> None:
        self._idle.wait()
        if self._err is not None:
            raise self._err

    def _start_batch(self) -> None:
        bufs = self._take()
        started = threading.Event()
        self._idle.clear()

        def run():
            started.set()
            try:
                self._write_all(bufs)
            except BaseException as e:  # reported by the next write, flush or close
                self._err = e
            finally:
                self._idle.set()

        threading.Thread(target=run, name="gguftool-write", daemon=True).start()
        # the thread is about to enter writev (which releases the GIL): a caller that goes on into code holding
        # the GIL (numba kernels) would otherwise keep the thread from starting until it returns
        started.wait()

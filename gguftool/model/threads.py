"""How the forward pass uses the CPU: BLAS single-threaded, the work split over rows / heads on a thread pool.

numpy releases the GIL in matrix products and ufuncs, so plain Python threads run them in parallel. OpenBLAS's
own threads fare badly on the many small products of a layer, so the BLAS library is held at one thread
(through ``threadpoolctl``, which finds OpenBLAS / MKL / BLIS however numpy was built).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

from threadpoolctl import ThreadpoolController

J = TypeVar("J")
R = TypeVar("R")


def set_num_threads(n: int) -> bool:
    """Set the thread count of the BLAS library numpy uses (OpenBLAS, MKL, BLIS). True when it could be set."""
    blas = ThreadpoolController().select(user_api="blas")
    if not blas.info():
        return False
    blas.limit(limits=int(n))
    return True


class WorkerPool:
    """``n`` worker threads (none when ``n`` is 1: jobs run in the calling thread)."""

    def __init__(self, n: int = 1):
        self.n_threads = 1
        self._pool: ThreadPoolExecutor | None = None
        self.resize(n)

    def resize(self, n: int) -> None:
        n = max(1, int(n))
        if n != self.n_threads:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = ThreadPoolExecutor(n) if n > 1 else None
            self.n_threads = n
        set_num_threads(1)

    def map(self, fn: Callable[[J], R], jobs: Iterable[J]) -> list[R]:
        """fn(job) for every job, on the pool when there is one; results in order."""
        jobs = list(jobs)
        if self._pool is None or len(jobs) < 2:
            return [fn(j) for j in jobs]
        return list(self._pool.map(fn, jobs))

    def row_ranges(self, n: int, min_rows: int = 16) -> list[tuple[int, int]]:
        """[r0, r1) ranges splitting n rows over the threads, at least ``min_rows`` rows each."""
        if n <= 0:
            return []
        parts = max(1, min(self.n_threads, n // min_rows))
        step = -(-n // parts)
        return [(r, min(n, r + step)) for r in range(0, n, step)]

"""One type per tensor: the least predicted KL-divergence whose bytes fit a budget (a multiple-choice knapsack).

The predicted KL-divergence of a mix is the sum of the tensors' ``D[t, q]`` (measure.py). The solver:

1. Lagrangian relaxation: for a price ``lam`` per byte every tensor takes ``argmin_q D[t, q] + lam * bytes[t, q]``
   (a point of its lower convex hull); the smallest ``lam`` whose mix fits is found by bisection;
2. greedy fill: the bytes left are spent on the upgrades with the best ``ΔD / Δbytes`` that still fit (any
   candidate, not only hull points), until none fits;
3. the result is compared with every given alternative (the stock mix): the lowest predicted D that fits wins,
   so the stock mix is never beaten in the wrong direction by this measure.

Bytes are counted as written: each tensor's data padded to the file's alignment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from ..gguf.constants import GGMLType
from .candidates import TensorSlot

__all__ = ["Choice", "solve", "fit", "padded"]


def padded(n: int, alignment: int = 32) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass
class Choice:
    types: dict[str, GGMLType]
    nbytes: int               # padded data bytes of the slots
    predicted: float          # sum of D


Cost = Callable[[str, GGMLType], float]


def _evaluate(slots: Sequence[TensorSlot], types: Mapping[str, GGMLType], cost: Cost, alignment: int) -> Choice:
    return Choice(dict(types), sum(padded(s.nbytes(types[s.name]), alignment) for s in slots),
                  sum(cost(s.name, types[s.name]) for s in slots))


def _at_price(slots: Sequence[TensorSlot], cost: Cost, lam: float, alignment: int) -> dict[str, GGMLType]:
    out = {}
    for s in slots:
        out[s.name] = min(s.candidates, key=lambda t: (cost(s.name, t) + lam * padded(s.nbytes(t), alignment),
                                                       s.nbytes(t)))
    return out


def _greedy_fill(slots: Sequence[TensorSlot], types: dict[str, GGMLType], cost: Cost, budget: int,
                 alignment: int) -> dict[str, GGMLType]:
    used = sum(padded(s.nbytes(types[s.name]), alignment) for s in slots)
    while True:
        best = None
        for s in slots:
            cur = types[s.name]
            b0, d0 = padded(s.nbytes(cur), alignment), cost(s.name, cur)
            for t in s.candidates:
                db = padded(s.nbytes(t), alignment) - b0
                dd = d0 - cost(s.name, t)
                if dd <= 0 or used + db > budget:
                    continue
                gain = dd / db if db > 0 else float("inf")
                if best is None or gain > best[0]:
                    best = (gain, s.name, t, db)
        if best is None:
            return types
        _, name, t, db = best
        types[name] = t
        used += db


def fit(slots: Sequence[TensorSlot], types: Mapping[str, GGMLType], cost: Cost, budget: int,
        alignment: int = 32) -> dict[str, GGMLType] | None:
    """``types`` made to fit ``budget`` by the downgrades that cost the least predicted D per byte saved (None
    when even the smallest candidates don't fit)."""
    out = dict(types)
    used = sum(padded(s.nbytes(out[s.name]), alignment) for s in slots)
    while used > budget:
        best = None
        for s in slots:
            cur = out[s.name]
            b0, d0 = padded(s.nbytes(cur), alignment), cost(s.name, cur)
            for t in s.candidates:
                saved = b0 - padded(s.nbytes(t), alignment)
                if saved <= 0:
                    continue
                loss = max(cost(s.name, t) - d0, 0.0) / saved
                if best is None or loss < best[0] or (loss == best[0] and saved > best[3]):
                    best = (loss, s.name, t, saved)
        if best is None:
            return None
        _, name, t, saved = best
        out[name] = t
        used -= saved
    return out


def solve(slots: Sequence[TensorSlot], cost: Cost, budget: int, alternatives: Sequence[Mapping[str, GGMLType]] = (),
          alignment: int = 32) -> Choice | None:
    """The mix of least predicted D within ``budget`` padded data bytes (see the module docstring); None when
    even the smallest candidates of every tensor don't fit."""
    smallest = {s.name: min(s.candidates, key=s.nbytes) for s in slots}
    if _evaluate(slots, smallest, cost, alignment).nbytes > budget:
        return None
    def size_at(log_lam: float) -> int:
        return _evaluate(slots, _at_price(slots, cost, 10.0 ** log_lam, alignment), cost, alignment).nbytes

    # bytes fall as the price per byte rises: bisect log10(price) for the cheapest price that fits
    lo, hi = -30.0, 10.0
    if size_at(hi) > budget:
        types = smallest
    else:
        for _ in range(50):
            mid = (lo + hi) / 2
            if size_at(mid) > budget:
                lo = mid
            else:
                hi = mid
        types = _at_price(slots, cost, 10.0 ** hi, alignment)
    types = _greedy_fill(slots, types, cost, budget, alignment)
    best = _evaluate(slots, types, cost, alignment)
    for alt in alternatives:
        alt_fit = fit(slots, alt, cost, budget, alignment)
        if alt_fit is None:
            continue
        c = _evaluate(slots, alt_fit, cost, alignment)
        if c.predicted < best.predicted:
            best = c
    return best

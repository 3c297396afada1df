"""The block functions of registry.py's interface that several type modules share unchanged."""
from __future__ import annotations

from numba import njit


@njit(cache=True)
def no_scratch():
    """make_scratch of the types whose blocks need no scratch (F16, BF16, Q8_0)."""
    return ()


@njit(cache=True)
def no_row_state(x, qw, s):
    """prepare_row of the types whose blocks use nothing computed over the whole row (all but the legacy
    types' importance path)."""
    return None

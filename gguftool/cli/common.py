"""What every subcommand shares: turning library errors into one-line messages and exit status 1."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from typing import NoReturn

import click

from ..errors import GGUFError


def report_errors(func):
    """Decorator for a click command body: GGUFError / OSError / KeyboardInterrupt -> 'Error: ...', exit 1.

    SIGTERM and SIGHUP (``kill``, ``timeout``, a batch scheduler, a closed terminal) interrupt the command as
    Ctrl-C does, so that they unwind the same way (see _interrupts). Library code cleans up its own partial output
    (gguftool.outfile), so nothing is left to undo here.
    """
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with _interrupts():
                return func(*args, **kwargs)
        except GGUFError as e:
            fail(str(e))
        except MemoryError:
            fail("out of memory")
        except OSError as e:
            where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
            fail(f"{e.strerror or e}{':' if where else ''}{where}")
        except KeyboardInterrupt:
            fail("interrupted")
    return wrapper


@contextlib.contextmanager
def _interrupts():
    """While active (in the main thread): SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, unless they are
    ignored (nohup, a background job); and an interrupt that landed in a callback which swallows exceptions
    (llvmlite's ctypes callbacks, a __del__: Python prints "Exception ignored ...") is raised again at the next
    chance instead of being lost. The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = []
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            saved.append((sig, signal.signal(sig, _interrupt)))
    previous_hook = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _delivered:
            # the same signal again in a moment, from another thread: by then the callback has returned
            again = threading.Timer(0.01, os.kill, (os.getpid(), _delivered[-1]))
            again.daemon = True
            again.start()
        else:
            previous_hook(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for sig, handler in reversed(saved):
            signal.signal(sig, handler)


_delivered: list[int] = []    # the signals _interrupt turned into KeyboardInterrupt


def _interrupt(signum, frame):
    _delivered.append(signum)
    raise KeyboardInterrupt


def skip_numba_blas_probe() -> None:
    """Start numba's array-math support without its BLAS probe, for a command process that runs kernels.

    When numba first loads a compiled kernel it imports numba.np.arraymath, which probes for BLAS by importing
    scipy.linalg: 0.3-0.4 s, a tenth of a fast quantization's wall time. No gguftool kernel uses a
    BLAS-backed numba function (np.dot, np.linalg), so the probe is answered "no BLAS" by hiding scipy.linalg
    for that one import. This changes numba for the rest of the process, which is why only the command line
    (which owns its process) does it and the library never does. No-op when scipy.linalg or the registry is
    already loaded, or scipy is not installed."""
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return
    sys.modules["scipy.linalg"] = None    # makes "import scipy.linalg..." fail at once
    try:
        import numba.np.arraymath  # noqa: F401
    except ImportError:
        pass
    finally:
        if sys.modules.get("scipy.linalg", 0) is None:
            del sys.modules["scipy.linalg"]


def fail(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)

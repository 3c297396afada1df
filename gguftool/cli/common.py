"""What every subcommand shares: the options that mean the same everywhere (-t/--threads, -o/--output, --force),
and turning library errors into one-line messages and exit status 1.

The short flags follow llama.cpp's tools (llama-imatrix, llama-perplexity), and each means one thing in every
subcommand: -m model, -f input text file, -o output, -c context size, -b batch size, -t threads. Output types are
``--type`` (long only); ``--force`` has no short flag.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from typing import Callable, NoReturn, TypeVar

import click

from ..errors import GGUFError

F = TypeVar("F", bound=Callable)

# --- options shared by the subcommands


def threads_option(func: F) -> F:
    """-t/--threads N: worker threads for the kernels and the forward pass; None (not given) = all cores."""
    return click.option("-t", "--threads", "threads", type=click.IntRange(min=1), metavar="N", default=None,
                        help="Threads (default: all cores).")(func)


def exact_option(func: F) -> F:
    """--exact: the forward pass of an F16 model bit for bit llama.cpp's x86 CPU graph (gguftool.model.tinyblas); BF16
    models always are."""
    return click.option("--exact", "exact", is_flag=True,
                        help="F16 models: sum the products in llama.cpp's order (tinyBLAS), so the figures are bit "
                             "for bit llama.cpp's x86 CPU ones (BF16 models always are); ~10% slower.")(func)


def force_option(func: F) -> F:
    """--force (no short flag): overwrite an existing output file; an input file is never overwritten."""
    return click.option("--force", "force", is_flag=True,
                        help="Overwrite the output file if it exists (never an input file).")(func)


def ray_option(func: F) -> F:
    """--ray [ADDRESS]: run on a Ray cluster; a bare --ray (or ``local``) starts a local one, ``auto`` joins this
    machine's (gguftool.distributed.cluster). Passed as ``ray_address``: None when not given. A bare --ray takes
    the next word as its address, so it goes after the positional arguments (or is written --ray local)."""
    return click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
                        metavar="[ADDRESS]",
                        help="Run on a Ray cluster: 'local' (or a bare --ray last) starts one on this machine, "
                             "'auto' joins this machine's, or give its address (needs: pip install "
                             "'gguftool[ray]').")(func)


def text_file_option(dest: str, help: str, *, aliases: tuple[str, ...] = ()) -> Callable[[F], F]:
    """-f/--file FILE: the input text (llama-imatrix's and llama-perplexity's -f), passed as ``dest``; ``aliases``
    are extra long names (imatrix's --calib)."""
    return click.option("-f", "--file", *aliases, dest, metavar="FILE", help=help, type=click.Path(path_type=str))


def output_option(dest: str, help: str, *, aliases: tuple[str, ...] = (), default: str | None = None,
                  positional: str | None = None, required: bool = False) -> Callable[[F], F]:
    """-o/--output PATH, passed to the command as ``dest``.

    ``aliases`` are extra long names (convert keeps convert_hf_to_gguf.py's --outfile). With ``positional`` (a
    metavar such as "OUT.gguf") the output may also be given as a positional argument, as llama-quantize takes it;
    put the decorator where that argument belongs among the others. Two different paths are an error, and with
    ``required`` so is none (quantize --dry-run needs no output, edit always does)."""
    path = click.Path(path_type=str)   # a directory is the command's one-line error (exit 1), not a usage error

    def decorate(func: F) -> F:
        if positional is None:
            return click.option("-o", "--output", *aliases, dest, metavar="PATH", default=default, type=path,
                                show_default=default is not None, help=help)(func)

        @functools.wraps(func)
        def merged(*args, **kwargs):
            given, opt = kwargs.get(dest), kwargs.pop("output_opt")
            if given is not None and opt is not None and given != opt:
                fail(f"two outputs given: {given!r} and {opt!r}")
            if given is None and opt is None and required:
                fail(f"missing {positional} (or -o/--output)")
            kwargs[dest] = given if given is not None else opt
            return func(*args, **kwargs)

        merged = click.option("-o", "--output", *aliases, "output_opt", metavar="PATH", type=path,
                              help=f"{help} (the same as {positional}).")(merged)
        return click.argument(dest, metavar=positional, required=False, type=path)(merged)  # type: ignore
    return decorate


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
        except BrokenPipeError:
            raise    # stdout's reader went away (`gguftool ... | head`): the entry point ends quietly (cli/__init__)
        except OSError as e:
            where = f" {e.filename!r}" if e.filename else ""
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


def end_startup(load_kernels: bool) -> None:
    """quantize and convert, once gguftool.api is imported: with ``load_kernels`` (a run that will quantize),
    numba's runtime is loaded now (skip_numba_blas_probe, then gguftool.quants.load_runtime), still inside the
    start-up phase of gguftool.cli.startup; then that phase ends."""
    from . import startup

    if load_kernels:
        skip_numba_blas_probe()
        from ..quants import load_runtime

        load_runtime()
    startup.done()


def skip_numba_blas_probe() -> None:
    """Start numba's array-math support without its BLAS probe, for a command process that runs kernels.

    When numba first compiles or loads a kernel, its CPU target imports numba.np.arraymath
    (CPUContext.load_additional_registries), whose module-level ``_HAVE_BLAS = _check_blas()`` imports
    scipy.linalg.cython_blas, i.e. all of scipy.linalg. Measured (numba 0.68.1, scipy 1.17.1, 2-core AMD EPYC,
    fresh processes): that import is 0.10 s of CPU with the probe skipped and 0.36 s without (6 pairs); a whole
    ``python -m gguftool quantize`` of a 5.5 MiB F32 model to Q4_K_M takes 1.74 s of CPU with the skip and 1.99 s
    without (median of 10 interleaved pairs): an eighth of a small quantization.

    Why this way: numba has no setting for the probe (numba.core.config has none), the import cannot be made
    lazy from outside (it runs at arraymath's import, which any @njit kernel triggers), and a None entry in
    sys.modules is Python's documented way to make one import fail (language reference, "The module cache").
    The effect: numba believes there is no BLAS, so np.dot / np.vdot inside a jitted function would use its plain
    loop; no gguftool kernel calls them (nor np.linalg, which checks BLAS again when typed and still works).
    If a numba release drops the probe, this becomes a no-op, never an error. It changes numba for the rest of
    the process, which is why only the command line (which owns its process) does it and the library never does.
    No-op when scipy.linalg or the registry is already loaded, or scipy is not installed."""
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

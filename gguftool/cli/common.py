"""What every subcommand shares: the options that mean the same everywhere (-t/--threads, -o/--output, --force),
and turning library errors into one-line messages and exit status 1.

The short flags follow llama.cpp's tools (llama-imatrix, llama-perplexity), and each means one thing in every
subcommand: -m model, -f input text file, -o output, -c context size, -b batch size, -t threads. Output types are
``--type`` (long only); ``--force`` has no short flag.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, NoReturn, TypeVar

import click

from ..errors import GGUFError

F = TypeVar("F", bound=Callable)

# --- options shared by the subcommands


def threads_option(func: F) -> F:
    """-t/--threads N: worker threads for the kernels and the forward pass; None (not given) = all cores."""
    return click.option("-t", "--threads", "threads", type=click.IntRange(min=1), metavar="N", default=None,
                        help="Threads (default: all cores).")(func)


def force_option(func: F) -> F:
    """--force (no short flag): overwrite an existing output file; an input file is never overwritten."""
    return click.option("--force", "force", is_flag=True,
                        help="Overwrite the output file if it exists (never an input file).")(func)


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

    Library code cleans up its own partial output (temp file + rename), so nothing is left to undo here.
    """
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except GGUFError as e:
            fail(str(e))
        except MemoryError:
            fail("out of memory")
        except BrokenPipeError:
            raise    # stdout's reader went away (`gguftool ... | head`): the entry point ends quietly (cli/__init__)
        except OSError as e:
            where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
            fail(f"{e.strerror or e}{':' if where else ''}{where}")
        except KeyboardInterrupt:
            fail("interrupted")
    return wrapper


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

"""What every subcommand shares: turning library errors into one-line messages and exit status 1."""
from __future__ import annotations

import functools
import sys
from typing import NoReturn

import click

from ..errors import GGUFError


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
        except OSError as e:
            where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
            fail(f"{e.strerror or e}{':' if where else ''}{where}")
        except KeyboardInterrupt:
            fail("interrupted")
    return wrapper


def fail(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)

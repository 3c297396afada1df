"""The ``gguftool`` command: a click group whose subcommands live one per module and load lazily.

Each subcommand module (``gguftool/cli/<name>_cmd.py``) defines a click command named ``command``. Only the
module of the command being run is imported, so ``gguftool inspect`` never pays for numba.

``gguftool ... | head``: when stdout's reader goes away, every subcommand stops quietly (LazyGroup.invoke; click
itself does the same for --help and usage errors).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys

import click

from .. import __version__
from . import startup

# command name -> (module, one-line help shown by `gguftool --help`)
COMMANDS = {
    "convert": ("gguftool.cli.convert_cmd", "Hugging Face safetensors checkpoint -> (quantized) GGUF in one step."),
    "quantize": ("gguftool.cli.quantize_cmd", "Quantize a GGUF file with llama.cpp's type mixes (Q4_K_M, Q6_K ...)."),
    "inspect": ("gguftool.cli.inspect_cmd", "Show what a GGUF file holds: metadata, tokenizer, tensors."),
    "edit": ("gguftool.cli.edit_cmd", "Change a GGUF file's metadata without touching its tensors."),
    "imatrix": ("gguftool.cli.imatrix_cmd", "Compute an importance matrix from calibration text."),
    "perplexity": ("gguftool.cli.perplexity_cmd", "Perplexity and KL-divergence on a text, as llama-perplexity."),
}


# commands that end the start-up phase themselves (gguftool.cli.startup.done), once numba is loaded
_OWN_STARTUP = frozenset({"convert", "quantize"})


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name, (module, _) in COMMANDS.items() if importlib.util.find_spec(module) is not None]

    def get_command(self, ctx, name):
        entry = COMMANDS.get(name)
        if entry is None:
            return None
        try:
            module = importlib.import_module(entry[0])
        except ModuleNotFoundError as e:
            if e.name == entry[0]:
                return None
            raise
        return module.command

    def make_context(self, info_name, args, parent=None, **extra):
        with _usage_errors_exit_1():
            return super().make_context(info_name, args, parent=parent, **extra)

    def __call__(self, *args, **kwargs):
        # the process entry (console script, python -m gguftool); CliRunner and other callers use main()
        with startup.process(exits=kwargs.get("standalone_mode", True)):
            return super().__call__(*args, **kwargs)

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        if name not in _OWN_STARTUP:
            startup.done()
        return name, cmd, rest

    def invoke(self, ctx):
        try:
            with _usage_errors_exit_1():
                return super().invoke(ctx)
        except BrokenPipeError:
            # the reader of stdout went away: point stdout at /dev/null so that Python's final flush of what is
            # still buffered has nowhere to fail, and stop without a traceback or message
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(1)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@contextlib.contextmanager
def _usage_errors_exit_1():
    """A usage error (unknown option, value of the wrong type, missing argument) ends with exit status 1 like
    every other error, not click's 2: scripts test one status for "the command refused its input"."""
    try:
        yield
    except click.UsageError as e:
        e.exit_code = 1
        raise


@click.group(cls=LazyGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gguftool")
@click.pass_context
def main(ctx):
    """Convert, quantize, inspect and edit GGUF files (llama.cpp's model format).

    The tensors gguftool writes are byte-identical to llama.cpp's for the same input and options.
    """
    if ctx.invoked_subcommand is None:   # bare `gguftool`: the help, as a first contact (stdout, status 0)
        click.echo(ctx.get_help())

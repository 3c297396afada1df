"""``gguftool inspect FILE``: print what a GGUF file holds (metadata, tokenizer, tensors, totals)."""
from __future__ import annotations

import sys

import click

from .common import report_errors


@click.command("inspect")
@click.argument("file", type=click.Path(dir_okay=True, path_type=str))
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document {version, alignment, file_size, data_offset, metadata, "
                   "metadata_types, tensors, summary} instead of text. Arrays longer than 64 are summarised as "
                   "{array_of, length, head} unless --full.")
@click.option("--full", is_flag=True, help="Print every element of long arrays (the whole vocabulary, all "
                                            "scores and merges) and long strings uncut.")
@click.option("--no-tensors", is_flag=True, help="Leave out the tensor table (the totals are still shown).")
@click.option("--filter", "pattern", metavar="GLOB",
              help="Only tensors whose name matches this shell-style pattern, e.g. 'blk.0.*' or '*attn_q*'; "
                   "totals cover the matching tensors.")
@report_errors
def command(file, as_json, full, no_tensors, pattern):
    """Show what the GGUF FILE holds: format version, alignment, size, metadata (long arrays and strings
    shortened), a tokenizer summary, the tensor table and totals (parameters, bytes, bits per weight, tensors
    per type). Reads only the header; tensor data are not touched."""
    from ..gguf.reader import GGUFReader
    from ..tools import inspect_report

    with GGUFReader(file) as reader:
        if as_json:
            text = inspect_report.report_json(reader, full=full, tensors=not no_tensors, pattern=pattern)
        else:
            text = inspect_report.render_human(reader, tensors=not no_tensors, pattern=pattern, full=full)
    out = sys.stdout
    try:
        out.write(text)
        out.write("\n")
        out.flush()
    except UnicodeEncodeError:
        # a terminal that cannot show some characters: fall back to escapes rather than failing
        out.buffer.write(text.encode(out.encoding or "utf-8", "backslashreplace") + b"\n")
        out.flush()

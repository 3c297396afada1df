"""``gguftool edit IN OUT``: change metadata, keep the tensors byte for byte."""
from __future__ import annotations

import click

from .common import force_option, output_option, report_errors


@click.command("edit")
@click.argument("input_file", metavar="IN", type=click.Path(path_type=str))
@output_option("output_file", "Output file", positional="OUT", required=True)
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
              help="Set a metadata key (repeatable). An existing key keeps its type (a uint32 stays uint32); "
                   "a new key needs KEY=TYPE:VALUE with TYPE one of int (64-bit), uint32, int32, float "
                   "(float32), bool, str. Arrays cannot be set.")
@click.option("--remove", multiple=True, metavar="KEY", help="Remove a metadata key (repeatable).")
@click.option("--chat-template-file", type=click.Path(path_type=str),
              metavar="FILE", help="Set tokenizer.chat_template to the contents of FILE (UTF-8 text).")
@force_option
@report_errors
def command(input_file, output_file, set_items, remove, chat_template_file, force):
    """Copy the GGUF file IN to OUT with edited metadata. Tensor data are copied verbatim, never decoded;
    with no changes OUT is byte-identical to IN. OUT is written to a temporary file and renamed when
    complete."""
    from ..outfile import check_outputs
    from ..tools.edit import edit_file

    check_outputs([output_file], [input_file] + ([chat_template_file] if chat_template_file else []), overwrite=force)
    result = edit_file(input_file, output_file, set_items=set_items, remove=remove,
                       chat_template_file=chat_template_file, overwrite=force)
    parts = []
    if result.set:
        parts.append("set " + ", ".join(result.set))
    if result.removed:
        parts.append("removed " + ", ".join(result.removed))
    if result.relaid:
        parts.append("tensors re-aligned")
    click.echo(f"wrote {output_file}: " + ("; ".join(parts) if parts else "no metadata changes"))

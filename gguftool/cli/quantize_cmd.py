"""``gguftool quantize IN.gguf OUT.gguf --type TYPE``: llama-quantize's ftype mixes, byte-identical output.

Argument handling, the progress bar and the printed tables live here; the decisions are gguftool.pipeline.policy and
the work gguftool.pipeline.
"""
from __future__ import annotations

import os

import click

from .common import fail, report_errors
from .quantize_options import (TYPES_HELP, apply_split_options, build_config, policy_files, policy_options,
                               print_plan, print_summary, run_with_progress, split_options, warn)


@click.command("quantize")
@click.argument("inp", metavar="IN.gguf", type=click.Path(dir_okay=False, path_type=str))
@click.argument("out", metavar="OUT.gguf", type=click.Path(dir_okay=False, path_type=str), required=False)
@click.option("--type", "-t", "type_", metavar="TYPE", required=True, help=f"The mix to produce: {TYPES_HELP}.")
@policy_options
@click.option("--allow-requantize", is_flag=True,
              help="Accept already-quantized input tensors (dequantized first; lower quality).")
@click.option("--dry-run", is_flag=True, help="Print the per-tensor plan, sizes and bits per weight; write "
                                              "nothing (OUT may be omitted).")
@click.option("--stats", is_flag=True, help="Print each converted tensor's RMS error against the source (and, "
                                            "with --imatrix, the importance-weighted RMS error).")
@click.option("--keep-split", is_flag=True,
              help="Write the output in the same splits as a split input (OUT-00001-of-0000N.gguf ...; OUT's .gguf "
                   "is dropped), tensors in file order, as llama-quantize --keep-split.")
@split_options
@click.option("--threads", type=click.IntRange(min=1), metavar="N", help="Threads (default: all cores).")
@click.option("--force", "-f", is_flag=True, help="Overwrite OUT if it exists.")
@report_errors
def command(inp, out, type_, allow_requantize, dry_run, stats, keep_split, split_max_size, split_max_tensors, threads,
            force, **policy):
    """Quantize the GGUF file IN.gguf to OUT.gguf with llama.cpp's per-tensor type mix for TYPE.

    The tensors written are byte-identical to llama-quantize's for the same input and options. The output is
    written to a temporary file and renamed when complete.
    """
    from ..pipeline import plan as PL
    from ..pipeline import policy as P
    from ..gguf.source import open_gguf_source
    from ..outfile import check_outputs

    ftype = P.parse_ftype(type_)
    if out is None and not dry_run:
        fail("missing OUT.gguf (only --dry-run works without an output file)")
    if not os.path.exists(inp):
        fail(f"{inp}: no such file")
    cfg = build_config(ftype, allow_requantize=allow_requantize, **policy)
    cfg.keep_split = keep_split
    apply_split_options(cfg, split_max_size, split_max_tensors)

    with open_gguf_source(inp) as src:
        plan = PL.make_plan(src, cfg, dry_run=dry_run)
        inputs = src.input_files() + policy_files(policy)    # every split of a split model is an input
        if out is not None and not dry_run:
            check_outputs([path for path, _, _ in PL.output_files(plan, out)], inputs, overwrite=force)
        for w in plan.warnings:
            warn(w)
        if dry_run:
            print_plan(plan, ftype)
            return
        summary = run_with_progress(src, plan, out, threads, stats, force, inputs)
    print_summary(summary, plan, stats, inp)

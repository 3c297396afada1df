"""``gguftool quantize IN.gguf OUT.gguf --type TYPE``: llama-quantize's ftype mixes, byte-identical output.

Argument handling, the progress bar and the printed tables live here; the work is gguftool.api.plan_quantize
(gguftool.pipeline).
"""
from __future__ import annotations

import click

from .common import end_startup, fail, force_option, output_option, report_errors, threads_option
from .quantize_options import (TYPES_HELP, SearchBar, cluster_options, policy_options, print_allocation, print_plan, print_summary,
                               run_with_progress, split_options, warn)


@click.command("quantize")
@click.argument("inp", metavar="IN.gguf", type=click.Path(dir_okay=False, path_type=str))
@output_option("out", "Output file", positional="OUT.gguf")
@click.option("--type", "type_", metavar="TYPE",
              help=f"The mix to produce: {TYPES_HELP}. With --target-size/--target-bpw: the stock mix compared "
                   f"with (optional).")
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
@cluster_options
@threads_option
@force_option
@report_errors
def command(inp, out, type_, allow_requantize, dry_run, stats, keep_split, split_max_size, split_max_tensors, threads,
            force, ray_address, ray_no_shared_fs, **policy):
    """Quantize the GGUF file IN.gguf to OUT.gguf with llama.cpp's per-tensor type mix for TYPE.

    The tensors written are byte-identical to llama-quantize's for the same input and options. The output is
    written to a temporary file and renamed when complete.
    """
    from .. import api
    from ..outfile import check_outputs

    end_startup(load_kernels=not dry_run)

    if out is None and not dry_run:
        fail("missing OUT.gguf (only --dry-run works without an output file)")
    options = api.QuantizeOptions(split_max_size=split_max_size, split_max_tensors=split_max_tensors, **policy)
    if type_ is None and not options.has_target:
        fail("missing --type (or --target-size / --target-bpw)")
    if options.has_target and out is not None and not dry_run:
        from ..outfile import check_outputs as check_early

        check_early([out], [inp], overwrite=force)   # before the search, not after it
    bar = SearchBar()
    try:
        job = api.plan_quantize(inp, out, type=type_, allow_requantize=allow_requantize, keep_split=keep_split,
                                dry_run=dry_run, options=options, threads=threads, search_progress=bar)
    finally:
        bar.close()
    with job:
        if out is not None and not dry_run:
            check_outputs(job.output_paths(), job.inputs, overwrite=force)   # every split of a split model is an input
        for w in job.warnings:
            warn(w)
        if dry_run:
            if job.allocation is not None:
                print_allocation(job.allocation)
            else:
                print_plan(job.plan, job.ftype)
            return
        summary = run_with_progress(job, threads, stats, force, ray_address, not ray_no_shared_fs)
    print_summary(summary, job.plan, stats, inp)

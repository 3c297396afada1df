"""``gguftool imatrix MODEL --calib FILE``: importance matrix from calibration text, as llama-imatrix computes it."""
from __future__ import annotations

import math
import sys

import click

from .common import exact_option, fail, force_option, output_option, ray_option, report_errors, text_file_option, threads_option


@click.command("imatrix")
@click.argument("model_arg", metavar="MODEL", required=False, type=click.Path(path_type=str))
@click.option("-m", "--model", "model_opt", type=click.Path(path_type=str),
              help="The model (same as the positional MODEL): a GGUF file (F32, F16, BF16 or quantized) or a "
                   "Hugging Face checkpoint (directory or .safetensors file).")
@text_file_option("calib", "Calibration text (UTF-8). May be left out when --in-file files are only combined.",
                  aliases=("--calib",))
@output_option("output", "Output imatrix file.", default="imatrix.gguf")
@click.option("-c", "--ctx", "n_ctx", default=512, show_default=True, type=int,
              help="Tokens per chunk (llama-imatrix --ctx-size).")
@click.option("--chunks", "n_chunks", default=-1, show_default=True, type=int,
              help="Evaluate at most this many chunks (-1: all the text gives).")
@threads_option
@exact_option
@click.option("--output-format", "fmt", type=click.Choice(["gguf", "dat"]), default="gguf", show_default=True,
              help="GGUF imatrix format, or llama.cpp's legacy .dat format.")
@click.option("--process-output", is_flag=True,
              help="Also collect output.weight (never collected when the output is tied to token_embd).")
@click.option("--in-file", "in_files", multiple=True, type=click.Path(path_type=str),
              help="Existing imatrix file (GGUF or .dat) to merge into the result; repeatable.")
@click.option("--save-frequency", "save_freq", default=0, type=int,
              help="Also save a snapshot OUTPUT.at_N every N chunks (0: never).")
@click.option("--no-ppl", is_flag=True, help="Do not compute perplexity.")
@click.option("-b", "--batch-size", "batch", default=2048, show_default=True, type=int,
              help="Tokens evaluated together (several chunks at once when larger than --ctx).")
@click.option("--max-weight-memory", "weight_gib", type=click.FloatRange(min=0), metavar="GIB", hidden=True,
              help="Obsolete and ignored: the weights stay in their stored form (peak memory about the model "
                   "file's size), widened to float32 a slab at a time.")
@ray_option
@click.option("--ray-workers", "ray_workers", type=int, metavar="N",
              help="With --ray: the number of workers, each holding the model and evaluating -t threads "
                   "(default: as many as the cluster's CPUs allow, 1 thread each).")
@click.option("--ray-stages", "ray_stages", type=int, default=1, show_default=True, metavar="S",
              help="With --ray: split each worker's model over S actors holding a share of the layers each "
                   "(passing the hidden states on), for a model one worker cannot hold.")
@force_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@report_errors
def command(model_arg, model_opt, calib, output, n_ctx, n_chunks, threads, exact, fmt, process_output, in_files,
            save_freq, no_ppl, batch, weight_gib, ray_address, ray_workers, ray_stages, force, quiet):
    """Compute an importance matrix for MODEL from the calibration text: the text is tokenized, cut into
    chunks of --ctx tokens (the first token of each replaced by BOS when the vocabulary adds one), each chunk is
    evaluated and, for every matrix multiplication by a `blk.*` weight, the sum of squares of each input column
    is accumulated with the token count. The numbers are llama-imatrix's; the file is readable by
    llama-quantize and `gguftool quantize --imatrix`.

    With --ray the chunks are evaluated by Ray workers (each holding the model, read from the same path), merged
    on this machine in chunk order: the same file as without --ray."""
    from ..importance.run import compute_imatrix_file

    if model_arg and model_opt and model_arg != model_opt:
        fail(f"two models given: {model_arg!r} and {model_opt!r}")
    model_path = model_arg or model_opt
    if not calib and not in_files:
        fail("no calibration text (--calib) and no --in-file imatrix to combine")
    if calib and not model_path:
        fail("no model given (MODEL or -m/--model)")
    if weight_gib is not None and not math.isfinite(weight_gib):
        fail(f"--max-weight-memory must be a finite number of GiB (got {weight_gib})")
    if ray_workers is not None and ray_address is None:
        fail("--ray-workers needs --ray")
    if ray_stages != 1 and ray_address is None:
        fail("--ray-stages needs --ray")

    bars = []   # the progress bar, made at the first chunk (nothing is drawn when the model is refused)

    def progress(done: int, total: int, ppl: float) -> None:
        if quiet:
            return
        if not bars:
            from tqdm import tqdm
            bars.append(tqdm(total=total, unit="chunk", desc="imatrix", file=sys.stderr, dynamic_ncols=True))
        bar = bars[0]
        bar.update(done - bar.n)
        rate = bar.format_dict["rate"]          # chunks/s, smoothed (tqdm shows the ETA from it)
        info = [f"{rate * n_ctx:.0f} tok/s"] if rate else []
        if ppl == ppl:
            info.append(f"ppl {ppl:.4f}")
        bar.set_postfix_str(", ".join(info))

    try:
        result = compute_imatrix_file(
            model_path, calib or None, output, n_ctx=n_ctx, n_chunks=n_chunks, threads=threads or None,
            output_format=fmt, process_output=process_output, in_files=in_files, save_frequency=save_freq,
            batch=batch, max_weight_memory=None if weight_gib is None else int(weight_gib * 2**30),
            compute_ppl=not no_ppl, overwrite=force, progress=progress, ray_address=ray_address,
            ray_workers=ray_workers, ray_stages=ray_stages, exact=exact)
    finally:
        for bar in bars:
            bar.close()
    if not calib:
        click.echo(f"combined {result.n_in_files} imatrix file(s) into {output}: {len(result.imatrix.entries)} "
                   f"entries, {result.imatrix.chunk_count} chunks")
        return
    if not no_ppl:
        click.echo(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_err:.5f}")
    click.echo(f"{output}: {len(result.imatrix.entries)} entries, {result.n_chunks} chunks of {n_ctx} tokens "
               f"({result.n_tokens} tokens in the text), {result.seconds:.1f} s")
    if result.cluster is not None:
        c = result.cluster
        stages = f" of {c.stages} stages ({c.bytes_between_stages / 2**20:.1f} MiB passed between them)" \
            if c.stages > 1 else ""
        click.echo(f"ray: {c.n_workers} worker(s){stages}, "
                   f"{c.bytes_returned / 2**20:.1f} MiB of statistics returned")

"""``gguftool imatrix MODEL --calib FILE``: importance matrix from calibration text, as llama-imatrix computes it."""
from __future__ import annotations

import os
import sys

import click

from .common import fail, force_option, output_option, report_errors, text_file_option, threads_option


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
@click.option("--max-weight-memory", "weight_gib", type=click.FloatRange(min=0), metavar="GIB",
              help="Memory for the model's float32 weights, in GiB (default: half the available memory). Weights "
                   "that do not fit are read again from MODEL for every batch: slower, same results.")
@force_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@report_errors
def command(model_arg, model_opt, calib, output, n_ctx, n_chunks, threads, fmt, process_output, in_files,
            save_freq, no_ppl, batch, weight_gib, force, quiet):
    """Compute an importance matrix for MODEL from the calibration text: the text is tokenized, cut into
    chunks of --ctx tokens (the first token of each replaced by BOS when the vocabulary adds one), each chunk is
    evaluated and, for every matrix multiplication by a `blk.*` weight, the sum of squares of each input column
    is accumulated with the token count. The numbers are llama-imatrix's; the file is readable by
    llama-quantize and `gguftool quantize --imatrix`."""
    from ..errors import ImatrixError

    if model_arg and model_opt and model_arg != model_opt:
        fail(f"two models given: {model_arg!r} and {model_opt!r}")
    model_path = model_arg or model_opt
    if n_ctx <= 0:
        fail(f"--ctx must be > 0 (got {n_ctx})")
    if n_chunks == 0:
        fail("--chunks must be > 0 (or -1 for all)")
    if batch <= 0:
        fail(f"--batch-size must be > 0 (got {batch})")
    if batch >= n_ctx and batch % n_ctx:
        batch = (batch // n_ctx) * n_ctx
    if os.path.exists(output) and not force:
        fail(f"{output} exists (use --force to overwrite)")
    for p in [model_path, calib, *in_files]:
        if p and os.path.exists(output) and os.path.exists(p) and os.path.samefile(p, output):
            fail(f"refusing to write the output onto an input file: {output}")

    from ..importance import collect as imx

    if not calib:
        if not in_files:
            fail("no calibration text (--calib) and no --in-file imatrix to combine")
        collector = imx.ImatrixCollector(n_ctx, process_output)
        imx.merge_imatrix_files(collector, in_files)
        im = collector.result()
        imx.save_imatrix(output, im, fmt)
        click.echo(f"combined {len(in_files)} imatrix file(s) into {output}: {len(im.entries)} entries, "
                   f"{im.chunk_count} chunks")
        return

    if not model_path:
        fail("no model given (MODEL or -m/--model)")
    text = imx.read_calibration_text(calib)
    if not text.strip():
        fail(f"{calib}: calibration text is empty")

    from ..model.forward import Model, ModelConfig
    from ..model.tokenizer import Tokenizer
    from ..model.weights import default_weight_budget

    n_threads = threads or (os.cpu_count() or 1)
    source = imx.load_model(model_path)
    try:
        ModelConfig.from_metadata(source)          # architecture first: the cheapest check
        tokenizer = Tokenizer.from_metadata(source)
        budget = default_weight_budget() if weight_gib is None else int(weight_gib * 2**30)
        model = Model.from_source(source, n_threads=n_threads, weight_budget=budget)
        bar = None
        if not quiet:
            from tqdm import tqdm
            bar = tqdm(total=0, unit="chunk", desc="imatrix", file=sys.stderr, dynamic_ncols=True)

        def progress(done, total, ppl):
            if bar is None:
                return
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)
            if ppl == ppl:
                bar.set_postfix_str(f"ppl {ppl:.4f}")

        def on_chunk(done, collector):
            if save_freq > 0 and done % save_freq == 0:
                imx.save_imatrix(f"{output}.at_{done}", collector.result(calib), fmt, dataset=calib)

        try:
            run = imx.compute_imatrix(model, tokenizer, text, n_ctx=n_ctx, n_chunks=n_chunks,
                                      process_output=process_output, compute_ppl=not no_ppl,
                                      in_files=in_files, dataset=calib, batch_tokens=batch, progress=progress,
                                      on_chunk=on_chunk)
        finally:
            if bar is not None:
                bar.close()
        if not run.imatrix.entries:
            raise ImatrixError("no matrix multiplications were collected")
        imx.save_imatrix(output, run.imatrix, fmt, dataset=calib)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    if not no_ppl:
        click.echo(f"Final estimate: PPL = {run.ppl:.4f} +/- {run.ppl_err:.5f}")
    click.echo(f"{output}: {len(run.imatrix.entries)} entries, {run.n_chunks} chunks of {n_ctx} tokens "
               f"({run.n_tokens} tokens in the text), {run.seconds:.1f} s")
    store = model.w
    if store.streamed_names:
        click.echo(f"note: {len(store.streamed_names)} weights ({store.streamed_bytes / 2**30:.2f} GiB as float32) "
                   f"did not fit the weight memory ({budget / 2**30:.2f} GiB, --max-weight-memory) and were read "
                   f"again for every batch", err=True)

"""``gguftool perplexity MODEL -f TEXT``: perplexity and KL-divergence as llama-perplexity computes them."""
from __future__ import annotations

import json
import math
import sys

import click

from .common import exact_option, fail, force_option, report_errors, text_file_option, threads_option


@click.command("perplexity")
@click.argument("model_arg", metavar="MODEL", required=False, type=click.Path(path_type=str))
@click.option("-m", "--model", "model_opt", type=click.Path(path_type=str),
              help="The model (same as the positional MODEL): a GGUF file or a Hugging Face checkpoint.")
@text_file_option("text", "Text to evaluate (UTF-8). With --kl-divergence it may be left out (the base file holds "
                          "the tokens); when given it must tokenize to the base file's tokens.")
@click.option("-c", "--ctx", "n_ctx", default=None, type=int,
              help="Tokens per chunk (llama-perplexity --ctx-size; default 512, or the base file's with "
                   "--kl-divergence).")
@click.option("--chunks", "n_chunks", default=-1, show_default=True, type=int,
              help="Evaluate at most this many chunks (-1: all).")
@click.option("-b", "--batch-size", "batch", default=2048, show_default=True, type=int,
              help="Tokens evaluated together (several chunks at once when larger than --ctx).")
@threads_option
@exact_option
@click.option("--kl-divergence-base", "base", metavar="FILE", type=click.Path(path_type=str),
              help="Without --kl-divergence: write the model's log-probabilities to FILE (llama-perplexity's "
                   "format). With it: the base model's file to compare with.")
@click.option("--kl-divergence", "kld", is_flag=True,
              help="Compare MODEL with the base model's --kl-divergence-base FILE: KL-divergence, Δp, same top p.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@force_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@report_errors
def command(model_arg, model_opt, text, n_ctx, n_chunks, batch, threads, exact, base, kld, as_json, force, quiet):
    """Perplexity of MODEL on the text: cut into chunks of --ctx tokens (the first token of each replaced by BOS
    when the vocabulary adds one), the second half of each chunk scored; the figures are llama-perplexity's."""
    from ..quality.kld import format_kld_stats
    from ..quality.perplexity import compute_perplexity

    if model_arg and model_opt and model_arg != model_opt:
        fail(f"two models given: {model_arg!r} and {model_opt!r}")
    model_path = model_arg or model_opt
    if not model_path:
        fail("no model given (MODEL or -m/--model)")
    if kld and not base:
        fail("--kl-divergence needs the base model's logits file (--kl-divergence-base FILE)")
    if not kld and not text:
        fail("no text file given (-f/--file)")

    bars = []

    def progress(done: int, total: int, ppl: float) -> None:
        if quiet:
            return
        if not bars:
            from tqdm import tqdm
            bars.append(tqdm(total=total, unit="tok", unit_scale=True, desc="perplexity", file=sys.stderr,
                             dynamic_ncols=True))
        bar = bars[0]
        bar.update(done - bar.n)
        if not math.isnan(ppl):
            bar.set_postfix_str(f"ppl {ppl:.4f}")

    try:
        result = compute_perplexity(model_path, text or None, n_ctx=n_ctx, n_chunks=n_chunks, batch=batch,
                                    threads=threads, kl_divergence_base=base, kl_divergence=kld, overwrite=force,
                                    exact=exact, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo("".join(f"[{i + 1}]{p:.4f}," for i, p in enumerate(result.chunk_ppl)))
    if result.kld is not None:
        click.echo()
        click.echo(format_kld_stats(result.kld))
    else:
        click.echo(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_err:.5f}")
    click.echo(f"{result.n_chunks} chunks of {result.n_ctx} tokens, {result.n_scored} scored, "
               f"{result.seconds:.1f} s ({result.tokens_per_second:.0f} tokens/s)"
               + (f"; base logits written to {result.base_path}" if result.mode == "kl-divergence-base" else ""),
               err=True)

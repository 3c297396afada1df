"""``gguftool convert MODEL [--type TYPE]``: Hugging Face safetensors checkpoint -> (quantized) GGUF in one step.

The checkpoint is presented as the file llama.cpp's ``convert_hf_to_gguf.py --outtype f32`` (``bf16`` for a BF16
checkpoint) would write (gguftool.hf.source) and fed to the quantize pipeline, which does what ``llama-quantize
TYPE`` does with that file. No intermediate file is written. Argument handling and printing only; the work is in
gguftool.hf and gguftool.pipeline.
"""
from __future__ import annotations

import os
import re

import click

from .common import report_errors
from .quantize_options import (TYPES_HELP, apply_split_options, build_config, policy_files, policy_options,
                               print_plan, print_summary, run_with_progress, split_options, warn)


def _default_outfile(src, type_name: str) -> str:
    name = re.sub(r"[^\w.+-]+", "-", src.name).strip("-") or "model"
    return os.path.join(str(src.checkpoint.directory), f"{name}-{type_name}.gguf")


def _print_model(src) -> None:
    from ..hf import archs as A

    hp, arch, v = src.hparams, src.arch, src.vocab
    click.echo(f"architecture: {hp.get('architectures', ['?'])[0]} -> {arch.gguf_arch}")
    click.echo(f"hyperparameters: layers {hp['num_hidden_layers']}, hidden {hp['hidden_size']}, ffn "
               f"{hp.get('intermediate_size')}, heads {hp['num_attention_heads']} (kv {hp['num_key_value_heads']}),"
               f" head_dim {A.head_dim(hp)}, context {hp.get('max_position_embeddings')}, vocab {hp['vocab_size']}")
    rope = hp["rope_parameters"]
    click.echo(f"rope: {rope}")
    special = ", ".join(f"{k} {i}" for k, i in v.special.items()) or "none"
    click.echo(f"tokenizer: {v.model} from {v.source}, pre {v.pre}, {v.n_tokens} tokens"
               + (f", {v.n_merges} merges" if v.n_merges else "") + f"; special: {special}; chat template: "
               + ("yes" if v.chat_template else "no"))
    click.echo(f"checkpoint: {len(src.checkpoint.files)} safetensors file(s), dtype "
               f"{src.checkpoint.dominant_dtype()}, reference conversion --outtype {src.outtype}")


@click.command("convert")
@click.argument("model", metavar="MODEL", type=click.Path(path_type=str))
@click.option("--type", "-t", "type_", metavar="TYPE", default="auto", show_default=True,
              help=f"Output type: {TYPES_HELP}; or auto = BF16 for a BF16 checkpoint, else F16.")
@click.option("--outfile", "-o", metavar="PATH", type=click.Path(dir_okay=False, path_type=str),
              help="Output file (default: <checkpoint dir>/<name>-<TYPE>.gguf).")
@click.option("--name", metavar="NAME", help="general.name (default: the checkpoint folder's name).")
@policy_options
@click.option("--vocab-only", is_flag=True, help="Write only the metadata and tokenizer, no tensors.")
@click.option("--dry-run", is_flag=True, help="Print the architecture, hyperparameters, tokenizer and the "
                                              "per-tensor plan with sizes; read only headers, write nothing.")
@click.option("--stats", is_flag=True, help="Print each converted tensor's RMS error against the checkpoint.")
@split_options
@click.option("--threads", type=click.IntRange(min=1), metavar="N", help="Threads (default: all cores).")
@click.option("--force", "-f", is_flag=True, help="Overwrite the output file if it exists.")
@report_errors
def command(model, type_, outfile, name, vocab_only, dry_run, stats, split_max_size, split_max_tensors, threads, force,
            **policy):
    """Convert the Hugging Face checkpoint MODEL (a .safetensors file or its folder, with config.json and
    tokenizer files; sharded checkpoints through model.safetensors.index.json) to GGUF.

    The output equals llama.cpp's convert_hf_to_gguf.py --outtype f32 (bf16 for a BF16 checkpoint) followed by
    llama-quantize TYPE: same metadata (but the descriptive general.* keys), byte-identical tensors.

    Architectures: LlamaForCausalLM (Llama 1-3, with Llama 3 rope scaling), MistralForCausalLM,
    MixtralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, Gemma2ForCausalLM,
    Gemma3ForCausalLM, Phi3ForCausalLM (Phi-3, Phi-3.5, Phi-4; LongRoPE factors).
    """
    from ..pipeline import plan as PL
    from ..pipeline import policy as P
    from ..hf.source import open_hf_source
    from ..outfile import check_outputs

    src = open_hf_source(model, outtype="auto", name=name, vocab_only=vocab_only)
    try:
        if type_.strip().lower() == "auto":
            type_name = "BF16" if src.outtype == "bf16" else "F16"
        else:
            type_name = type_.strip().upper()
        ftype = P.parse_ftype(type_name)
        type_name = ftype.name
        out = outfile or _default_outfile(src, type_name)
        cfg = build_config(ftype, **policy)
        cfg.order = "convert"    # F32/F16/BF16/Q8_0 in convert_hf_to_gguf.py's tensor order
        apply_split_options(cfg, split_max_size, split_max_tensors)
        plan = PL.make_plan(src, cfg)
        inputs = src.input_files() + policy_files(policy)
        if not dry_run:
            check_outputs([path for path, _, _ in PL.output_files(plan, out)], inputs, overwrite=force)
        for w in src.vocab.warnings + plan.warnings:
            warn(w)
        if dry_run:
            _print_model(src)
            if plan.tensors:
                print_plan(plan, ftype)
            click.echo(f"output: {out}")
            return
        summary = run_with_progress(src, plan, out, threads, stats, force, inputs)
    finally:
        src.close()
    print_summary(summary, plan, stats, model)


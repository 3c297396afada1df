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

from .common import fail, report_errors
from .quantize_cmd import _TYPES_HELP, _print_plan, _print_summary, _run, _tensor_types, _warn


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
              help=f"Output type: {_TYPES_HELP}; or auto = BF16 for a BF16 checkpoint, else F16.")
@click.option("--outfile", "-o", metavar="PATH", type=click.Path(dir_okay=False, path_type=str),
              help="Output file (default: <checkpoint dir>/<name>-<TYPE>.gguf).")
@click.option("--name", metavar="NAME", help="general.name (default: the checkpoint folder's name).")
@click.option("--imatrix", metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
              help="Importance matrix (GGUF or legacy .dat), as for gguftool quantize.")
@click.option("--include-weights", multiple=True, metavar="NAME",
              help="Use the imatrix only for tensors whose name contains NAME (repeatable).")
@click.option("--exclude-weights", multiple=True, metavar="NAME",
              help="Do not use the imatrix for tensors whose name contains NAME (repeatable).")
@click.option("--leave-output-tensor", is_flag=True, help="Leave output.weight unquantized.")
@click.option("--output-tensor-type", metavar="T", help="ggml type for output.weight (e.g. q8_0).")
@click.option("--token-embedding-type", metavar="T", help="ggml type for token_embd.weight.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
              help="Quantize tensors whose name matches REGEX to TYPE (repeatable; the first match wins).")
@click.option("--tensor-type-file", metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
              help="REGEX=TYPE entries separated by spaces or newlines.")
@click.option("--pure", is_flag=True, help="No mixes: every quantized tensor gets the TYPE's base type.")
@click.option("--override-kv", multiple=True, metavar="KEY=TYPE:VALUE",
              help="Set a metadata value in the output; TYPE is int, float, bool or str (repeatable).")
@click.option("--vocab-only", is_flag=True, help="Write only the metadata and tokenizer, no tensors.")
@click.option("--dry-run", is_flag=True, help="Print the architecture, hyperparameters, tokenizer and the "
                                              "per-tensor plan with sizes; read only headers, write nothing.")
@click.option("--stats", is_flag=True, help="Print each converted tensor's RMS error against the checkpoint.")
@click.option("--threads", type=click.IntRange(min=1), metavar="N", help="Threads (default: all cores).")
@click.option("--force", "-f", is_flag=True, help="Overwrite the output file if it exists.")
@report_errors
def command(model, type_, outfile, name, imatrix, include_weights, exclude_weights, leave_output_tensor,
            output_tensor_type, token_embedding_type, tensor_types, tensor_type_file, pure, override_kv,
            vocab_only, dry_run, stats, threads, force):
    """Convert the Hugging Face checkpoint MODEL (a .safetensors file or its folder, with config.json and
    tokenizer files; sharded checkpoints through model.safetensors.index.json) to GGUF.

    The output equals llama.cpp's convert_hf_to_gguf.py --outtype f32 (bf16 for a BF16 checkpoint) followed by
    llama-quantize TYPE: same metadata (but the descriptive general.* keys), byte-identical tensors.
    """
    from .. import pipeline as PL
    from .. import policy as P
    from ..hf.source import open_hf_source

    if include_weights and exclude_weights:
        fail("--include-weights and --exclude-weights cannot be used together")
    src = open_hf_source(model, outtype="auto", name=name, vocab_only=vocab_only)
    try:
        if type_.strip().lower() == "auto":
            type_name = "BF16" if src.outtype == "bf16" else "F16"
        else:
            type_name = type_.strip().upper()
        ftype = P.parse_ftype(type_name)
        type_name = ftype.name
        out = outfile or _default_outfile(src, type_name)
        if not dry_run:
            _check_output(model, src, out, force)
        cfg = PL.QuantizeConfig(
            ftype=ftype, pure=pure, leave_output_tensor=leave_output_tensor,
            output_tensor_type=P.parse_target_type(output_tensor_type, "--output-tensor-type")
            if output_tensor_type else None,
            token_embedding_type=P.parse_target_type(token_embedding_type, "--token-embedding-type")
            if token_embedding_type else None,
            tensor_types=_tensor_types(list(tensor_types), tensor_type_file),
            include_weights=list(include_weights), exclude_weights=list(exclude_weights),
            kv_overrides=[PL.parse_kv_override(s) for s in override_kv])
        if imatrix:
            from ..imatrix_file import read_imatrix

            cfg.imatrix = read_imatrix(imatrix)
            cfg.imatrix_path = imatrix
        plan = PL.make_plan(src, cfg)
        for w in src.vocab.warnings + plan.warnings:
            _warn(w)
        if dry_run:
            _print_model(src)
            if plan.tensors:
                _print_plan(plan, ftype)
            click.echo(f"output: {out}")
            return
        protect = [f.path for f in src.checkpoint.files]
        summary = _run(src, plan, out, threads, stats, force, str(protect[0]) if protect else model)
    finally:
        src.close()
    _print_summary(summary, plan, stats, model)


def _check_output(model: str, src, out: str, force: bool) -> None:
    for f in src.checkpoint.files:
        if os.path.abspath(out) == os.path.abspath(f.path):
            fail(f"{out}: output file is an input file")
    if os.path.isdir(out):
        fail(f"{out}: output path is a directory")
    if os.path.lexists(out) and not force:
        fail(f"{out}: output file already exists (use --force to overwrite it)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        fail(f"{out}: output directory {parent} does not exist")

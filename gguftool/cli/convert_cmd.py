"""``gguftool convert MODEL [--type TYPE]``: Hugging Face safetensors checkpoint -> (quantized) GGUF in one step.

The checkpoint is presented as the file llama.cpp's ``convert_hf_to_gguf.py --outtype f32`` (``bf16`` for a BF16
checkpoint) would write (gguftool.hf.source) and fed to the quantize pipeline, which does what ``llama-quantize
TYPE`` does with that file. No intermediate file is written. Argument handling and printing only; the work is
gguftool.api.plan_convert (gguftool.hf and gguftool.pipeline).
"""
from __future__ import annotations

import click

from .common import end_startup, force_option, output_option, report_errors, threads_option
from .quantize_options import (TYPES_HELP, SearchBar, cluster_options, policy_options, print_allocation, print_plan, print_summary,
                               run_with_progress, split_options, warn)


def _print_model(src) -> None:
    from ..hf import archs as A

    hp, arch, v = src.hparams, src.arch, src.vocab
    click.echo(f"architecture: {hp.get('architectures', ['?'])[0]} -> {arch.gguf_arch}")
    if A.is_raw_config(arch, hp):
        click.echo(f"config: model_type {hp.get('model_type')!r} has no transformers config class: config.json is "
                   "read as it is (no class defaults), as llama.cpp's converter reads it")
    click.echo(f"hyperparameters: layers {hp['num_hidden_layers']}, hidden {hp['hidden_size']}, ffn "
               f"{hp.get('intermediate_size')}, heads {hp['num_attention_heads']} (kv {hp['num_key_value_heads']}),"
               f" head_dim {A.head_dim(hp)}, context {hp.get('max_position_embeddings')}, vocab {hp['vocab_size']}")
    if arch.mla:
        kv_lora, nope, rope_dim, v_dim = A.mla_dims(hp)
        click.echo(f"latent attention: q_lora_rank {hp.get('q_lora_rank')}, kv_lora_rank {kv_lora}, head dims "
                   f"{nope} + rope {rope_dim} (value {v_dim}); experts {hp.get('n_routed_experts')} "
                   f"({hp.get('num_experts_per_tok')} used, {hp.get('n_shared_experts')} shared), "
                   f"{A.dense_lead_layers(hp)} dense lead layer(s), routing {hp.get('scoring_func', 'softmax')}")
    rope = hp["rope_parameters"]
    click.echo(f"rope: {rope}")
    special = ", ".join(f"{k} {i}" for k, i in v.special.items()) or "none"
    click.echo(f"tokenizer: {v.model} from {v.source}, pre {v.pre}, {v.n_tokens} tokens"
               + (f", {v.n_merges} merges" if v.n_merges else "") + f"; special: {special}; chat template: "
               + ("yes" if v.chat_template else "no"))
    click.echo(f"checkpoint: {len(src.checkpoint.files)} safetensors file(s) in {src.checkpoint.directory}, dtype "
               f"{src.checkpoint.dominant_dtype()}, reference conversion --outtype {src.outtype}")
    for line in src.prequant.summary():
        click.echo(line)
    for name, what in src.prequant_report():
        click.echo(f"    {name:<28} <- {what}")


@click.command("convert")
@click.argument("model", metavar="MODEL", type=click.Path(path_type=str))
@click.option("--type", "type_", metavar="TYPE", default="auto", show_default=True,
              help=f"Output type: {TYPES_HELP}; or auto = BF16 for a BF16 checkpoint, else F16.")
@output_option("outfile", "Output file (default: <checkpoint dir>/<name>-<TYPE>.gguf).", aliases=("--outfile",))
@click.option("--revision", metavar="REV", help="With a Hub repo id: the branch, tag or commit to convert "
                                                "(default: main).")
@click.option("--name", metavar="NAME", help="general.name (default: the checkpoint folder's name, or the repo id).")
@policy_options
@click.option("--allow-requantize", is_flag=True,
              help="Convert tensors the checkpoint holds quantized (gpt-oss's MXFP4 experts) to other types, as "
                   "llama-quantize --allow-requantize.")
@click.option("--vocab-only", is_flag=True, help="Write only the metadata and tokenizer, no tensors.")
@click.option("--dry-run", is_flag=True, help="Print the architecture, hyperparameters, tokenizer and the "
                                              "per-tensor plan with sizes; read only headers, write nothing.")
@click.option("--stats", is_flag=True, help="Print each converted tensor's RMS error against the checkpoint.")
@split_options
@cluster_options
@threads_option
@force_option
@report_errors
def command(model, type_, outfile, revision, name, allow_requantize, vocab_only, dry_run, stats, split_max_size,
            split_max_tensors, threads, force, ray_address, ray_no_shared_fs, **policy):
    """Convert the Hugging Face checkpoint MODEL (a .safetensors file or its folder, with config.json and
    tokenizer files; sharded checkpoints through model.safetensors.index.json) to GGUF.

    MODEL may also be a Hugging Face Hub repo id (Qwen/Qwen3-0.6B): when no local path of that name exists (a path
    that exists always wins), the config, tokenizer and safetensors files are fetched into the Hub's cache
    (HF_HUB_CACHE; a token from HF_TOKEN; HF_HUB_OFFLINE=1 uses the cache only) and the output goes to the current
    directory.

    Pre-quantized checkpoints (FP8 E4M3/E5M2 or int8 weights with weight_scale_inv block scales, compressed-tensors
    or ModelOpt weight_scale, Mistral qscale_weight) are dequantized to float32 exactly as convert_hf_to_gguf.py
    does; --dry-run lists what was found.

    The output equals llama.cpp's convert_hf_to_gguf.py --outtype f32 (bf16 for a BF16 checkpoint) followed by
    llama-quantize TYPE: same metadata (but the descriptive general.* keys), byte-identical tensors.

    Architectures: LlamaForCausalLM (Llama 1-3, with Llama 3 rope scaling), MistralForCausalLM,
    MixtralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, Gemma2ForCausalLM,
    Gemma3ForCausalLM, Phi3ForCausalLM (Phi-3, Phi-3.5, Phi-4; LongRoPE factors), DeepseekV2ForCausalLM,
    DeepseekV3ForCausalLM (DeepSeek-V2/V3, Kimi-K2 with a tokenizer.json; multi-head latent attention),
    GptOssForCausalLM (MXFP4 experts kept as they are: --type MXFP4_MOE, or --allow-requantize for other types).

    """
    from .. import api
    from ..outfile import check_outputs

    end_startup(load_kernels=not (dry_run or vocab_only))

    options = api.QuantizeOptions(split_max_size=split_max_size, split_max_tensors=split_max_tensors, **policy)
    bar = SearchBar()
    try:
        job = api.plan_convert(model, outfile, type=type_, name=name, vocab_only=vocab_only, options=options,
                               revision=revision, allow_requantize=allow_requantize, threads=threads,
                               search_progress=bar)
    finally:
        bar.close()
    with job:
        if not dry_run:
            check_outputs(job.output_paths(), job.inputs, overwrite=force)
        for w in job.warnings:
            warn(w)
        if dry_run:
            _print_model(job.source)
            if job.allocation is not None:
                print_allocation(job.allocation)
            elif job.plan.tensors:
                print_plan(job.plan, job.ftype)
            click.echo(f"output: {job.output}")
            return
        summary = run_with_progress(job, threads, stats, force, ray_address, not ray_no_shared_fs)
    print_summary(summary, job.plan, stats, model)

"""What ``gguftool quantize`` and ``gguftool convert`` share: the llama-quantize policy options (gguftool.api's
QuantizeOptions), the progress bar, and the printed plan and summary."""
from __future__ import annotations

import functools
import os
import sys

import click

from .common import fail, ray_option, skip_numba_blas_probe

TYPES_HELP = ("F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q2_K_S, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, "
              "Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M, IQ3_XXS, IQ3_XS, IQ3_S, "
              "IQ3_M, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0, MXFP4_MOE (aliases Q3_K, Q4_K, Q5_K = the _M mixes); any case")


def mib(n: int) -> str:
    return f"{n / 1048576:.2f} MiB"


def warn(msg: str) -> None:
    click.echo(f"Warning: {msg}", err=True)


# --- the policy options both commands take, with llama-quantize's names

_POLICY_OPTIONS = [
    click.option("--imatrix", metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
                 help="Importance matrix (GGUF imatrix or legacy .dat) for the quantization search; per-column "
                      "weights are in_sum2 / counts, as llama.cpp computes them."),
    click.option("--include-weights", multiple=True, metavar="NAME",
                 help="Use the imatrix only for tensors whose name contains NAME (repeatable)."),
    click.option("--exclude-weights", multiple=True, metavar="NAME",
                 help="Do not use the imatrix for tensors whose name contains NAME (repeatable)."),
    click.option("--leave-output-tensor", is_flag=True, help="Leave output.weight un(re)quantized."),
    click.option("--output-tensor-type", metavar="T", help="ggml type for output.weight (e.g. q8_0)."),
    click.option("--token-embedding-type", metavar="T", help="ggml type for token_embd.weight."),
    click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
                 help="Quantize tensors whose name matches REGEX to TYPE (repeatable; the first match wins), "
                      "e.g. --tensor-type attn_v=q8_0."),
    click.option("--tensor-type-file", metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
                 help="REGEX=TYPE entries separated by spaces or newlines (after the --tensor-type ones)."),
    click.option("--pure", is_flag=True, help="No mixes: every quantized tensor gets the TYPE's base type."),
    click.option("--override-kv", multiple=True, metavar="KEY=TYPE:VALUE",
                 help="Set a metadata value in the output; TYPE is int, float, bool or str (repeatable)."),
    click.option("--target-size", metavar="SIZE",
                 help="Choose every tensor's type for a file of at most SIZE (bytes, or 1.2G / 500M: decimal "
                      "units) with the least loss; needs --imatrix. --type then names the stock mix compared with "
                      "(default: the largest stock mix that fits)."),
    click.option("--target-bpw", type=float, metavar="X",
                 help="As --target-size, for X bits per weight of tensor data."),
    click.option("--calib", metavar="TEXT", type=click.Path(dir_okay=False, path_type=str),
                 help="Calibration text for --target-*: each tensor's effect is measured as the KL-divergence of "
                      "the model with that tensor quantized (without it: imatrix-weighted weight error only)."),
    click.option("--sensitivities", metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
                 help="Cache of the --target-* measurements (JSON): used when it matches the model, imatrix and "
                      "calibration, written otherwise; reuse it for other targets."),
    click.option("--calib-ctx", type=click.IntRange(min=8), default=128, show_default=True, metavar="N",
                 help="Tokens per calibration chunk."),
    click.option("--calib-chunks", type=click.IntRange(min=1), default=2, show_default=True, metavar="N",
                 help="Calibration chunks (spread over the text)."),
    click.option("--probe", type=click.Choice(["tensor", "layer"]), default="layer", show_default=True,
                 help="Sensitivity probes: per layer (the first, middle and last layers tensor by tensor, their "
                      "proportions shared out over the others), or one forward pass per tensor (~4x the passes)."),
]


def policy_options(func):
    """Add the shared policy options; the command receives them as keyword arguments (QuantizeOptions' fields)."""
    for option in reversed(_POLICY_OPTIONS):
        func = option(func)
    return func


def split_options(func):
    """--split-max-size / --split-max-tensors: write the output as split files (gguf-split's layout)."""
    func = click.option("--split-max-tensors", type=click.IntRange(min=1), metavar="N",
                        help="Split the output into files of at most N tensors (OUT-00001-of-0000K.gguf ...).")(func)
    return click.option("--split-max-size", metavar="SIZE",
                        help="Split the output into files of at most SIZE of tensor data, e.g. 40G or 500M "
                             "(decimal units, as llama.cpp's gguf-split; OUT-00001-of-0000K.gguf ...).")(func)


def cluster_options(func):
    """--ray [ADDRESS] (cli.common.ray_option) and --ray-no-shared-fs: compute the tensors on a Ray cluster."""
    func = click.option("--ray-no-shared-fs", "ray_no_shared_fs", is_flag=True,
                        help="With --ray: the workers do not see the output's folder; their bytes come back "
                             "through Ray's object store and this process writes them.")(func)

    @functools.wraps(func)
    def checked(*args, **kwargs):
        if kwargs.get("ray_no_shared_fs") and kwargs.get("ray_address") is None:
            fail("--ray-no-shared-fs is an option of --ray (give --ray too)")
        return func(*args, **kwargs)
    return ray_option(checked)


# --- running


class SearchBar:
    """A progress bar per phase of the target-size search (stderr)."""

    def __init__(self):
        self.bar = None
        self.phase = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if phase != self.phase:
            self.close()
            self.phase = phase
            self.bar = tqdm(total=total, desc=phase, unit="", file=sys.stderr, dynamic_ncols=True, disable=None,
                            mininterval=0.5, leave=False)
        assert self.bar is not None
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None



def run_with_progress(job, threads, stats, force, ray_address=None, ray_shared_fs=True):
    """job.run() (a gguftool.api.Job) with a progress bar on stderr; on a Ray cluster with ``ray_address``
    (-t is then the kernel threads of each task, default 1)."""
    from tqdm import tqdm

    skip_numba_blas_probe()
    bar = tqdm(total=job.plan.src_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="quantize",
               file=sys.stderr, dynamic_ncols=True, disable=None, mininterval=0.5,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                          "{rate_fmt}{postfix}]")
    last = [None]

    def progress(n, tp):
        if tp.name != last[0]:
            last[0] = tp.name
            bar.set_postfix_str(tp.name, refresh=False)
        bar.update(n)

    cluster = None
    if ray_address is not None:
        from ..distributed.execute import ClusterOptions

        cluster = ClusterOptions(address=ray_address, shared_fs=ray_shared_fs, threads=threads or 1)
    try:
        return job.run(threads=threads, stats=stats, overwrite=force, progress=progress, cluster=cluster)
    finally:
        bar.close()


# --- printing


def shape_str(shape) -> str:
    return "x".join(str(d) for d in shape)


def print_plan(plan, ftype) -> None:
    rows = []
    for i, t in enumerate(plan.tensors, 1):
        note = []
        if t.fallback:
            note.append("fallback")
        if t.how in ("manual", "output-type", "token-embd-type"):
            note.append(t.how)
        if not t.converts:
            note.append("copied")
        rows.append((str(i), t.name, shape_str(t.shape), t.src_type.name, t.new_type.name,
                     f"{t.src_nbytes / 1048576:.3f}", f"{t.new_nbytes / 1048576:.3f}", ",".join(note)))
    head = ("#", "tensor", "shape", "from", "to", "MiB in", "MiB out", "note")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    right = {0, 5, 6}
    for r in [head] + rows:
        click.echo("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                             enumerate(zip(r, widths))).rstrip())
    counts: dict[str, int] = {}
    for t in plan.tensors:
        counts[t.new_type.name] = counts.get(t.new_type.name, 0) + 1
    click.echo("types: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    click.echo(f"{ftype.name}: {len(plan.tensors)} tensors, {plan.n_elements:,} weights: "
               f"{mib(plan.src_bytes)} ({plan.src_bpw:.2f} bpw) -> {mib(plan.out_bytes)} "
               f"({plan.out_bpw:.2f} bpw)" + (f"; {plan.n_fallback} row-length fallbacks" if plan.n_fallback
                                              else ""))


def print_allocation(a) -> None:
    """--dry-run with --target-*: per tensor the chosen type, bytes and predicted KLD contribution beside the stock
    mix's, then the totals against the target."""
    rows = []
    for r in a.rows:
        rows.append((r.name, r.type.name, f"{r.nbytes:,}", f"{r.predicted:.3g}", r.stock_type.name,
                     f"{r.stock_nbytes:,}", f"{r.stock_predicted:.3g}"))
    head = ("tensor", "type", "bytes", "est. KLD", f"{a.ftype.name}", "bytes", "est. KLD")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    right = {2, 3, 5, 6}
    for r in [head] + rows:
        click.echo("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                             enumerate(zip(r, widths))).rstrip())
    if a.target_bytes is not None:
        goal = f"target {a.target_bytes:,} bytes ({a.target_bytes / 1e6:.2f} MB)"
    else:
        goal = f"target {a.target_bpw:.4f} bpw"
    click.echo(f"allocation: file {a.file_bytes:,} bytes, {a.bpw:.4f} bpw; {goal}; stock {a.ftype.name}: file "
               f"{a.stock_file_bytes:,} bytes")
    line = f"estimated KLD (sum over tensors): {a.predicted:.5g} vs {a.stock_predicted:.5g} for {a.ftype.name}"
    if a.measured is not None:
        line += (f"; measured on the calibration chunks, whole model: {a.measured:.5g} vs {a.stock_measured:.5g}")
    click.echo(line)
    if a.chose_stock:
        click.echo(f"the stock mix {a.ftype.name} is kept: the allocation did not beat it by the method's measure")
    sens = a.sensitivities
    how = ("measured sensitivities" if sens is not None and sens.measured else "weight error only (no --calib)")
    click.echo(f"search: {a.seconds:.1f} s ({how})")


def print_summary(s, plan, stats: bool, inp: str) -> None:
    if stats:
        rows = [(r.name, r.new_type.name, f"{r.rmse:.6g}" if r.rmse is not None else "-",
                 f"{r.weighted_rmse:.6g}" if r.weighted_rmse is not None else "-")
                for r in s.results if r.rmse is not None]
        head = ("tensor", "type", "rmse", "imatrix-weighted rmse")
        if rows:
            widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
            for r in [head] + rows:
                click.echo("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                     for i, (c, w) in enumerate(zip(r, widths))))
        overall = s.overall_rmse()
        wr = [(r.weighted_rmse, r) for r in s.results if r.weighted_rmse is not None]
        line = f"stats: {len(rows)} converted tensors, overall rmse {overall:.6g}" if overall is not None \
            else "stats: no tensor was converted"
        if wr:
            worst = max(wr, key=lambda x: x[0])
            line += f", worst imatrix-weighted rmse {worst[0]:.6g} ({worst[1].name})"
        click.echo(line)
    n_conv = sum(1 for r in s.results if r.src_type != r.new_type)
    rate = s.src_bytes / 1e6 / s.seconds if s.seconds > 0 else 0.0
    where = s.path if len(s.paths) <= 1 else f"{len(s.paths)} files {s.paths[0]} … {os.path.basename(s.paths[-1])}"
    click.echo(f"wrote {where}: {len(s.results)} tensors ({n_conv} converted, {len(s.results) - n_conv} copied), "
               f"{mib(s.src_bytes)} ({s.src_bpw:.2f} bpw) -> {mib(s.out_bytes)} ({s.out_bpw:.2f} bpw), "
               f"file {mib(s.file_size)}, {s.seconds:.1f} s ({rate:.0f} MB/s)"
               + (f"; {s.n_fallback} row-length fallbacks" if s.n_fallback else ""))


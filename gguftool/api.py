"""The Python API: every job of the command line as a typed function, for notebooks and other tools' export steps.

    import gguftool
    gguftool.convert("path/to/hf-checkpoint", "model-Q4_K_M.gguf", type="Q4_K_M")
    gguftool.quantize_file("model-f16.gguf", "model-Q2_K.gguf", type="Q2_K",
                           options=gguftool.QuantizeOptions(imatrix="imatrix.gguf"))
    gguftool.edit_file("in.gguf", "out.gguf", set_items=["general.name=x"])
    with gguftool.GGUFReader("model.gguf") as r: ...

``convert`` and ``quantize_file`` are ``plan_convert`` / ``plan_quantize`` followed by ``Job.run``; the two steps
are public so a caller can look at the plan (types, sizes, warnings) before anything is written, as the command
line's --dry-run does. Errors are GGUFError subclasses; nothing here prints or exits.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import PolicyError
from .tools.edit import EditResult, edit_file

if TYPE_CHECKING:
    from .gguf.constants import GGMLType
    from .allocation.search import Allocation
    from .distributed.execute import ClusterOptions
    from .pipeline.execute import Summary
    from .pipeline.plan import Plan, QuantizeConfig
    from .pipeline.policy import FileType, TensorPlan
    from .pipeline.source import TensorSource

__all__ = ["QuantizeOptions", "Job", "plan_convert", "convert", "plan_quantize", "quantize_file", "edit_file",
           "EditResult"]

# progress(n, tensor): n source bytes of the tensor were just processed
Progress = Callable[[int, "TensorPlan"], None]
# search_progress(phase, done, total): the target-size allocation's measurements
SearchProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class QuantizeOptions:
    """llama-quantize's options, shared by convert and quantize_file (the command line's names, without --)."""
    imatrix: str | os.PathLike[str] | None = None   # GGUF imatrix or legacy .dat: weights for the quant search
    include_weights: Sequence[str] = ()              # use the imatrix only for tensors whose name contains one
    exclude_weights: Sequence[str] = ()              # do not use the imatrix for these
    leave_output_tensor: bool = False                # output.weight keeps its type
    output_tensor_type: str | None = None            # ggml type for output.weight, e.g. "q8_0"
    token_embedding_type: str | None = None          # ggml type for token_embd.weight
    tensor_types: Sequence[str] = ()                 # "REGEX=TYPE" entries; the first match wins
    tensor_type_file: str | os.PathLike[str] | None = None   # more REGEX=TYPE entries, whitespace-separated
    pure: bool = False                               # every quantized tensor gets the type's base type
    override_kv: Sequence[str] = ()                  # "KEY=TYPE:VALUE" metadata set in the output
    split_max_size: str | int | None = None          # split the output: bytes of tensor data, or "40G" / "500M"
    split_max_tensors: int | None = None             # split the output: tensors per file
    # per-tensor allocation for a target (gguftool.allocation); the type is then the stock mix compared with
    target_size: str | int | None = None             # file size: bytes or "1.2G" / "500M" (decimal units)
    target_bpw: float | None = None                  # bits per weight of the tensor data
    calib: str | os.PathLike[str] | None = None      # calibration text: measured (KL-divergence) sensitivities
    sensitivities: str | os.PathLike[str] | None = None  # cache of the measurements, reused for other targets
    calib_ctx: int = 128                             # tokens per calibration chunk
    calib_chunks: int = 2                            # calibration chunks
    probe: str = "layer"                             # sensitivities: one forward pass per "tensor" or per "layer"

    @property
    def has_target(self) -> bool:
        return self.target_size is not None or self.target_bpw is not None


@dataclass
class Job:
    """A planned convert or quantize: what will be written, from what. ``run()`` writes it; close() (or ``with``)
    releases the source's files."""
    source: TensorSource
    plan: Plan
    ftype: FileType
    output: str | None                   # the output path (the first split's name comes from it)
    inputs: list[str]                    # every file the job reads: the output must be none of them
    _close: Callable[[], None] = field(repr=False)
    source_warnings: list[str] = field(default_factory=list)   # what reading the source found worth telling
    allocation: Allocation | None = None   # --target-size / --target-bpw: the chosen mix and its figures

    @property
    def warnings(self) -> list[str]:
        """What the source and the plan found worth telling (fallback types, vocabulary oddities ...)."""
        return self.source_warnings + self.plan.warnings + (self.allocation.notes if self.allocation else [])

    def output_paths(self) -> list[str]:
        """Every file run() writes (several for a split output)."""
        from .pipeline.plan import output_files

        if self.output is None:
            raise PolicyError("no output file given")
        return [path for path, _, _ in output_files(self.plan, self.output)]

    def run(self, *, threads: int | None = None, stats: bool = False, overwrite: bool = False,
            progress: Progress | None = None, cluster: ClusterOptions | None = None) -> Summary:
        """Write the output: unnamed files put in place together when all are complete, so an error, interrupt
        or kill leaves the targets as they were. ``threads`` None = all cores; ``stats``: RMS error per tensor
        in the summary; ``overwrite``: replace existing outputs (never an input). ``cluster``: compute the tensors
        on a Ray cluster (gguftool.distributed; the same bytes; ``threads`` is then ignored for cluster.threads)."""
        from .pipeline.execute import execute

        if self.output is None:
            raise PolicyError("no output file given")
        if cluster is not None:
            from .distributed.execute import execute_on_cluster

            return execute_on_cluster(self.source, self.plan, self.output, cluster, stats=stats,
                                      overwrite=overwrite, protect=self.inputs, progress=progress)
        return execute(self.source, self.plan, self.output, threads=threads, stats=stats, overwrite=overwrite,
                       protect=self.inputs, progress=progress)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- convert: Hugging Face checkpoint -> GGUF


def plan_convert(model: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, *,
                 type: str = "auto", name: str | None = None, vocab_only: bool = False,
                 options: QuantizeOptions | None = None, revision: str | None = None,
                 allow_requantize: bool = False, threads: int | None = None,
                 search_progress: SearchProgress | None = None) -> Job:
    """Plan converting the Hugging Face checkpoint ``model`` (a .safetensors file or its folder, with config.json
    and tokenizer files; or, when no such path exists, a Hub repo id such as "Qwen/Qwen3-0.6B" at ``revision``,
    fetched through huggingface_hub's cache) to GGUF at ``type`` (an ftype such as "Q4_K_M", "Q8_0", "F16"; "auto" =
    BF16 for a BF16 checkpoint, else F16; FP8 checkpoints are dequantized as llama.cpp's converter does).
    ``output`` None: ``<checkpoint dir>/<name>-<TYPE>.gguf`` (for a repo id, in the current directory). Only
    headers are read (and, for a repo id not cached yet, the files conversion needs downloaded), except with a
    target size (``options.target_size`` / ``target_bpw``): the allocation measures the model first (``threads``,
    ``search_progress(phase, done, total)``), and ``type`` then names the stock mix compared with ("auto": the
    nearest size). ``allow_requantize``: convert tensors the checkpoint holds quantized (gpt-oss's MXFP4 experts)
    to other types, as llama-quantize --allow-requantize (otherwise refused)."""
    from .hf.hub import resolve_model
    from .hf.source import open_hf_source
    from .pipeline import policy as P
    from .pipeline.plan import make_plan

    path, repo_id = resolve_model(os.fspath(model), revision)
    src = open_hf_source(path, outtype="auto", name=name or repo_id, vocab_only=vocab_only)
    ck, vocab = src.checkpoint, src.vocab
    assert ck is not None and vocab is not None    # open_hf_source sets both
    try:
        o = options or QuantizeOptions()
        type_name = type.strip().upper()
        alloc = None
        if o.has_target:
            alloc, cfg = _allocate(src, None if type_name == "AUTO" else type_name, o, "convert", allow_requantize,
                                   False, threads, search_progress)
            ftype = alloc.ftype
            plan = make_plan(src, cfg)
        else:
            if type_name == "AUTO":
                type_name = src.auto_type()
            ftype = P.parse_ftype(type_name)
            cfg = _config(ftype, o, allow_requantize=allow_requantize)
            cfg.order = "convert"    # F32/F16/BF16/Q8_0 in convert_hf_to_gguf.py's tensor order
            plan = make_plan(src, cfg)
        out_dir = ck.directory if repo_id is None else os.curdir   # never into the Hub's cache
        out = os.fspath(output) if output is not None else _default_outfile(src.name, out_dir, ftype.name)
        inputs = src.input_files() + _option_files(options)
        return Job(src, plan, ftype, out, inputs, src.close, source_warnings=list(vocab.warnings), allocation=alloc)
    except BaseException:
        src.close()
        raise


def convert(model: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, *, type: str = "auto",
            name: str | None = None, vocab_only: bool = False, options: QuantizeOptions | None = None,
            threads: int | None = None, stats: bool = False, overwrite: bool = False,
            progress: Progress | None = None, revision: str | None = None,
            allow_requantize: bool = False, search_progress: SearchProgress | None = None,
            cluster: ClusterOptions | None = None) -> Summary:
    """Convert a Hugging Face checkpoint to GGUF in one step (see plan_convert and Job.run for the arguments).

    The file equals llama.cpp's convert_hf_to_gguf.py --outtype f32 (bf16 for a BF16 checkpoint) followed by
    llama-quantize TYPE: the same metadata (but the descriptive general.* keys) and byte-identical tensors."""
    with plan_convert(model, output, type=type, name=name, vocab_only=vocab_only, options=options,
                      revision=revision, allow_requantize=allow_requantize, threads=threads,
                      search_progress=search_progress) as job:
        return job.run(threads=threads, stats=stats, overwrite=overwrite, progress=progress, cluster=cluster)


def _default_outfile(name: str, directory: str | os.PathLike[str], type_name: str) -> str:
    stem = re.sub(r"[^\w.+-]+", "-", name).strip("-") or "model"
    return os.path.join(os.fspath(directory), f"{stem}-{type_name}.gguf")


# --- quantize: GGUF -> GGUF


def plan_quantize(input: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, *,
                  type: str | None = None, allow_requantize: bool = False, keep_split: bool = False,
                  dry_run: bool = False, options: QuantizeOptions | None = None, threads: int | None = None,
                  search_progress: SearchProgress | None = None) -> Job:
    """Plan quantizing the GGUF file ``input`` (the first file of a split model opens all its splits) with
    llama-quantize's per-tensor mix for ``type``. ``allow_requantize``: accept quantized input tensors
    (dequantized first); ``keep_split``: one output file per input split, as llama-quantize --keep-split;
    ``dry_run``: a plan for looking at only (``output`` may be None). With a target size (``options.target_size``
    / ``target_bpw``) the allocation measures the model first (``threads``, ``search_progress(phase, done,
    total)``) and ``type``, optional then, names the stock mix compared with (None: the nearest size)."""
    from .gguf.source import open_gguf_source
    from .pipeline import policy as P
    from .pipeline.plan import make_plan

    o = options or QuantizeOptions()
    if type is None and not o.has_target:
        raise PolicyError("no quantization type given (--type, or --target-size / --target-bpw)")
    ftype = P.parse_ftype(type) if type is not None else None
    src = open_gguf_source(input)
    try:
        alloc = None
        if o.has_target:
            if keep_split:
                raise PolicyError("--keep-split cannot be combined with --target-size / --target-bpw")
            alloc, cfg = _allocate(src, type, o, "llama", allow_requantize, dry_run, threads, search_progress)
            ftype = alloc.ftype
        else:
            assert ftype is not None
            cfg = _config(ftype, o, allow_requantize=allow_requantize)
        cfg.keep_split = keep_split
        plan = make_plan(src, cfg, dry_run=dry_run)
        out = os.fspath(output) if output is not None else None
        return Job(src, plan, ftype, out, src.input_files() + _option_files(options), src.close, allocation=alloc)
    except BaseException:
        src.close()
        raise


def quantize_file(input: str | os.PathLike[str], output: str | os.PathLike[str], *, type: str | None = None,
                  allow_requantize: bool = False, keep_split: bool = False, options: QuantizeOptions | None = None,
                  threads: int | None = None, stats: bool = False, overwrite: bool = False,
                  progress: Progress | None = None, search_progress: SearchProgress | None = None,
                  cluster: ClusterOptions | None = None) -> Summary:
    """Quantize a GGUF file (see plan_quantize and Job.run for the arguments); the tensors written are
    byte-identical to llama-quantize's for the same input and options."""
    with plan_quantize(input, output, type=type, allow_requantize=allow_requantize, keep_split=keep_split,
                       options=options, threads=threads, search_progress=search_progress) as job:
        return job.run(threads=threads, stats=stats, overwrite=overwrite, progress=progress, cluster=cluster)


# --- imatrix: gguftool.imatrix(...) is gguftool.importance.run.compute_imatrix, exported by gguftool/__init__.py


# --- the options as a pipeline configuration


def _option_files(options: QuantizeOptions | None) -> list[str]:
    if options is None:
        return []
    return [os.fspath(p) for p in (options.imatrix, options.tensor_type_file, options.calib, options.sensitivities)
            if p is not None]


def _allocate(src: TensorSource, reference: str | None, o: QuantizeOptions, order: str, allow_requantize: bool,
              dry_run: bool, threads: int | None, progress: SearchProgress | None) -> tuple[Allocation, QuantizeConfig]:
    """The per-tensor allocation for o's target, and the pipeline configuration that writes it."""
    from .allocation.search import Target, allocate, parse_size
    from .pipeline import policy as P
    from .pipeline.plan import make_plan

    if o.target_size is not None and o.target_bpw is not None:
        raise PolicyError("--target-size and --target-bpw cannot be used together")
    if o.pure or o.tensor_types or o.tensor_type_file or o.output_tensor_type or o.token_embedding_type:
        raise PolicyError("--target-size / --target-bpw choose every tensor's type: they cannot be combined with "
                          "--pure, --tensor-type(-file), --output-tensor-type or --token-embedding-type")
    if o.imatrix is None:
        raise PolicyError("--target-size / --target-bpw need an importance matrix (--imatrix)")
    if o.split_max_size is not None or o.split_max_tensors is not None:
        raise PolicyError("--target-size / --target-bpw write one file (no --split-max-size / --split-max-tensors)")
    target = Target(size=None if o.target_size is None else parse_size(o.target_size), bpw=o.target_bpw,
                    calib=None if o.calib is None else os.fspath(o.calib),
                    sensitivities=None if o.sensitivities is None else os.fspath(o.sensitivities),
                    calib_ctx=o.calib_ctx, calib_chunks=o.calib_chunks, reference=reference, probe=o.probe)
    base = _config(P.FTYPES["Q8_0"], o, allow_requantize=allow_requantize)   # reads the imatrix once

    def plan_with(ftype: FileType, kvs: list, tensor_types: list) -> Plan:
        cfg = _with(base, ftype, kvs, tensor_types, order)
        return make_plan(src, cfg, dry_run=dry_run)

    weights = plan_with(P.FTYPES["Q8_0"], [], []).imatrix
    alloc = allocate(src, plan_with, target, weights, threads=threads, progress=progress)
    return alloc, _with(base, alloc.ftype, alloc.kvs, alloc.tensor_types(), order)


def _with(base: QuantizeConfig, ftype: FileType, kvs: list, tensor_types: list, order: str) -> QuantizeConfig:
    import dataclasses

    return dataclasses.replace(base, ftype=ftype, kv_overrides=list(base.kv_overrides) + list(kvs),
                               tensor_types=list(tensor_types), order=order)


def _config(ftype: FileType, o: QuantizeOptions, allow_requantize: bool = False) -> QuantizeConfig:
    """The pipeline configuration for the options (the imatrix file is read here, so its errors come first)."""
    from .pipeline.plan import QuantizeConfig, parse_kv_override

    if o.include_weights and o.exclude_weights:
        raise PolicyError("--include-weights and --exclude-weights cannot be used together")
    if o.split_max_size is not None and o.split_max_tensors is not None:
        raise PolicyError("--split-max-size and --split-max-tensors cannot be used together")
    cfg = QuantizeConfig(
        ftype=ftype, pure=o.pure, leave_output_tensor=o.leave_output_tensor,
        output_tensor_type=_target_type(o.output_tensor_type, "--output-tensor-type"),
        token_embedding_type=_target_type(o.token_embedding_type, "--token-embedding-type"),
        tensor_types=_tensor_types(list(o.tensor_types), o.tensor_type_file),
        include_weights=list(o.include_weights), exclude_weights=list(o.exclude_weights),
        allow_requantize=allow_requantize, kv_overrides=[parse_kv_override(s) for s in o.override_kv],
        split_max_bytes=_split_size(o.split_max_size), split_max_tensors=o.split_max_tensors)
    if o.imatrix is not None:
        from .importance.files import read_imatrix

        cfg.imatrix = read_imatrix(o.imatrix)
        cfg.imatrix_path = os.fspath(o.imatrix)
    return cfg


def _target_type(text: str | None, what: str) -> GGMLType | None:
    from .pipeline import policy as P

    return P.parse_target_type(text, what) if text else None


def _split_size(size: str | int | None) -> int | None:
    """Bytes of tensor data per split file: an int, or a whole number of M or G (decimal, as gguf-split)."""
    if size is None or isinstance(size, int):
        if isinstance(size, int) and size <= 0:
            raise PolicyError(f"--split-max-size {size}: expected a positive size")
        return size
    text = size.strip().upper()
    unit = {"M": 10**6, "G": 10**9}.get(text[-1:])
    if unit is None or not text[:-1].isdigit() or int(text[:-1]) <= 0:
        raise PolicyError(f"--split-max-size {size!r}: expected a positive whole number of M or G, e.g. 40G")
    return int(text[:-1]) * unit


def _tensor_types(items: list[str], path: str | os.PathLike[str] | None) -> list[tuple[str, GGMLType]]:
    """The REGEX=TYPE entries of --tensor-type and of the --tensor-type-file, each error naming where the entry
    came from (the option, or the file and line)."""
    import re

    from .pipeline import policy as P

    entries = [(item, f"--tensor-type {item!r}") for item in items]
    if path is not None:
        name = os.fspath(path)
        try:
            with open(name, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise PolicyError(f"--tensor-type-file {name}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise PolicyError(f"--tensor-type-file {name}: line {line} is not valid UTF-8 (byte "
                              f"0x{raw[e.start]:02x} at offset {e.start})") from None
        for lineno, line_text in enumerate(text.splitlines(), 1):
            entries += [(item, f"--tensor-type-file {name} line {lineno}: {item!r}") for item in line_text.split()]
    out = []
    for item, where in entries:
        pattern, sep, t = item.partition("=")
        if not sep:
            raise PolicyError(f"{where}: malformed, expected REGEX=TYPE")
        if not pattern:
            raise PolicyError(f"{where}: missing tensor name pattern")
        if not t:
            raise PolicyError(f"{where}: missing quantization type")
        try:   # the policy compiles it again; checked here so that the error names where the pattern came from
            re.compile(pattern.lower())
        except re.error as e:
            raise PolicyError(f"invalid --tensor-type pattern {pattern!r} ({where}): {e}") from None
        out.append((pattern, P.parse_target_type(t, where)))
    return out
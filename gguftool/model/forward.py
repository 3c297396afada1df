"""A float32 numpy forward pass of llama-family decoders, the same computation llama.cpp's CPU graph does.

Used by ``gguftool imatrix``: every matrix multiplication reports its input to a hook before it runs, so the
importance matrix can accumulate the per-column sums of squares llama-imatrix collects.

Architectures: ``llama`` (and ``mistral``), ``qwen2`` (Q/K/V biases), ``qwen3`` (per-head Q/K RMSNorm),
``gemma3`` (scaled embeddings, pre/post norms, GELU gate, alternating sliding-window / global layers), ``gemma2``
(the same without Q/K norms, every other layer sliding, attention scores soft-capped), ``phi3`` (fused QKV and
gate|up weights, LongRoPE factors and attention factor), and the
mixture-of-experts FFN of ``llama`` (Mixtral) and ``qwen3moe``: softmax router, top-k experts, renormalized
weights (build_moe_ffn); the experts' inputs go to ``hook.experts`` as llama-imatrix collects MUL_MAT_ID inputs.
DeepSeek-V2/V3's layer is :mod:`.mla`'s, gpt-oss's :mod:`.gptoss`'s (attention sinks: ``_attention(..., sinks=)``).

Where the pieces live: the hyperparameters in :mod:`.config`, the norm / RoPE / activation functions in
:mod:`.ops`, the activation conversion of ggml's quantized matmuls in :mod:`.activations`, the threads in
:mod:`.threads`. The KV cache holds K and V as float16 (llama.cpp's default cache type), so K (after RoPE) and V
are rounded to float16 before attention (``kv_f16``); Q stays float32, and attention is computed as ggml's tiled
CPU flash-attention kernel does (:mod:`.attention`: 64-key tiles, online softmax). Matrix products are float32
BLAS (numpy), but for BF16 weights (and F16 ones with ``exact``) summed in tinyBLAS's order (:mod:`.tinyblas`; bit
for bit with llama.cpp).

One pass (``Model.forward``) runs layer by layer; within a layer, the row-wise stages (norm + Q/K/V + RoPE,
output projection + residual + FFN input, FFN down + residual) are split over the worker threads by rows, and
attention by (sequence, KV head, query block). The buffers of a pass are a ``_PassState``.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from ..errors import ImatrixError
from . import gptoss, mla
from .attention import flash_attention
from .activations import BLOCK_MIN_BYTES, VEC_DOT, activations_as, block_minima
from .config import GEMMA_ARCHS, QK_NORM_ARCHS, ModelConfig
from .ops import gelu_f16_table, rms_norm, rope_cache, rope_into, swiglu_into
from .threads import WorkerPool
from .tinyblas import tinyblas_applies, tinyblas_matmul
from .weights import WeightStore, layer_of
from .widen import round_f16

if TYPE_CHECKING:
    from ..pipeline.source import TensorSource

__all__ = ["ExpertHook", "Hook", "Model", "ModelConfig", "rms_norm", "rope_cache"]

# hook(weight_names, x): x is the (n_tokens, n_in) float32 input of a matmul by each of the named weights
Hook = Callable[[Sequence[str], np.ndarray], None]


class ExpertHook:
    """A hook that also wants the experts' matmul inputs of a mixture-of-experts layer (llama-imatrix collects
    MUL_MAT_ID inputs per expert). A plain Hook callable sees only the dense matmuls."""

    def __call__(self, names: Sequence[str], x: np.ndarray) -> None:
        raise NotImplementedError

    def experts(self, names: Sequence[str], expert: int, x: np.ndarray, n_expert: int) -> None:
        """x: the (n_routed_tokens, n_in) input of expert ``expert`` of ``n_expert`` for each of the named weights."""
        raise NotImplementedError


@dataclass
class _PassState:
    """The activations of one forward pass over B sequences of T tokens (N = B * T rows, sequence-major)."""
    B: int
    T: int
    pos: np.ndarray          # (N,) position of each row in its sequence
    x: np.ndarray            # (N, n_embd) the residual stream
    h: np.ndarray            # (N, n_embd) the normed input of the current layer's Q/K/V or FFN products
    q: np.ndarray            # (N, H, D) after RoPE
    k: np.ndarray            # (N, Hkv, D) after RoPE (float16-rounded with kv_f16)
    v: np.ndarray            # (N, Hkv, Dv)
    o: np.ndarray            # (B, T, Hkv, G, Dv) attention output
    m: np.ndarray            # (N, n_ff) FFN activations, the input of ffn_down (empty for MoE)


# --- model
class Model:
    """Weights (float32: a dict or a WeightStore) and the forward pass. Build with ``Model.from_source(source)``."""

    query_block = 128   # attention rows computed at once
    flash_attn = True   # attention as ggml's CPU flash-attention kernel (llama.cpp's default), see model.attention
    block_values = 1 << 22      # at most this many weight values per product job (16 MiB of float32 scratch)
    small_product = 1 << 16     # weights of at most this many values are multiplied in one job
    product_blocks = 16         # bigger ones in this many jobs (fewer: min_block_rows; more: block_values)
    min_block_rows = 1024       # ... of at least this many rows (within block_values): see _block_rows
    slab_values = 1 << 23       # quantized weights are dequantized this many values at a time (32 MiB)
    # the products summed in llama.cpp's tinyBLAS order (model.tinyblas), by activation kind: BF16 always (bit for
    # bit llama.cpp's, and faster than BLAS on float32 widened from BF16 plus its own pass), F16 with exact=True
    # (about 10 % slower than BLAS at 2 threads)
    tinyblas_kinds: frozenset[str] = frozenset({"bf16"})

    def __init__(self, config: ModelConfig, weights: Mapping[str, np.ndarray], kv_f16: bool = True,
                 n_threads: int = 1, *, origin: str = ""):
        self.cfg = config
        self.origin = origin                     # the model file, for error messages
        self.workers = WorkerPool(n_threads)
        self.w = weights
        self.kv_f16 = kv_f16
        self._tls = threading.local()                # each thread's scratch for widened weight rows
        self._slab_scratch = np.empty(0, dtype=np.float32)   # the main thread's dequantized slab
        self.act_kinds: dict[str, str] = {}          # weight -> vec_dot conversion of its activations
        self.block_minima: dict[str, np.ndarray] = {}  # Q4_1/Q5_1 weight -> its block minima
        self._rope: dict = {}
        self._pool: dict[tuple, np.ndarray] | None = None   # a pass's reused buffers (see _buffer)
        self._check()

    # required tensors per layer, by architecture
    def _layer_names(self, il: int) -> list[str]:
        if self.cfg.mla is not None:
            return mla.layer_names(self.cfg, il)
        if self.cfg.arch == gptoss.ARCH:
            return gptoss.layer_names(self.cfg, il)
        p = f"blk.{il}."
        names = [p + "attn_norm.weight", p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight",
                 p + "attn_output.weight", p + "ffn_norm.weight"]
        if self.cfg.n_expert:
            names += [p + "ffn_gate_inp.weight", p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight",
                      p + "ffn_down_exps.weight"]
        else:
            names += [p + "ffn_gate.weight", p + "ffn_up.weight", p + "ffn_down.weight"]
        if self.cfg.arch in QK_NORM_ARCHS:
            names += [p + "attn_q_norm.weight", p + "attn_k_norm.weight"]
        if self.cfg.arch in GEMMA_ARCHS:
            names += [p + "post_attention_norm.weight", p + "post_ffw_norm.weight"]
        if self.cfg.arch == "phi3":   # fused Q/K/V and gate|up
            names = [n for n in names if not n.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight",
                                                          "ffn_gate.weight"))]
            names.append(p + "attn_qkv.weight")
        return names

    def _file_error(self, message: str) -> ImatrixError:
        """An error about the file's contents (a size or shape): the message starts with the file."""
        return ImatrixError(f"{self.origin}: {message}" if self.origin else message)

    def _check(self) -> None:
        """The configuration against the tensors present, before anything sized by it is built: the layer count
        first, then every tensor the forward pass uses (present, right shape)."""
        cfg = self.cfg
        layers = {layer_of(n) for n in self.w} - {-1}
        n_found = max(layers) + 1 if layers else 0
        if n_found != cfg.n_layer:
            raise self._file_error(f"bad metadata: {cfg.arch}.block_count = {cfg.n_layer}, but the tensors are "
                                   f"those of {n_found} layers")
        need = ["token_embd.weight", "output_norm.weight"]
        for il in range(cfg.n_layer):
            need += self._layer_names(il)
        missing = [n for n in need if n not in self.w]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ImatrixError(f"the model is missing tensor {missing[0]}{more}")
        emb = self._shape("token_embd.weight")
        if len(emb) != 2 or emb[1] != cfg.n_embd:
            raise self._file_error(f"tensor token_embd.weight has shape {emb[::-1]}, expected ({cfg.n_embd}, "
                                   "n_vocab)")
        if cfg.n_vocab and cfg.n_vocab != emb[0]:
            raise self._file_error(f"bad metadata: {cfg.arch}.vocab_size = {cfg.n_vocab}, but token_embd.weight "
                                   f"has {emb[0]} rows")
        if not cfg.n_vocab:
            cfg.n_vocab = emb[0]
        single = {"output_norm.weight": (cfg.n_embd,), "output.weight": (cfg.n_vocab, cfg.n_embd)}
        half_rot = (cfg.rope_dims // 2,)
        for name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
            single[name] = half_rot
        for name, shape in single.items():
            if name in self.w:
                self._check_shape(name, shape)
        if cfg.mla is not None:
            for il in range(cfg.n_layer):
                for name, shape in mla.expected_shapes(cfg, il).items():
                    if name in self.w:
                        self._check_shape(name, shape)
            return
        if cfg.arch == gptoss.ARCH:
            for il in range(cfg.n_layer):
                for name, shape in gptoss.expected_shapes(cfg, il).items():
                    self._check_shape(name, shape)
            return
        expect = {
            "attn_norm.weight": (cfg.n_embd,), "ffn_norm.weight": (cfg.n_embd,),
            "attn_q.weight": (cfg.n_head * cfg.head_dim, cfg.n_embd),
            "attn_k.weight": (cfg.n_head_kv * cfg.head_dim, cfg.n_embd),
            "attn_v.weight": (cfg.n_head_kv * cfg.head_dim_v, cfg.n_embd),
            "attn_output.weight": (cfg.n_embd, cfg.n_head * cfg.head_dim_v),
        }
        if cfg.arch in QK_NORM_ARCHS:
            expect.update({"attn_q_norm.weight": (cfg.head_dim,), "attn_k_norm.weight": (cfg.head_dim,)})
        if cfg.arch in GEMMA_ARCHS:
            expect.update({"post_attention_norm.weight": (cfg.n_embd,), "post_ffw_norm.weight": (cfg.n_embd,)})
        if cfg.n_expert:
            E, ff = cfg.n_expert, cfg.n_ff_exp
            expect.update({"ffn_gate_inp.weight": (E, cfg.n_embd), "ffn_gate_exps.weight": (E, ff, cfg.n_embd),
                           "ffn_up_exps.weight": (E, ff, cfg.n_embd), "ffn_down_exps.weight": (E, cfg.n_embd, ff)})
        elif cfg.arch == "phi3":
            for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight"):
                del expect[n]
            expect.update({"attn_qkv.weight": ((cfg.n_head + 2 * cfg.n_head_kv) * cfg.head_dim, cfg.n_embd),
                           "ffn_up.weight": (2 * cfg.n_ff, cfg.n_embd), "ffn_down.weight": (cfg.n_embd, cfg.n_ff)})
            if ("rope_factors_long.weight" in self.w) != ("rope_factors_short.weight" in self.w):
                raise ImatrixError("a LongRoPE model needs both rope_factors_long and rope_factors_short")
        else:
            expect.update({"ffn_gate.weight": (cfg.n_ff, cfg.n_embd), "ffn_up.weight": (cfg.n_ff, cfg.n_embd),
                           "ffn_down.weight": (cfg.n_embd, cfg.n_ff)})
        biases = {n[:-len("weight")] + "bias": shape[:1] for n, shape in expect.items() if len(shape) == 2}
        for il in range(cfg.n_layer):
            for suffix, shape in expect.items():
                self._check_shape(f"blk.{il}.{suffix}", shape)
            for suffix, shape in biases.items():
                if f"blk.{il}.{suffix}" in self.w:
                    self._check_shape(f"blk.{il}.{suffix}", shape)

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if self._shape(name) != shape:
            raise self._file_error(f"tensor {name} has shape {self._shape(name)[::-1]}, expected {shape[::-1]}")

    def _shape(self, name: str) -> tuple[int, ...]:
        """Shape of weight ``name`` (numpy order) without reading it from a WeightStore."""
        if isinstance(self.w, WeightStore):
            return self.w.shape(name)
        return tuple(self.w[name].shape)

    @classmethod
    def from_source(cls, source: TensorSource, kv_f16: bool = True, n_threads: int = 1, as_stored: bool = True,
                    *, origin: str = "", exact: bool = False) -> "Model":
        """A model over the tensors of a TensorSource, kept in their stored form (see model.weights).

        ``as_stored``: convert matmul activations for each weight's stored type as llama.cpp does (see
        ``activations_as``); False evaluates the model as its F32 dequantization. ``origin``: the model file,
        named in error messages. ``exact``: F16 products summed in llama.cpp's tinyBLAS order too (model.tinyblas;
        BF16 ones always are), so that the pass is bit for bit its x86 AVX2 CPU graph, ~10 % slower."""
        cfg = ModelConfig.from_metadata(source, origin=origin)
        where = f"{origin}: " if origin else ""
        for t in source.tensors:
            per_head = cfg.mla is not None and t.name.endswith(("attn_k_b.weight", "attn_v_b.weight"))
            if len(t.shape) > 3 or (len(t.shape) == 3 and not t.name.endswith("_exps.weight") and not per_head):
                raise ImatrixError(f"{where}tensor {t.name} has {len(t.shape)} dimensions: not a weight gguftool "
                                   "can evaluate")
        model = cls(cfg, WeightStore(source.tensors), kv_f16=kv_f16, n_threads=n_threads,
                    origin=origin)   # checks the configuration against the tensors before anything is read
        kinds: dict[str, str] = {}
        minima: dict[str, np.ndarray] = {}
        for t in source.tensors:
            tname = t.type.name
            kind = VEC_DOT.get(tname) if as_stored else None
            if kind is not None and len(t.shape) >= 2:
                kinds[t.name] = kind
                if tname in BLOCK_MIN_BYTES:
                    n_rows = t.n_elements // t.shape[0]
                    m = block_minima(t.read_raw(), BLOCK_MIN_BYTES[tname], n_rows)
                    minima[t.name] = m.reshape(t.shape[2], t.shape[1], -1) if len(t.shape) == 3 else m
        model.act_kinds = kinds
        model.tinyblas_kinds = frozenset({"bf16", "f16"}) if exact else cls.tinyblas_kinds
        model.block_minima = minima
        return model

    @property
    def output_name(self) -> str:
        """The weight the logits are computed with ('output.weight', or 'token_embd.weight' when tied)."""
        return "output.weight" if "output.weight" in self.w else "token_embd.weight"

    def weight_names(self) -> list[str]:
        """Names of the matmul weights a forward pass reports to the hook (MoE experts: to ``hook.experts``)."""
        if self.cfg.arch == gptoss.ARCH:
            names = [n for il in range(self.cfg.n_layer) for n in gptoss.matmul_weights(self.cfg, il)]
        else:
            names = [n for il in range(self.cfg.n_layer) for n in self._layer_names(il)
                     if not n.endswith("norm.weight")]
        return names + [self.output_name]

    def _rope_tables(self, n_pos: int, il: int):
        cfg = self.cfg
        swa = bool(cfg.swa_layers) and cfg.swa_layers[il]
        base = cfg.rope_base_swa if swa else cfg.rope_base
        fs = cfg.rope_freq_scale_swa if swa else cfg.rope_freq_scale
        yarn = cfg.yarn_corr_swa if swa else cfg.yarn_corr
        ff = self.w.get("rope_freqs.weight")
        if "rope_factors_short.weight" in self.w:   # LongRoPE: llama_model::get_rope_factors by context size
            long = cfg.rope_orig_ctx and n_pos > cfg.rope_orig_ctx
            ff = self.w["rope_factors_long.weight" if long else "rope_factors_short.weight"]
        key = (n_pos, base, fs, ff is not None, yarn)
        tab = self._rope.get(key)
        if tab is None:
            tab = rope_cache(n_pos, cfg.rope_dims, base, fs, ff, cfg.rope_attn_factor, yarn)
            self._rope[key] = tab
        return tab

    # --- matrix products
    def _out_rows(self, name: str) -> int:
        """Rows of weight ``name`` (of one expert's matrix for a 3-D tensor): the product's output columns."""
        return self._shape(name)[-2]

    def _weight_rows(self, name: str, r0: int, r1: int, scratch: np.ndarray | None) -> np.ndarray:
        """Rows [r0, r1) of a weight (experts stacked: expert e's rows start at e * rows) as float32."""
        if isinstance(self.w, WeightStore):
            return self.w.rows_into(name, r0, r1, scratch)
        a = self.w[name]
        return a.reshape(-1, a.shape[-1])[r0:r1]

    def _slab_first(self, name: str) -> bool:
        """True for a weight dequantized a slab at a time by numba's own threads (quantized types without a
        nogil driver in quants.decode: those kernels hold the GIL) before the products; False for F32 (views),
        F16, BF16 and the types of quants.decode (each job decodes its own block, all threads at once)."""
        return isinstance(self.w, WeightStore) and not self.w.decodes_in_thread(name)

    def _scratch(self, n: int) -> np.ndarray:
        """This thread's float32 scratch buffer, at least n values (reused from product to product)."""
        buf = getattr(self._tls, "buf", None)
        if buf is None or buf.size < n:
            buf = np.empty(n, dtype=np.float32)
            self._tls.buf = buf
        return buf

    def _buffer(self, key: tuple, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """An uninitialized array of ``shape`` and ``dtype``: within a pass (run_layers) the same array for the same
        ``key`` each time (layer after layer), else a new one. Fresh arrays of this size (tens of MB per product on
        a 1.5B model) cost a page fault per 4 KiB page touched, ~15 % of the CPU time on SmolLM2 in system time.
        A key's array is overwritten at its next use: keys name a product's role in the layer, whose result is
        consumed before the next layer's product of that role."""
        if self._pool is None:
            return np.empty(shape, dtype=dtype)
        a = self._pool.get(key)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = self._pool[key] = np.empty(shape, dtype=dtype)
        return a

    def _convert(self, x: np.ndarray, kind: str | None, parallel: bool):
        """activations_as(x, kind), split over the workers by rows."""
        if kind is None:
            return x, None
        if not parallel or x.shape[0] < 64:
            return activations_as(x, kind)
        xq = self._buffer(("act", kind, x.shape[1]), x.shape,     # used by this product call only
                          np.uint16 if kind == "f16_bits" else np.float32)

        def part(rows: tuple[int, int]) -> np.ndarray | None:
            r0, r1 = rows      # each worker converts its rows straight into the pass's buffer
            return activations_as(x[r0:r1], kind, out=xq[r0:r1])[1]

        corrs = [c for c in self.workers.map(part, self.workers.row_ranges(x.shape[0])) if c is not None]
        return xq, (np.concatenate(corrs) if corrs else None)

    def _products(self, x: np.ndarray, names: Sequence[str], expert: int | None = None,
                  parallel: bool = True, role: str | None = None) -> list[np.ndarray]:
        """x @ W.T for each named weight (all multiplying the same x), with the activations converted as ggml's
        CPU matmul converts them for each W's type (see model.activations) and the weights read in their stored
        form: the output columns are cut in blocks, and each job widens its block of W's rows into its thread's
        scratch and multiplies (one BLAS GEMM, single-threaded BLAS; M = all the batch's tokens amortizes the
        widening). Quantized weights are first dequantized a slab at a time (numba's threads), then multiplied
        by blocks the same way. ``expert``: the expert's matrix of 3-D weights. ``parallel``: False when called
        from a worker thread (MoE experts): everything runs in the calling thread. ``role``: the results go to
        the pass's buffers of that role (see _buffer; main thread only), else to new arrays."""
        N = x.shape[0]
        conv: dict = {}
        kinds = [self._input_kind(n) for n in names]
        for kind in kinds:
            if kind not in conv:
                conv[kind] = self._convert(x, kind, parallel)
        ys: list[np.ndarray] = []
        jobs: list[tuple] = []
        for i, n in enumerate(names):
            C = self._out_rows(n)
            K = self._shape(n)[-1]
            base = C * expert if expert is not None else 0
            y = self._buffer((role, i), (N, C)) if role is not None and parallel else \
                np.empty((N, C), dtype=np.float32)
            ys.append(y)
            xq = conv[kinds[i]][0]
            blk = self._block_rows(C, K)
            if self._slab_first(n):
                slab = max(blk, (self.slab_values // max(K, 1)) // blk * blk)
                scratch = self._slab_scratch if parallel else None
                for s0 in range(0, C, slab):
                    s1 = min(C, s0 + slab)
                    if scratch is not None and scratch.size < (s1 - s0) * K:
                        scratch = self._slab_scratch = np.empty((s1 - s0) * K, dtype=np.float32)
                    w = self._weight_rows(n, base + s0, base + s1, scratch)
                    sjobs = [(xq, w[c0 - s0:min(s1, c0 + blk) - s0], y, c0) for c0 in range(s0, s1, blk)]
                    self._run(sjobs, parallel)
            else:
                jobs += [(xq, (n, base + c0, base + min(C, c0 + blk)), y, c0) for c0 in range(0, C, blk)]
        self._run(jobs, parallel)
        for n, kind, y in zip(names, kinds, ys):
            corr = conv[kind][1]
            if corr is not None and n in self.block_minima:
                m = self.block_minima[n]
                y += corr @ (m[expert] if expert is not None else m).T
        return ys

    def _block_rows(self, C: int, K: int) -> int:
        """Weight rows per product job: a product of at most ``small_product`` values is one job, a bigger one
        ``product_blocks`` jobs, but of at least ``min_block_rows`` rows and at most ``block_values`` values.

        Narrow blocks are slow: each job's GEMM packs the whole activation matrix again (M = 2048 tokens x K) for
        its few output columns. OpenBLAS at one thread, M = 2048 (scripts/bench_gemm_blocks.py, Zen 3): K = 2048:
        46 GFLOPS at 32 rows, 65-80 at 128, 78 at 256, 89 at 512, 93 at 1024; K = 8192: 85 at 256, 90 at 512.
        Blocks of >= 1024 rows (within block_values: 512 at K = 8192) took a 1.5B Q4_K_M model's GEMM from 71.4 to
        ~64.8 s of CPU a pass (4 x 512 tokens) against 256-row ones.

        The blocks depend on the shapes only, never on the thread count: BLAS rounds a block differently from the
        whole product or another cut of it (OpenBLAS 0.3.31 does, for every block size tried), and the activation
        rounding downstream can amplify a last-bit difference, so the same model gives the same numbers with any
        number of threads."""
        if C * K <= self.small_product:
            return C
        blk = -(-C // self.product_blocks)
        blk = max(-(-blk // 16) * 16, self.min_block_rows)
        blk = min(blk, self.block_values // max(K, 1) // 16 * 16)
        return max(16, min(blk, C))

    def _input_kind(self, name: str) -> str | None:
        """The conversion of weight ``name``'s activations (activations_as): its vec_dot type, but F16 bits for an
        F16 product in tinyBLAS's order (model.tinyblas reads them at half the bytes of float32)."""
        kind = self.act_kinds.get(name)
        return "f16_bits" if kind == "f16" and self._tinyblas(name) else kind

    def _product_job(self, job: tuple) -> None:
        xq, w, y, c0 = job
        exact = False
        if isinstance(w, tuple):          # (name, r0, r1): read here (widened into this thread's scratch)
            name, r0, r1 = w
            exact = self._tinyblas(name)
            stored = self.w.stored_16bit_rows(name, r0, r1) if exact and isinstance(self.w, WeightStore) else None
            w = stored if stored is not None else \
                self._weight_rows(name, r0, r1, self._scratch((r1 - r0) * xq.shape[1]))
        if exact:       # F16/BF16: summed in tinyBLAS's order, bit for bit (see model.tinyblas)
            tinyblas_matmul(xq, w, y[:, c0:c0 + w.shape[0]])
        else:
            np.matmul(xq, w.T, out=y[:, c0:c0 + w.shape[0]])

    def _tinyblas(self, name: str) -> bool:
        """Whether this weight's product is summed in tinyBLAS's order (``tinyblas_matmul``): its activation kind is
        one of ``tinyblas_kinds`` and ggml multiplies it with llamafile's tinyBLAS F16/BF16 kernel (2-D weight, K a
        multiple of 8, rows a multiple of 4)."""
        if self.act_kinds.get(name) not in self.tinyblas_kinds:
            return False
        shape = self._shape(name)
        return len(shape) == 2 and tinyblas_applies(shape[1], shape[0])

    def _run(self, jobs: list[tuple], parallel: bool) -> None:
        if parallel:
            self.workers.map(self._product_job, jobs)
        else:
            for j in jobs:
                self._product_job(j)

    def _matmul(self, x: np.ndarray, name: str) -> np.ndarray:
        """x @ W.T with the activations converted as ggml's CPU matmul converts them for W's type."""
        return self._products(x, (name,))[0]

    def _linears(self, x: np.ndarray, names: Sequence[str], parallel: bool = True,
                 role: str | None = None) -> list[np.ndarray]:
        """x @ W.T (+ bias) for each named weight (``parallel``, ``role``: as for _products)."""
        ys = self._products(x, names, parallel=parallel, role=role)
        for n, y in zip(names, ys):
            b = self.w.get(n[:-len("weight")] + "bias")
            if b is not None:
                y += b
        return ys

    def _mask(self, T: int, il: int) -> np.ndarray:
        """Additive (T, T) mask: -inf above the diagonal (and outside the sliding window on SWA layers)."""
        cfg = self.cfg
        swa = bool(cfg.n_swa and cfg.swa_layers and cfg.swa_layers[il])
        key = ("mask", T, swa)
        m = self._rope.get(key)
        if m is None:
            pos = np.arange(T)
            masked = pos[None, :] > pos[:, None]
            if swa:
                masked |= (pos[:, None] - pos[None, :]) >= cfg.n_swa
            m = np.where(masked, np.float32(-np.inf), np.float32(0.0)).astype(np.float32)
            self._rope[key] = m
        return m

    # --- threads
    def set_threads(self, n: int) -> None:
        """Use n worker threads (BLAS itself stays single-threaded, see model.threads)."""
        self.workers.resize(n)

    @property
    def n_threads(self) -> int:
        return self.workers.n_threads

    # --- the forward pass
    def forward(self, tokens: np.ndarray, hook: Hook | None = None, logits_from: int = 0,
                logits_to: int | None = None, process_output: bool = False,
                record: list[np.ndarray] | None = None, resume: tuple[int, np.ndarray] | None = None,
                on_layer: Callable[[int], None] | None = None) -> np.ndarray:
        """Evaluate ``tokens`` (B, T): B independent sequences at positions 0..T-1.

        Returns logits (B, logits_to - logits_from, n_vocab) for those positions (float32). ``hook`` receives every
        matmul input of a ``blk.*`` weight, and of the output weight when ``process_output``.

        ``record``: a list that receives a copy of the residual stream at the input of every layer (n_layer arrays
        (B * T, n_embd)). ``resume=(il, x)``: start at layer il from such a residual stream (the layers before it
        are skipped: what the sensitivity probes use when only later weights differ from a recorded pass).
        ``on_layer(il)``: called after each layer (a progress display within a long pass).
        """
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None, :]
        B, T = tokens.shape
        if resume is None:
            first, x = 0, self.embed(tokens)
        else:
            first, x0 = resume
            if not 0 <= first <= self.cfg.n_layer or x0.shape != (B * T, self.cfg.n_embd):
                raise ValueError(f"resume at layer {first} with a residual of shape {x0.shape}")
            x = np.array(x0, dtype=np.float32, copy=True)
        lo, hi = logits_from, T if logits_to is None else logits_to
        prune = hook is None and (lo, hi) != (0, T) and first < self.cfg.n_layer and self._prunes_last_layer
        keep = (lo, hi) if prune else None
        x = self.run_layers(x, B, T, range(first, self.cfg.n_layer), hook, record=record, on_layer=on_layer,
                            keep=keep)
        if keep is not None:
            return self.head(x, B, hi - lo)
        return self.head(x, B, T, hook, lo, hi, process_output)

    # The pass in three parts, for a pipeline whose stages hold a share of the layers each
    # (gguftool.distributed.imatrix); forward() is their composition.

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """The residual stream's start for ``tokens`` (B, T): (B*T, n_embd) float32, sequence-major."""
        cfg = self.cfg
        n_rows = self._shape("token_embd.weight")[0]
        if tokens.size and (tokens.min() < 0 or tokens.max() >= n_rows):
            raise ImatrixError(f"token id out of range 0..{n_rows - 1}")
        ids = tokens.reshape(-1)
        if isinstance(self.w, WeightStore):   # only the rows of the tokens present are decoded
            x = self.w.gather("token_embd.weight", ids)
        else:
            x = self.w["token_embd.weight"][ids].astype(np.float32)       # (N, n_embd)
        if cfg.arch in GEMMA_ARCHS:
            x *= np.float32(math.sqrt(cfg.n_embd))
        return x

    def run_layers(self, x: np.ndarray, B: int, T: int, layers: range, hook: Hook | None = None,
                   record: list[np.ndarray] | None = None,
                   on_layer: Callable[[int], None] | None = None,
                   keep: tuple[int, int] | None = None) -> np.ndarray:
        """The residual stream ``x`` (B*T, n_embd) after ``layers`` (updated in place and returned); ``record``
        receives a copy of it at the input of each layer, ``on_layer(il)`` is called after layer il.

        ``keep=(lo, hi)``: only positions lo:hi of each sequence are wanted from the model's last layer, which then
        finishes (from its attention output on) for those rows only, as llama.cpp's graph does with the outputs
        of a batch (inp_out_ids): the rows are independent there, so the wanted ones come out the same. Returns
        them, (B*(hi-lo), n_embd). Only where ``_prunes_last_layer``."""
        st = self._pass_state(B, T, x)
        ranges = self.workers.row_ranges(B * T)
        self._pool = {}
        try:
            for il in layers:
                if record is not None:
                    record.append(st.x.copy())
                st = self._layer(st, il, ranges, hook, keep if il == self.cfg.n_layer - 1 else None)
                if on_layer is not None:
                    on_layer(il)
        finally:
            self._pool = None
        return st.x

    def head(self, x: np.ndarray, B: int, T: int, hook: Hook | None = None, logits_from: int = 0,
             logits_to: int | None = None, process_output: bool = False) -> np.ndarray:
        """The final norm (in place on ``x``) and the logits (B, logits_to - logits_from, n_vocab) of the last
        layer's residual stream ``x``."""
        cfg = self.cfg
        if logits_to is None:
            logits_to = T
        self.workers.map(partial(self._final_norm_rows, x), self.workers.row_ranges(B * T))
        if hook is not None and process_output:
            hook((self.output_name,), x)
        sel = np.ascontiguousarray(x.reshape(B, T, cfg.n_embd)[:, logits_from:logits_to].reshape(-1, cfg.n_embd))
        logits = self._matmul(sel, self.output_name)
        if cfg.final_softcap:                       # gemma2/3: soft-capped logits
            c = np.float32(cfg.final_softcap)
            self.workers.map(partial(self._softcap_rows, logits, c), self.workers.row_ranges(sel.shape[0], 1))
        return logits.reshape(B, logits_to - logits_from, logits.shape[1])

    def _pass_state(self, B: int, T: int, x: np.ndarray) -> _PassState:
        """The residual stream ``x`` and empty buffers for the rest of the pass."""
        cfg = self.cfg
        N = B * T
        H, Hkv, D, Dv = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
        return _PassState(
            B=B, T=T, pos=np.tile(np.arange(T), B), x=x,
            h=np.empty((N, cfg.n_embd), dtype=np.float32),
            q=np.empty((N, H, D), dtype=np.float32),
            k=np.empty((N, Hkv, D), dtype=np.float32),
            v=np.empty((N, Hkv, Dv), dtype=np.float32),
            o=np.empty((B, T, Hkv, H // Hkv, Dv), dtype=np.float32),
            m=np.empty((0 if cfg.n_expert else N, cfg.n_ff), dtype=np.float32))

    @property
    def _prunes_last_layer(self) -> bool:
        """Whether the last layer can finish for some positions only (run_layers' ``keep``): not written for the
        MLA and gpt-oss layers."""
        return self.cfg.mla is None and self.cfg.arch != gptoss.ARCH

    def _layer(self, st: _PassState, il: int, ranges: list[tuple[int, int]], hook: Hook | None,
               keep: tuple[int, int] | None = None) -> _PassState:
        """Layer il: attention block, then the FFN (dense or MoE), each added to the residual stream st.x. Row-wise
        stages run on the workers by rows, the products by blocks of output columns (see _products). Returns the
        pass's state: ``st``, or with ``keep=(lo, hi)`` a new one of positions lo:hi only (see run_layers)."""
        cfg = self.cfg
        if cfg.mla is not None:
            mla.layer(self, st, il, ranges, hook)
            return st
        if cfg.arch == gptoss.ARCH:
            gptoss.layer(self, st, il, ranges, hook)
            return st
        p = f"blk.{il}."
        fused = cfg.arch == "phi3"     # attn_qkv = Q|K|V, ffn_up = gate|up
        B, T, N = st.B, st.T, st.B * st.T
        H, Hkv, D, Dv = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
        self.workers.map(partial(self._norm_rows, st.x, st.h, self.w[p + "attn_norm.weight"]), ranges)
        if fused:
            names: tuple[str, ...] = (p + "attn_qkv.weight",)
        else:
            names = (p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight")
        if hook is not None:
            hook(names, st.h)
        if fused:
            (qkv,) = self._linears(st.h, names, role="qkv")
            qkv_parts = (qkv[:, :H * D], qkv[:, H * D:(H + Hkv) * D], qkv[:, (H + Hkv) * D:])
        else:
            q, k, v = self._linears(st.h, names, role="qkv")
            qkv_parts = (q, k, v)
        cos, sin = self._rope_tables(T, il)
        self.workers.map(partial(self._rope_rows, st, qkv_parts, cos, sin, self.w.get(p + "attn_q_norm.weight"),
                                 self.w.get(p + "attn_k_norm.weight")), ranges)
        self._attention(st.q.reshape(B, T, H, D), st.k.reshape(B, T, Hkv, D), st.v.reshape(B, T, Hkv, Dv), il,
                        st.o)
        if keep is not None:
            st = self._positions(st, *keep)
            N = st.B * st.T
            ranges = self.workers.row_ranges(N)
        a_in = st.o.reshape(N, H * Dv)
        if hook is not None:
            hook((p + "attn_output.weight",), a_in)
        (aa,) = self._linears(a_in, (p + "attn_output.weight",), role="attn_output")
        self.workers.map(partial(self._attn_residual_rows, st, p, aa), ranges)
        if cfg.n_expert:
            if hook is not None:
                hook((p + "ffn_gate_inp.weight",), st.h)
            st.x += self._moe_ffn(st.h, p, hook)
            return st
        names = (p + "ffn_up.weight",) if fused else (p + "ffn_gate.weight", p + "ffn_up.weight")
        if hook is not None:
            hook(names, st.h)
        gu = self._linears(st.h, names, role="ffn_gate_up")
        g, u = (gu[0][:, :cfg.n_ff], gu[0][:, cfg.n_ff:]) if fused else gu
        self.workers.map(partial(self._ffn_act_rows, st, g, u), ranges)
        if hook is not None:
            hook((p + "ffn_down.weight",), st.m)
        (f,) = self._linears(st.m, (p + "ffn_down.weight",), role="ffn_down")
        self.workers.map(partial(self._ffn_residual_rows, st, p, f), ranges)
        return st

    def _positions(self, st: _PassState, lo: int, hi: int) -> _PassState:
        """The state of positions lo:hi of each sequence after attention: their residual stream and attention
        output, new buffers for the rest of the layer."""
        E, T = self.cfg.n_embd, hi - lo
        N = st.B * T
        return _PassState(
            B=st.B, T=T, pos=st.pos.reshape(st.B, st.T)[:, lo:hi].reshape(-1), q=st.q, k=st.k, v=st.v,
            x=st.x.reshape(st.B, st.T, E)[:, lo:hi].reshape(N, E),
            h=np.empty((N, E), dtype=np.float32),
            o=np.ascontiguousarray(st.o[:, lo:hi]),
            m=np.empty((0 if self.cfg.n_expert else N, self.cfg.n_ff), dtype=np.float32))

    def _norm_rows(self, x: np.ndarray, out: np.ndarray, w: np.ndarray, rows: tuple[int, int]) -> None:
        r0, r1 = rows
        out[r0:r1] = rms_norm(x[r0:r1], w, self.cfg.rms_eps)

    def _rope_rows(self, st: _PassState, qkv: tuple[np.ndarray, np.ndarray, np.ndarray], cos: np.ndarray,
                   sin: np.ndarray, q_norm: np.ndarray | None, k_norm: np.ndarray | None,
                   rows: tuple[int, int]) -> None:
        """Rows r0:r1 of the Q/K/V products: Q/K norms, RoPE (-> st.q, st.k), V (-> st.v); K and V float16."""
        cfg = self.cfg
        r0, r1 = rows
        H, Hkv, D, Dv = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
        qq = qkv[0][r0:r1].reshape(-1, H, D)
        kk = qkv[1][r0:r1].reshape(-1, Hkv, D)
        vv = qkv[2][r0:r1].reshape(-1, Hkv, Dv)
        if q_norm is not None:
            qq = rms_norm(qq, q_norm, cfg.rms_eps)
            kk = rms_norm(kk, k_norm, cfg.rms_eps)
        pos = st.pos[r0:r1]
        rope_into(qq, pos, cos, sin, cfg.rope_dims, cfg.rope_neox, st.q[r0:r1])
        # llama.cpp's KV cache is float16
        rope_into(kk, pos, cos, sin, cfg.rope_dims, cfg.rope_neox, st.k[r0:r1], f16=self.kv_f16)
        if self.kv_f16:
            round_f16(vv.reshape(r1 - r0, -1), out=st.v[r0:r1].reshape(r1 - r0, -1))
        else:
            st.v[r0:r1] = vv

    def _attn_residual_rows(self, st: _PassState, p: str, aa: np.ndarray, rows: tuple[int, int]) -> None:
        """Rows r0:r1: the attention output (gemma: post-normed) added to st.x, then the FFN norm (-> st.h)."""
        cfg = self.cfg
        r0, r1 = rows
        a = aa[r0:r1]
        if cfg.arch in GEMMA_ARCHS:
            a = rms_norm(a, self.w[p + "post_attention_norm.weight"], cfg.rms_eps)
        xx = st.x[r0:r1]
        xx += a
        st.h[r0:r1] = rms_norm(xx, self.w[p + "ffn_norm.weight"], cfg.rms_eps)

    def _ffn_act_rows(self, st: _PassState, g: np.ndarray, u: np.ndarray, rows: tuple[int, int]) -> None:
        """Rows r0:r1 of the FFN activation (SiLU, gemma: GELU) of the gate times up (-> st.m)."""
        r0, r1 = rows
        gg = g[r0:r1]
        if self.cfg.arch in GEMMA_ARCHS:
            st.m[r0:r1] = gelu_f16_table(gg) * u[r0:r1]
        else:   # ggml's fused SwiGLU, bit for bit (its vectorized expf: see ops.swiglu_into)
            swiglu_into(gg, u[r0:r1], st.m[r0:r1])

    def _ffn_residual_rows(self, st: _PassState, p: str, f: np.ndarray, rows: tuple[int, int]) -> None:
        """Rows r0:r1: the FFN output (gemma: post-normed) added to st.x."""
        r0, r1 = rows
        ff = f[r0:r1]
        if self.cfg.arch in GEMMA_ARCHS:
            ff = rms_norm(ff, self.w[p + "post_ffw_norm.weight"], self.cfg.rms_eps)
        st.x[r0:r1] += ff

    def _final_norm_rows(self, x: np.ndarray, rows: tuple[int, int]) -> None:
        r0, r1 = rows
        x[r0:r1] = rms_norm(x[r0:r1], self.w["output_norm.weight"], self.cfg.rms_eps)

    def _softcap_rows(self, logits: np.ndarray, c: np.float32, rows: tuple[int, int]) -> None:
        r0, r1 = rows
        logits[r0:r1] = np.tanh(logits[r0:r1] / c) * c

    # --- attention
    def _attention(self, q, k, v, il: int, out: np.ndarray, sinks: np.ndarray | None = None) -> None:
        """q: (B,T,H,D) k: (B,T,Hkv,D) v: (B,T,Hkv,Dv) -> out (B,T,Hkv,G,Dv), causal (and sliding-window) softmax.
        ``sinks`` (H,): one more logit per query head in the softmax's denominator (gpt-oss), with no value."""
        cfg = self.cfg
        B, T, H, D = q.shape
        Hkv = cfg.n_head_kv
        G = H // Hkv
        scale = np.float32(cfg.attn_scale) if cfg.attn_scale else np.float32(1.0) / np.sqrt(np.float32(D))
        if cfg.arch in GEMMA_ARCHS:
            q = q * scale      # gemma scales Q before attention, then attends with scale 1
            scale = np.float32(1.0)
        # heads h = kv*G + g share kv head kv (ggml broadcasts K/V over the query heads the same way);
        # per (sequence, kv head) the G query heads of a position are adjacent rows of one 2-D product
        qh = q.reshape(B, T, Hkv, G, D).transpose(0, 2, 1, 3, 4)    # (B, Hkv, T, G, D)
        kh = k.transpose(0, 2, 1, 3)                                 # (B, Hkv, T, D)
        vh = v.transpose(0, 2, 1, 3)                                 # (B, Hkv, T, Dv)
        if not self.flash_attn:   # flash_attention copies its job's rows itself (in the worker, not here)
            qh, kh, vh = np.ascontiguousarray(qh), np.ascontiguousarray(kh), np.ascontiguousarray(vh)
        mask = self._mask(T, il)
        qb = min(T, self.query_block)
        # keys after a block's last query are masked anyway, so they are never computed
        jobs = [(b, kv, q0, min(T, q0 + qb)) for b in range(B) for kv in range(Hkv) for q0 in range(0, T, qb)]
        sk = None if sinks is None else np.asarray(sinks, dtype=np.float32).reshape(Hkv, G)
        self.workers.map(partial(self._attention_block, qh, kh, vh, mask, scale, out, sk), jobs)

    def _attention_block(self, qh: np.ndarray, kh: np.ndarray, vh: np.ndarray, mask: np.ndarray,
                         scale: np.float32, out: np.ndarray, sinks: np.ndarray | None,
                         job: tuple[int, int, int, int]) -> None:
        """Attention of queries q0:q1 of sequence b's KV head kv (its G query heads) over keys 0:q1: ggml's
        tiled flash-attention kernel (model.attention.flash_attention), or with ``flash_attn`` False one
        float32 softmax over all keys. ``sinks`` (Hkv, G): gpt-oss's per-head sink logits, or None."""
        b, kv, q0, q1 = job
        if self.flash_attn:
            out[b, q0:q1, kv] = flash_attention(qh[b, kv, q0:q1], kh[b, kv, :q1], vh[b, kv, :q1],
                                                mask[q0:q1, :q1], scale, self.cfg.attn_softcap,
                                                None if sinks is None else sinks[kv])
            return
        D = qh.shape[-1]
        G = qh.shape[3]
        Dv = vh.shape[-1]
        cap = np.float32(self.cfg.attn_softcap)
        s = qh[b, kv, q0:q1].reshape(-1, D) @ kh[b, kv, :q1].T     # ((q1-q0)*G, q1)
        if scale != 1.0:
            s *= scale
        if cap:                                     # gemma2: scores soft-capped before the mask
            s = np.tanh(s / cap) * cap
        s = s.reshape(q1 - q0, G, q1)
        s += mask[q0:q1, None, :q1]
        top = s.max(axis=-1, keepdims=True)
        if sinks is not None:    # the sink joins the max and the denominator (ggml's flash attention)
            sink = sinks[kv][None, :, None]
            top = np.maximum(top, sink)
        s -= top
        np.exp(s, out=s)
        total = s.sum(axis=-1, keepdims=True, dtype=np.float32)
        if sinks is not None:
            total += np.exp(sink - top)
        s /= total
        out[b, q0:q1, kv] = (s.reshape(-1, q1) @ vh[b, kv, :q1]).reshape(q1 - q0, G, Dv)

    # --- mixture of experts
    def _moe_ffn(self, h: np.ndarray, p: str, hook) -> np.ndarray:
        """llm_graph_context::build_moe_ffn with softmax gating, normalized weights, SiLU experts: the router picks
        n_expert_used experts per token (top probabilities), each runs its gate/up/down FFN, and the outputs are
        summed with the renormalized router probabilities. ``hook.experts(names, e, x, n_expert)`` (an ExpertHook)
        receives each expert's matmul inputs, as llama-imatrix collects MUL_MAT_ID inputs."""
        cfg = self.cfg
        logits = self._matmul(h, p + "ffn_gate_inp.weight")
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True, dtype=np.float32)
        k = cfg.n_expert_used
        sel = np.argsort(-probs, axis=1, kind="stable")[:, :k]                  # ggml_argsort_top_k
        weights = np.take_along_axis(probs, sel, axis=1)
        weights /= np.maximum(weights.sum(axis=1, keepdims=True), np.float32(6.103515625e-5))
        if cfg.expert_weights_scale not in (0.0, 1.0):
            weights *= np.float32(cfg.expert_weights_scale)
        collect = hook.experts if isinstance(hook, ExpertHook) else None
        out = np.zeros_like(h)
        for res in self.workers.map(partial(self._expert_ffn, h, p, sel, weights), range(cfg.n_expert)):
            if res is None:
                continue
            e, rows, xe, a, y = res
            out[rows] += y       # a token picks an expert at most once: no repeated rows
            if collect is not None:
                collect((p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight"), e, xe, cfg.n_expert)
                collect((p + "ffn_down_exps.weight",), e, a, cfg.n_expert)
        return out

    def _expert_ffn(self, h: np.ndarray, p: str, sel: np.ndarray, weights: np.ndarray, e: int):
        """Expert e over the tokens routed to it: (e, their rows, its input, its down input, weighted output),
        or None when no token picked it."""
        rows, slots = np.nonzero(sel == e)
        if rows.size == 0:
            return None
        xe = h[rows]
        g, u = self._products(xe, (p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight"), e, parallel=False)
        a = np.empty_like(g)
        swiglu_into(g, u, a)
        (y,) = self._products(a, (p + "ffn_down_exps.weight",), e, parallel=False)
        y *= weights[rows, slots][:, None]
        return e, rows, xe, a, y

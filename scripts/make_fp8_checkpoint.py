#!/usr/bin/env python
"""Write a small random pre-quantized (FP8 / int8 + scales) checkpoint, in one of the conventions llama.cpp reads.

    python scripts/make_fp8_checkpoint.py VARIANT OUT_DIR [--layers N --hidden H --ffn F ...]

VARIANT (the converter's name for the convention, see gguftool/hf/prequant.py):
  llama-block    LlamaForCausalLM, quant_method fp8, weight_block_size [128, 128], F8_E4M3 weights, F32
                 ``weight_scale_inv`` (DeepSeek-V3's layout), sizes not multiples of 128 (partial edge blocks),
                 two shards with an index and some scales in the other shard than their weight
  qwen3-block    Qwen3ForCausalLM, the same with BF16 ``weight_scale_inv`` (Qwen3-FP8's layout)
  llama-e5m2     LlamaForCausalLM, quant_method fp8, 128x128 blocks, F8_E5M2 weights
  llama-channel  LlamaForCausalLM, compressed-tensors float-quantized, strategy channel (BF16 ``weight_scale``
                 [rows, 1], as the FP8-dynamic releases)
  qwen3-ctblock  Qwen3ForCausalLM, compressed-tensors float-quantized, strategy block, block_structure [128, 128]
  llama-tensor   LlamaForCausalLM, quant_method modelopt: one F32 ``weight_scale`` per tensor (shape []), plus
                 unused ``input_scale`` / ``k_scale`` / ``v_scale``
  llama-cttensor the same tensors under compressed-tensors strategy tensor (llama.cpp's converter refuses this
                 strategy; gguftool dequantizes it as the modelopt checkpoint, which is the test's reference)
  llama-mistral  LlamaForCausalLM, quant_method fp8 without a block size, Mistral's ``qscale_weight`` (F32
                 scalar) and unused ``qscale_act``
  llama-int8     LlamaForCausalLM, compressed-tensors int-quantized, I8 weights with F32 per-channel scales
  mixtral-block  MixtralForCausalLM (4 experts), quant_method fp8, 128x128 blocks on every expert

The projections (q/k/v/o, gate/up/down, experts) are quantized; embeddings, lm_head, norms and routers stay BF16,
as in the released FP8 checkpoints. Everything is seeded: running it again writes the same bytes. Tensors are
generated and written one at a time, so ``--layers 12 --hidden 4096 --ffn 14336`` makes a multi-GB checkpoint in
little memory (the memory figures in fixtures/convert_reference/README.md were measured on one).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def _fp8_encoder(kind: str):
    """float32 -> nearest FP8 code (ties to the lower code; any code is fine: the checkpoint is just data)."""
    import sys
    sys.path.insert(0, str(ROOT))
    from gguftool.hf.checkpoint import FP8_TABLES

    table = FP8_TABLES[kind].astype(np.float64)
    codes = np.array([c for c in range(256) if np.isfinite(table[c])], np.int64)
    order = np.argsort(table[codes], kind="stable")
    values, codes = table[codes][order], codes[order]

    def encode(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        i = np.clip(np.searchsorted(values, x), 1, len(values) - 1)
        lo, hi = values[i - 1], values[i]
        pick = np.where(np.abs(x - lo) <= np.abs(hi - x), i - 1, i)
        return codes[pick].astype(np.uint8)
    return encode


def bf16_words(a: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


# --- variants: (architecture config, quantization_config, weight dtype, scale dtype, scale kind)
SPM = {"vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2}
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 320, "intermediate_size": 448,
         "num_hidden_layers": 2, "num_attention_heads": 5, "num_key_value_heads": 1, "head_dim": 64,
         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
         "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
         "torch_dtype": "bfloat16", **SPM}
QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 192, "intermediate_size": 320,
         "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 64,
         "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
         "tie_word_embeddings": True, "torch_dtype": "bfloat16", **SPM}
MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 256,
           "intermediate_size": 320, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None,
           "num_local_experts": 4, "num_experts_per_tok": 2, "torch_dtype": "bfloat16", **SPM}


def _ct(strategy: str, block=None, kind="float") -> dict:
    return {"quant_method": "compressed-tensors", "format": f"{kind}-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": {"dynamic": True, "num_bits": 8, "type": kind,
                                                              "strategy": "token", "symmetric": True},
                "weights": {"num_bits": 8, "type": kind, "strategy": strategy, "block_structure": block,
                            "group_size": None, "symmetric": True, "dynamic": False}}}}


FP8_BLOCK = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
VARIANTS = {
    "llama-block": (LLAMA, FP8_BLOCK, "F8_E4M3", "F32", "block"),
    "qwen3-block": (QWEN3, FP8_BLOCK, "F8_E4M3", "BF16", "block"),
    "llama-e5m2": (LLAMA, {**FP8_BLOCK, "fmt": "e5m2"}, "F8_E5M2", "F32", "block"),
    "llama-channel": (LLAMA, _ct("channel"), "F8_E4M3", "BF16", "channel"),
    "qwen3-ctblock": (QWEN3, _ct("block", [128, 128]), "F8_E4M3", "F32", "block"),
    "llama-tensor": (LLAMA, {"quant_method": "modelopt", "quant_algo": "FP8"}, "F8_E4M3", "F32", "tensor"),
    "llama-cttensor": (LLAMA, _ct("tensor"), "F8_E4M3", "F32", "tensor"),
    "llama-mistral": (LLAMA, {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None},
                      "F8_E4M3", "F32", "mistral"),
    "llama-int8": (LLAMA, _ct("channel", kind="int"), "I8", "F32", "channel"),
    "mixtral-block": (MIXTRAL, FP8_BLOCK, "F8_E4M3", "F32", "block"),
}


def _plan(cfg: dict) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, quantized?) of every tensor."""
    h, ff, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    out = [("model.embed_tokens.weight", (v, h), False), ("model.norm.weight", (h,), False)]
    if not cfg.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (v, h), False))
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}."
        out += [(p + "input_layernorm.weight", (h,), False), (p + "post_attention_layernorm.weight", (h,), False),
                (p + "self_attn.q_proj.weight", (nh * hd, h), True), (p + "self_attn.k_proj.weight", (nkv * hd, h), True),
                (p + "self_attn.v_proj.weight", (nkv * hd, h), True), (p + "self_attn.o_proj.weight", (h, nh * hd), True)]
        if cfg["model_type"] == "qwen3":
            out += [(p + "self_attn.q_norm.weight", (hd,), False), (p + "self_attn.k_norm.weight", (hd,), False)]
        if "num_local_experts" in cfg:
            out.append((p + "block_sparse_moe.gate.weight", (cfg["num_local_experts"], h), False))
            for x in range(cfg["num_local_experts"]):
                q = p + f"block_sparse_moe.experts.{x}."
                out += [(q + "w1.weight", (ff, h), True), (q + "w2.weight", (h, ff), True), (q + "w3.weight", (ff, h), True)]
        else:
            out += [(p + "mlp.gate_proj.weight", (ff, h), True), (p + "mlp.up_proj.weight", (ff, h), True),
                    (p + "mlp.down_proj.weight", (h, ff), True)]
    return out


Entry = tuple[str, tuple[int, ...], Callable[[], bytes]]


def _tensors(cfg: dict, wdtype: str, sdtype: str, kind: str, seed: int, random_codes: bool = False) -> list[Entry]:
    """Every tensor as (name, (dtype, shape), make bytes). A weight and its scale come from one quantization of the
    same seeded values (cached between the two calls), so they agree whatever order they are written in."""
    entries: list[tuple[str, str, tuple[int, ...], Callable[[], bytes]]] = []
    enc = _fp8_encoder(wdtype) if wdtype.startswith("F8") else None
    qmax = E4M3_MAX if wdtype == "F8_E4M3" else E5M2_MAX if wdtype == "F8_E5M2" else 127.0
    for i, (name, shape, quantized) in enumerate(_plan(cfg)):
        def values(i=i, shape=shape, name=name) -> np.ndarray:
            rng = np.random.default_rng([seed, i])
            if len(shape) == 1:
                return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            std = 1.0 if "embed" in name else 0.05
            # heavy-tailed rows, so that block and row scales differ and small values fall on FP8 subnormals
            return (rng.standard_normal(shape) * std * np.exp(rng.standard_normal((shape[0], 1)))).astype(np.float32)

        if not quantized:
            entries.append((name, "BF16", shape, lambda values=values: bf16_words(values()).tobytes()))
            continue
        cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def quantize(values=values, shape=shape, cache=cache, i=i):
            if "q" not in cache and random_codes:   # big checkpoints for memory figures: any codes and scales
                rng = np.random.default_rng([seed, i, 1])
                q = rng.integers(0, 256, shape, dtype=np.uint8)
                q[(q & 0x7F) >= 0x7C] &= 0xBB        # no NaN / infinity codes
                sshape = {"block": (-(-shape[0] // 128), -(-shape[1] // 128)), "channel": (shape[0], 1)}.get(kind, ())
                cache["q"], cache["s"] = q, (rng.random(sshape) * 1e-3 + 1e-4).astype(np.float32)
            if "q" not in cache:
                w = values().astype(np.float64)
                if kind == "block":
                    r, c = -(-shape[0] // 128), -(-shape[1] // 128)
                    pad = np.zeros((r * 128, c * 128))
                    pad[: shape[0], : shape[1]] = np.abs(w)
                    amax = pad.reshape(r, 128, c, 128).max(axis=(1, 3))
                    full = np.repeat(np.repeat(amax, 128, 0), 128, 1)[: shape[0], : shape[1]]
                elif kind == "channel":
                    amax = np.abs(w).max(axis=1, keepdims=True)
                    full = amax
                else:
                    amax = np.array(np.abs(w).max())
                    full = amax
                scale = (np.maximum(amax, 1e-12) / qmax).astype(np.float32)
                sfull = (np.maximum(full, 1e-12) / qmax)
                q = enc(w / sfull) if enc is not None else np.clip(np.rint(w / sfull), -127, 127).astype(np.int8)
                cache["q"], cache["s"] = q, scale
            return cache["q"], cache["s"]

        entries.append((name, wdtype, shape, lambda quantize=quantize: quantize()[0].tobytes()))
        sshape = {"block": (-(-shape[0] // 128), -(-shape[1] // 128)), "channel": (shape[0], 1)}.get(kind, ())
        method = cfg["quantization_config"]["quant_method"]
        sname = (name.removesuffix("weight") + "qscale_weight" if kind == "mistral"
                 else name + "_scale_inv" if method == "fp8" else name + "_scale")

        def scale_bytes(quantize=quantize, sdtype=sdtype, cache=cache):
            s = quantize()[1]
            cache.clear()
            return (bf16_words(s) if sdtype == "BF16" else s.astype("<f4")).tobytes()
        entries.append((sname, sdtype, sshape, scale_bytes))
        if kind == "tensor":   # unused activation / kv-cache scales (dropped by the converter)
            extra = [name.removesuffix("weight") + "input_scale"]
            if cfg.get("quantization_config", {}).get("quant_method") == "modelopt" and "k_proj" in name:
                extra.append(name.removesuffix("k_proj.weight") + "k_scale")
            for n in extra:
                entries.append((n, "F32", (), lambda: np.array(0.02, "<f4").tobytes()))
        if kind == "mistral":
            entries.append((name.removesuffix("weight") + "qscale_act", "F32", (),
                            lambda: np.array(0.03, "<f4").tobytes()))
    return [(n, (d, s), f) for n, d, s, f in entries]  # type: ignore[misc]


def write_safetensors(path: Path, entries: list) -> None:
    """Header first (offsets from the shapes), then each tensor generated and written in turn."""
    size = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1}
    header, offset = {}, 0
    for name, (dtype, shape), _ in sorted(entries, key=lambda e: e[0]):
        n = size[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    by_name = {e[0]: e for e in entries}
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for name in sorted(by_name):
            data = by_name[name][2]()
            assert len(data) == header[name]["data_offsets"][1] - header[name]["data_offsets"][0], name
            f.write(data)


def make(variant: str, out: Path, overrides: dict | None = None, random_codes: bool = False) -> Path:
    arch, qc, wdtype, sdtype, kind = VARIANTS[variant]
    cfg = {**arch, **(overrides or {}), "quantization_config": qc}
    if "head_dim" in arch and overrides and "hidden_size" in overrides:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    out.mkdir(parents=True, exist_ok=True)
    entries = _tensors(cfg, wdtype, sdtype, kind, seed=sum(map(ord, variant.split("-")[0])),
                       random_codes=random_codes)
    if variant == "llama-block":   # two shards; every second layer's scales in the other shard than their weight
        second = [e for e in entries if ".layers.1." in e[0] and not e[0].endswith("_scale_inv")]
        shards = {"model-00001-of-00002.safetensors": [e for e in entries if e not in second],
                  "model-00002-of-00002.safetensors": second}
        for fname, es in shards.items():
            write_safetensors(out / fname, es)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {e[0]: f for f, es in shards.items() for e in es}}, indent=1) + "\n")
    else:
        write_safetensors(out / "model.safetensors", entries)
    if kind == "tensor" and qc["quant_method"] == "modelopt":
        cfg.pop("quantization_config")   # ModelOpt puts it in hf_quant_config.json
        (out / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt", "version": "0.29.0"},
             "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}},
            indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    src = ROOT / "fixtures" / "tiny-llama"
    (out / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    (out / "tokenizer_config.json").write_text((src / "tokenizer_config.json").read_text())
    return out


def _read_safetensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {name: (h["dtype"], tuple(h["shape"]), raw[8 + n + h["data_offsets"][0]: 8 + n + h["data_offsets"][1]])
            for name, h in header.items()}


def _widen(dtype: str, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    if dtype == "BF16":
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(data, {"F16": "<f2", "F32": "<f4"}[dtype]).astype(np.float32).reshape(shape)


def fp8_copy(src: Path, out: Path) -> Path:
    """An existing BF16/F16/F32 checkpoint (one model.safetensors) as DeepSeek-V3 ships it: every 2-D ``*_proj``
    weight (attention, MLA, dense, shared and routed experts) F8_E4M3 with F32 128x128 ``weight_scale_inv`` blocks;
    embeddings, lm_head, norms and the router unchanged. Used for DeepSeek-V3-style tiny models."""
    enc = _fp8_encoder("F8_E4M3")
    entries: list = []
    for name, (dtype, shape, data) in _read_safetensors(src / "model.safetensors").items():
        if not (len(shape) == 2 and name.endswith("_proj.weight") and "embed" not in name):
            entries.append((name, (dtype, shape), lambda data=data: data))
            continue
        w = _widen(dtype, shape, data).astype(np.float64)
        r, c = -(-shape[0] // 128), -(-shape[1] // 128)
        pad = np.zeros((r * 128, c * 128))
        pad[: shape[0], : shape[1]] = np.abs(w)
        amax = np.maximum(pad.reshape(r, 128, c, 128).max(axis=(1, 3)), 1e-12)
        full = np.repeat(np.repeat(amax, 128, 0), 128, 1)[: shape[0], : shape[1]] / E4M3_MAX
        q, scale = enc(w / full), (amax / E4M3_MAX).astype("<f4")
        entries.append((name, ("F8_E4M3", shape), lambda q=q: q.tobytes()))
        entries.append((name + "_scale_inv", ("F32", (r, c)), lambda scale=scale: scale.tobytes()))
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", entries)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = FP8_BLOCK
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", help=f"one of {', '.join(sorted(VARIANTS))}, or with --from-checkpoint the source "
                                    "checkpoint folder")
    ap.add_argument("out", type=Path)
    ap.add_argument("--from-checkpoint", action="store_true", help="VARIANT is a BF16/F16/F32 checkpoint folder: "
                    "write it with FP8 128x128-block projections, as DeepSeek-V3 ships (fp8_copy)")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--ffn", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--random-codes", action="store_true", help="random FP8 codes and scales instead of quantized "
                                                                "values (fast: for multi-GB memory benchmarks)")
    a = ap.parse_args()
    if a.from_checkpoint:
        print(f"wrote {fp8_copy(Path(a.variant), a.out)}")
        return
    if a.variant not in VARIANTS:
        ap.error(f"unknown variant {a.variant!r}")
    over = {k: v for k, v in (("num_hidden_layers", a.layers), ("hidden_size", a.hidden), ("intermediate_size", a.ffn),
                              ("num_attention_heads", a.heads), ("num_key_value_heads", a.kv_heads),
                              ("vocab_size", a.vocab)) if v is not None}
    print(f"wrote {make(a.variant, a.out, over, a.random_codes)}")


if __name__ == "__main__":
    main()

"""--target-size / --target-bpw: the per-tensor allocation (gguftool.allocation) on the tiny Llama checkpoint.

What is asserted: the written file is no larger than the target (bpw no higher); the stock mix of the nearest size
is never better by the method's own measure (predicted sum, and the whole-model KLD on the calibration chunks);
the solver is optimal on small cases (brute force) and never loses to an alternative it is given; candidates obey
llama.cpp's row-size and imatrix rules; the sensitivities file is reused; the written file records the target and
loads in llama.cpp.
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

import gguftool
from gguftool.allocation.candidates import TensorSlot, candidate_types, writable_types
from gguftool.allocation.measure import Sensitivities
from gguftool.allocation.search import KEY_TARGET_METHOD, KEY_TARGET_REFERENCE, KEY_TARGET_SIZE, parse_size
from gguftool.allocation.solve import padded, solve
from gguftool.errors import GGUFError
from gguftool.gguf.constants import GGMLType
from gguftool.gguf.reader import GGUFReader
from gguftool.pipeline import policy as P

from conftest import FIXTURES, TINY_LLAMA, run_cli

T = GGMLType
TEXT = FIXTURES / "tiny-llama-text.txt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Llama as an F32 GGUF, its imatrix, and the stock Q4_K_M file's size."""
    d = tmp_path_factory.mktemp("alloc")
    f32 = d / "tiny-f32.gguf"
    gguftool.convert(TINY_LLAMA, f32, type="F32", threads=2)
    im = d / "tiny.imatrix"
    gguftool.imatrix(f32, TEXT, im, n_ctx=64, n_chunks=4, threads=2)
    stock = d / "stock-Q4_K_M.gguf"
    gguftool.quantize_file(f32, stock, type="Q4_K_M", options=gguftool.QuantizeOptions(imatrix=str(im)), threads=2)
    return {"dir": d, "f32": f32, "imatrix": im, "stock": stock}


def _opts(tiny, **kw):
    base = dict(imatrix=str(tiny["imatrix"]), calib=str(TEXT), calib_ctx=32, calib_chunks=2)
    base.update(kw)
    return gguftool.QuantizeOptions(**base)


# --- the whole job


def test_target_size_fits_and_never_loses_to_the_stock_mix(tiny, tmp_path):
    size = tiny["stock"].stat().st_size
    out = tmp_path / "alloc.gguf"
    phases = []
    with gguftool.plan_quantize(tiny["f32"], out, options=_opts(tiny, target_size=size, sensitivities=str(
            tmp_path / "sens.json")), threads=2, search_progress=lambda p, d, n: phases.append(p)) as job:
        a = job.allocation
        assert a is not None and a.ftype.name == "Q4_K_M"          # the stock mix of that size
        assert a.file_bytes <= size and a.stock_file_bytes == size
        # never worse by the method's own measures
        assert a.predicted <= a.stock_predicted
        assert a.measured is not None and a.stock_measured is not None
        assert a.measured <= a.stock_measured or a.chose_stock
        assert {"weight error", "sensitivity"} <= set(phases)
        job.run(threads=2)
    assert out.stat().st_size == a.file_bytes <= size
    with GGUFReader(out) as r:
        assert r.get(KEY_TARGET_SIZE) == str(size)
        assert r.get(KEY_TARGET_REFERENCE) == "Q4_K_M"
        assert "KLD" in r.get(KEY_TARGET_METHOD)
        written = {t.name: t.type for t in r.tensors}
    assert all(written[n] == t for n, t in a.types.items())
    assert a.chose_stock or any(written[n] != row.stock_type for n, row in zip(a.types, a.rows))


@pytest.mark.slow
def test_target_bpw_and_the_sensitivities_file_is_reused(tiny, tmp_path):
    cache = tmp_path / "sens.json"
    with gguftool.plan_quantize(tiny["f32"], None, dry_run=True,
                                options=_opts(tiny, target_bpw=4.0, sensitivities=str(cache))) as job:
        a = job.allocation
        assert a is not None and a.bpw <= 4.0 and job.plan.out_bpw <= 4.0
    first = json.loads(cache.read_text())
    assert first["measured"] and all(v["probe_kld"] is not None for v in first["tensors"].values())
    phases = []
    with gguftool.plan_quantize(tiny["f32"], None, dry_run=True, search_progress=lambda p, d, n: phases.append(p),
                                options=_opts(tiny, target_bpw=5.0, sensitivities=str(cache))) as job:
        b = job.allocation
        assert b is not None and b.bpw <= 5.0 and b.bpw > a.bpw
        assert b.sensitivities is not None
        assert {n: s.sensitivity for n, s in b.sensitivities.tensors.items()} == \
            {n: v["sensitivity"] for n, v in first["tensors"].items()}
    # another calibration: the weight errors stand, only the probes are measured again
    with gguftool.plan_quantize(tiny["f32"], None, dry_run=True,
                                options=_opts(tiny, target_bpw=5.0, sensitivities=str(cache), calib_chunks=3)) as job:
        assert any("measured with other calibration: probing again" in w for w in job.warnings)
    again = Sensitivities.load(str(cache))
    assert again.info["calib_tokens"] == 3 * 32
    assert {n: v.errors for n, v in again.tensors.items()} == \
        {n: v["errors"] for n, v in first["tensors"].items()}


@pytest.mark.slow
def test_without_calibration_weight_error_only(tiny):
    size = tiny["stock"].stat().st_size
    with gguftool.plan_quantize(tiny["f32"], None, dry_run=True,
                                options=gguftool.QuantizeOptions(imatrix=str(tiny["imatrix"]),
                                                                 target_size=size)) as job:
        a = job.allocation
        assert a is not None and a.file_bytes <= size and a.measured is None
        assert a.predicted <= a.stock_predicted
        assert not a.sensitivities.measured
        assert all(s.sensitivity == 1.0 for s in a.sensitivities.tensors.values())


@pytest.mark.slow
def test_cli_dry_run_prints_the_plan_beside_the_stock_mix(tiny):
    size = tiny["stock"].stat().st_size
    r = run_cli("quantize", str(tiny["f32"]), "--dry-run", "--target-size", str(size), "--imatrix",
                str(tiny["imatrix"]), "--calib", str(TEXT), "--calib-ctx", "32", "--calib-chunks", "2", "-t", "2")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["tensor", "type", "bytes", "est.", "KLD"] and "Q4_K_M" in lines[0]
    assert any(line.startswith("blk.0.attn_q.weight ") for line in lines)
    assert any(line.startswith("allocation: file ") and f"target {size:,} bytes" in line for line in lines)
    assert any(line.startswith("estimated KLD") and "measured" in line for line in lines)


@pytest.mark.parametrize("args, message", [
    (["--target-size", "1K"], r"too small"),
    (["--target-size", "12x"], r"expected a size"),
    (["--target-size", "1M", "--target-bpw", "4"], r"cannot be used together"),
    (["--target-size", "1M", "--pure"], r"cannot be combined"),
    (["--target-bpw", "4", "--type", "Q8_0"], r"larger than the target"),
    (["--target-size", "1M", "--split-max-size", "500K"], r"one file \(no --split-max-size"),
])
def test_bad_requests_are_one_error_line(tiny, tmp_path, args, message):
    out = tmp_path / "o.gguf"
    r = run_cli("quantize", str(tiny["f32"]), str(out), "--imatrix", str(tiny["imatrix"]), *args)
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: ")
    import re
    assert re.search(message, r.stderr), r.stderr
    assert not out.exists()


def test_target_needs_an_imatrix(tiny, tmp_path):
    r = run_cli("quantize", str(tiny["f32"]), str(tmp_path / "o.gguf"), "--target-size", "1M")
    assert r.exit_code == 1 and "need an importance matrix" in r.stderr


@pytest.mark.slow
def test_written_file_runs_in_llama_cpp(tiny, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python loads the written file")
    out = tmp_path / "alloc.gguf"
    gguftool.quantize_file(tiny["f32"], out, options=_opts(tiny, target_bpw=3.5), threads=2)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval([1, 30, 31, 32, 33, 34])
    assert np.isfinite(np.asarray(llm.scores[:6])).all()


# --- pieces


def test_probe_passes_resume_and_make_weights_on_demand(tiny):
    """A pass resumed at layer L from the recorded residual gives the full pass's logits bit for bit, and a mix whose
    weights are made layer by layer on demand scores exactly as the same weights given at once."""
    from gguftool.allocation.measure import KLDProbe, _quantize_whole
    from gguftool.gguf.source import open_gguf_source

    src = open_gguf_source(tiny["f32"])
    try:
        tokens = np.array([[1, 5, 9, 14, 3, 7, 22, 8, 11, 2, 4, 6]], dtype=np.int64)
        probe = KLDProbe(src, tokens, 4, 1, "x")
        n_layer = probe.n_layer
        assert n_layer >= 2 and len(probe._residuals) == n_layer
        full = probe.model.forward(tokens, logits_from=4)
        for il in range(n_layer):
            resumed = probe.model.forward(tokens, logits_from=4, resume=(il, probe._residuals[il]))
            assert np.array_equal(full, resumed), il
        sources = {t.name: t for t in src.tensors}
        names = [f"blk.{n_layer - 1}.ffn_down.weight", "blk.0.attn_v.weight", f"blk.{n_layer - 1}.attn_q.weight"]
        slots = {n: TensorSlot(n, tuple(sources[n].shape), T.Q4_0, (T.Q4_0,)) for n in names}

        def weight(n):
            _, y = _quantize_whole(sources[n].read_f32().reshape(-1, sources[n].shape[0]), slots[n], T.Q4_0, None,
                                   1)
            return y.reshape(probe.weight_shape(n))

        made = []
        eager = probe.kld({n: weight(n) for n in names})
        lazy = probe.kld_lazy({n: (lambda n=n: made.append(n) or weight(n)) for n in names})
        assert eager > 0 and lazy == eager and sorted(made) == sorted(names)
        before = probe.layers_run
        late = probe.kld({names[0]: weight(names[0])})     # only the last layer changes: one layer is run
        assert probe.layers_run - before == 1 and late > 0
    finally:
        src.close()


def test_parse_size():
    assert parse_size("1.2G") == 1_200_000_000 and parse_size("500M") == 500_000_000
    assert parse_size("123456") == 123456 and parse_size("2k") == 2000
    with pytest.raises(GGUFError):
        parse_size("-1")


def test_candidates_follow_row_sizes_and_the_imatrix_rule():
    q4km = P.FTYPES["Q4_K_M"]
    c576 = candidate_types("blk.0.attn_q.weight", (576, 576), T.Q5_0, q4km, True)
    assert all(576 % t.block_size == 0 for t in c576) and T.Q4_K not in c576 and T.Q4_0 in c576
    c256 = candidate_types("blk.0.ffn_down.weight", (1536, 576), T.Q4_K, q4km, True)
    assert {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.F16} <= set(c256)
    assert [t for t in c256] == sorted(c256, key=lambda t: t.type_size / t.block_size)
    # every type with a kernel that the policy writes is a candidate somewhere (new types join by themselves)
    assert set(writable_types()) == set(candidate_types("blk.0.x.weight", (2304, 8), T.Q4_K, q4km, True))
    # a type needing an imatrix is never offered to token_embd (llama.cpp quantizes it without one)
    for t in candidate_types("token_embd.weight", (2304, 8), T.Q6_K, q4km, False):
        assert not P.requires_imatrix("blk.0.x.weight", t, q4km)


def _slots(rng, n):
    types = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q6_K, T.Q8_0)
    return [TensorSlot(f"t{i}", (256, int(rng.integers(1, 40))), T.Q4_K, types) for i in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_solver_is_optimal_on_small_cases(seed):
    rng = np.random.default_rng(seed)
    slots = _slots(rng, 4)
    sens = {s.name: float(rng.uniform(0.1, 10)) for s in slots}
    err = {T.Q2_K: 1.0, T.Q3_K: 0.45, T.Q4_K: 0.2, T.Q6_K: 0.05, T.Q8_0: 0.01}

    def cost(name, t):
        return sens[name] * err[t]

    stock = {s.name: T.Q4_K for s in slots}
    budget = sum(padded(s.nbytes(T.Q4_K)) for s in slots)
    c = solve(slots, cost, budget, [stock])
    assert c is not None and c.nbytes <= budget
    best = min(sum(cost(s.name, t) for s, t in zip(slots, combo))
               for combo in itertools.product(*(s.candidates for s in slots))
               if sum(padded(s.nbytes(t)) for s, t in zip(slots, combo)) <= budget)
    assert c.predicted <= sum(cost(s.name, T.Q4_K) for s in slots) + 1e-12     # never worse than the stock mix
    assert c.predicted <= best * 1.05 + 1e-12                                  # and close to the optimum


def test_solver_keeps_a_better_alternative_and_reports_infeasible():
    slots = [TensorSlot("a", (256, 4), T.Q4_K, (T.Q2_K, T.Q4_K)), TensorSlot("b", (256, 4), T.Q4_K, (T.Q2_K, T.Q4_K))]
    # a cost the greedy path cannot see through: only the alternative reaches zero
    table = {("a", T.Q2_K): 5.0, ("a", T.Q4_K): 0.0, ("b", T.Q2_K): 0.0, ("b", T.Q4_K): 0.0}
    budget = padded(slots[0].nbytes(T.Q4_K)) + padded(slots[1].nbytes(T.Q2_K))
    c = solve(slots, lambda n, t: table[(n, t)], budget, [{"a": T.Q4_K, "b": T.Q2_K}])
    assert c is not None and c.predicted == 0.0 and c.types == {"a": T.Q4_K, "b": T.Q2_K}
    assert solve(slots, lambda n, t: table[(n, t)], 10) is None


class _FakeProbe:
    """A model whose KL-divergence is exactly sum_t s_t * E_t over the quantized tensors (E: imatrix-free relative
    squared error): what the probes should recover."""

    def __init__(self, base, true_s):
        self.base, self.true_s, self.calls = base, true_s, 0

    def weight_shape(self, name):
        return self.base[name].shape

    def kld(self, overrides):
        self.calls += 1
        total = 0.0
        for n, y in overrides.items():
            x = self.base[n].astype(np.float64)
            total += self.true_s[n] * float(((y - x) ** 2).sum() / (x * x).sum())
        return total


@pytest.mark.parametrize("mode", ["tensor", "layer"])
def test_probes_recover_the_sensitivities(mode):
    from gguftool.allocation.measure import _probe_all, TensorSensitivity, weight_error

    rng = np.random.default_rng(0)
    n_layer, kinds = 7, ("attn_v.weight", "ffn_down.weight")
    base, true_s, slots = {}, {}, []
    for il in range(n_layer):
        for k, kind in enumerate(kinds):
            name = f"blk.{il}.{kind}"
            base[name] = rng.standard_normal((8, 256)).astype(np.float32)
            # a layer factor times a kind factor linear in the layer: what layer mode assumes
            true_s[name] = (1.0 + 0.3 * il) * (2.0 + k * (1 + 0.1 * il))
            slots.append(TensorSlot(name, (256, 8), T.Q4_K, (T.Q3_K, T.Q4_K)))
    base["token_embd.weight"] = rng.standard_normal((8, 256)).astype(np.float32)
    true_s["token_embd.weight"] = 5.0
    slots.append(TensorSlot("token_embd.weight", (256, 8), T.Q6_K, (T.Q3_K, T.Q4_K, T.Q6_K)))
    out = {s.name: TensorSensitivity({t.name: weight_error(base[s.name], t, None) for t in s.candidates})
           for s in slots}
    probe = _FakeProbe(base, true_s)
    _probe_all(slots, out, lambda n: base[n], None, probe, mode, 1, None)
    got = {n: ts.sensitivity for n, ts in out.items()}
    assert probe.calls == (len(slots) if mode == "tensor" else 3 * len(kinds) + (n_layer - 3) + 1)
    for n, s in true_s.items():
        assert got[n] == pytest.approx(s, rel=1e-6 if mode == "tensor" else 0.05), n


@pytest.mark.slow
def test_convert_takes_the_same_target(tiny, tmp_path):
    out = tmp_path / "conv.gguf"
    gguftool.convert(TINY_LLAMA, out, options=_opts(tiny, target_bpw=4.5), threads=2)
    with GGUFReader(out) as r:
        assert r.get("quantize.target.bpw") == pytest.approx(4.5)
        n = sum(t.n_elements for t in r.tensors)
        assert sum(t.nbytes for t in r.tensors) * 8 / n <= 4.5

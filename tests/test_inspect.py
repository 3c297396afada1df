"""`gguftool inspect`: human and JSON output, agreement with gguf-py on the real files, no numba, bad input."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli as invoke
from gguftool.gguf.constants import GGMLType, GGUFValueType as VT
from gguftool.gguf.values import KV, GGUFArray
from gguftool.gguf.writer import GGUFWriter


def make_model(path, *, template="{{ bos_token }}" + "x" * 100):
    tokens = ["<unk>", "<s>", "</s>", "hello", "wörld"] + [f"t{i}" for i in range(95)]
    kvs = [
        KV("general.architecture", VT.STRING, "llama"),
        KV("general.name", VT.STRING, "tiny"),
        KV("llama.context_length", VT.UINT32, 128),
        KV("llama.rope.freq_base", VT.FLOAT32, 10000.0),
        KV("llama.attention.layer_norm_rms_epsilon", VT.FLOAT32, float(np.float32(1e-5))),
        KV("weird.nan", VT.FLOAT64, float("nan")),
        KV("tokenizer.ggml.model", VT.STRING, "llama"),
        KV("tokenizer.ggml.pre", VT.STRING, "default"),
        KV("tokenizer.ggml.tokens", VT.ARRAY, GGUFArray(VT.STRING, tokens)),
        KV("tokenizer.ggml.scores", VT.ARRAY, GGUFArray(VT.FLOAT32, np.arange(100, dtype=np.float32) / 4)),
        KV("tokenizer.ggml.bos_token_id", VT.UINT32, 1),
        KV("tokenizer.ggml.eos_token_id", VT.UINT32, 2),
        KV("tokenizer.ggml.unknown_token_id", VT.UINT32, 0),
        KV("tokenizer.chat_template", VT.STRING, template),
        KV("nested", VT.ARRAY, GGUFArray(VT.ARRAY, [GGUFArray(VT.INT8, [1, -2]), GGUFArray(VT.STRING, ["z"])])),
    ]
    tensors = [("token_embd.weight", (64, 100), GGMLType.Q8_0), ("blk.0.attn_norm.weight", (64,), GGMLType.F32),
               ("blk.0.ffn_up.weight", (256, 4), GGMLType.Q4_K)]
    with GGUFWriter(path) as w:
        w.add_kvs(kvs)
        for name, shape, t in tensors:
            w.add_tensor_info(name, shape, t)
        for info in w.tensor_infos or []:
            pass
        w.write_header()
        for info in w.tensor_infos:
            w.write_tensor_data(info.name, bytes(info.nbytes))
    return path


@pytest.fixture
def model(tmp_path):
    return make_model(tmp_path / "tiny.gguf")


# --- human output
def test_human_output(model):
    r = invoke("inspect", model)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "GGUF v3, little-endian, alignment 32" in out
    assert f"{model.stat().st_size:,} bytes" in out
    assert "15 metadata keys, 3 tensors" in out
    assert '"llama"' in out and "10000" in out and "1e-05" in out
    assert '100 items: ["<unk>", "<s>", "</s>", "hello", "wörld", …]' in out
    assert '…" (115 chars)' in out                       # long string cut with its length
    assert "model llama, pre-tokenizer default, vocabulary 100 tokens" in out
    assert 'BOS 1 "<s>", EOS 2 "</s>", UNK 0 "<unk>", PAD -' in out
    assert "chat template: present (115 chars)" in out
    assert "token_embd.weight" in out and "64 x 100" in out and "Q8_0" in out and "6,800" in out
    params = 6400 + 64 + 1024
    nbytes = 6800 + 256 + 576
    assert f"3 tensors, {params:,} parameters" in out
    assert f"{nbytes:,} bytes" in out and f"{nbytes * 8 / params:.3f} bits per weight" in out
    assert "types: F32 1, Q4_K 1, Q8_0 1" in out


def test_human_no_tensors_and_filter(model):
    out = invoke("inspect", "--no-tensors", model).output
    assert "token_embd.weight" not in out and "3 tensors" in out
    out = invoke("inspect", "--filter", "blk.0.*", model).output
    assert "Tensors matching 'blk.0.*' (2):" in out and "token_embd.weight" not in out
    assert "2 tensors, 1,088 parameters" in out


def test_chat_template_absent(tmp_path):
    p = tmp_path / "m.gguf"
    with GGUFWriter(p) as w:
        w.add_kv(KV("tokenizer.ggml.model", VT.STRING, "gpt2"))
    out = invoke("inspect", p).output
    assert "vocabulary 0 tokens" in out and "chat template: absent" in out and "0 tensors" in out


# --- JSON
def test_split_file_says_which_split(model, tmp_path):
    from gguf_samples import write_splits

    parts = write_splits(model, tmp_path / "m", 2)
    r = invoke("inspect", parts[1], "--no-tensors")
    assert r.exit_code == 0, r.output
    assert "Split:      file 2 of 2 of a split model (3 tensors in all)" in r.output
    assert "Split:" not in invoke("inspect", model, "--no-tensors").output


def test_json_document(model):
    r = invoke("inspect", "--json", model)
    assert r.exit_code == 0
    doc = json.loads(r.output)
    assert set(doc) == {"version", "alignment", "file_size", "data_offset", "metadata", "metadata_types",
                        "tensors", "summary"}
    assert (doc["version"], doc["alignment"], doc["file_size"]) == (3, 32, model.stat().st_size)
    assert doc["data_offset"] % 32 == 0
    md = doc["metadata"]
    assert md["llama.context_length"] == 128 and doc["metadata_types"]["llama.context_length"] == "UINT32"
    assert md["llama.attention.layer_norm_rms_epsilon"] == float(np.float32(1e-5))
    assert md["weird.nan"] == "nan"
    assert md["tokenizer.ggml.tokens"] == {"array_of": "STRING", "length": 100,
                                           "head": ["<unk>", "<s>", "</s>", "hello", "wörld", "t0", "t1", "t2"]}
    assert doc["metadata_types"]["tokenizer.ggml.tokens"] == "ARRAY[STRING]"
    assert md["nested"] == [[1, -2], ["z"]]
    assert doc["tensors"][0] == {"name": "token_embd.weight", "type": "Q8_0", "shape": [64, 100], "offset": 0,
                                 "nbytes": 6800}
    assert doc["tensors"][1]["offset"] == 6816   # 6800 padded to 32
    assert doc["summary"] == {"n_tensors": 3, "n_params": 7488, "nbytes": 7632,
                              "bpw": round(7632 * 8 / 7488, 4), "types": {"Q8_0": 1, "F32": 1, "Q4_K": 1}}


def test_json_full_no_tensors_filter(model):
    doc = json.loads(invoke("inspect", "--json", "--full", "--no-tensors", model).output)
    assert "tensors" not in doc and doc["summary"]["n_tensors"] == 3
    assert len(doc["metadata"]["tokenizer.ggml.tokens"]) == 100
    assert doc["metadata"]["tokenizer.ggml.scores"][99] == 24.75
    doc = json.loads(invoke("inspect", "--json", "--filter", "*norm*", model).output)
    assert [t["name"] for t in doc["tensors"]] == ["blk.0.attn_norm.weight"]
    assert doc["summary"]["types"] == {"F32": 1}


# --- agreement with gguf-py on the real files
def _ref_value(field):
    types = [VT(int(t)) for t in field.types]
    if types[0] == VT.ARRAY and len(types) > 2:
        pytest.skip("gguf-py cannot read nested arrays")
    v = field.contents()
    return v


def _eq(mine, theirs):
    if isinstance(theirs, list):
        assert isinstance(mine, list) and len(mine) == len(theirs)
        if theirs and isinstance(theirs[0], float):
            a = np.array([float("nan") if x == "nan" else x for x in mine], dtype=np.float64)
            assert np.array_equal(a, np.array(theirs, dtype=np.float64), equal_nan=True)
        else:
            assert mine == theirs
    elif isinstance(theirs, float) and math.isnan(theirs):
        assert mine == "nan"
    else:
        assert mine == theirs


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2_gguf", "gemma3_gguf"])
def test_json_agrees_with_gguf_py(fixture, request):
    gguf = pytest.importorskip("gguf", reason="gguf-py (pip install gguf) is the independent reference reader")
    path = request.getfixturevalue(fixture)
    out = subprocess.run([sys.executable, "-c", "from gguftool.cli import main; main()", "inspect", "--json",
                          "--full", str(path)], capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    ref = gguf.GGUFReader(path)
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(doc["metadata"]) == list(fields)
    for key, field in fields.items():
        _eq(doc["metadata"][key], _ref_value(field))
        t = VT(int(field.types[0]))
        expect = f"ARRAY[{VT(int(field.types[-1])).name}]" if t == VT.ARRAY else t.name
        assert doc["metadata_types"][key] == expect, key
    assert doc["version"] == int(ref.fields["GGUF.version"].parts[-1][0])
    assert doc["data_offset"] == ref.data_offset
    assert doc["alignment"] == ref.alignment
    assert [t["name"] for t in doc["tensors"]] == [t.name for t in ref.tensors]
    for mine, theirs in zip(doc["tensors"], ref.tensors):
        assert mine["type"] == GGMLType(int(theirs.tensor_type)).name
        assert mine["shape"] == [int(x) for x in theirs.shape]
        assert doc["data_offset"] + mine["offset"] == theirs.data_offset
        assert mine["nbytes"] == theirs.n_bytes
    assert doc["summary"]["n_params"] == sum(int(t.n_elements) for t in ref.tensors)


# --- fast and light
@pytest.mark.slow
def test_inspect_does_not_import_numba(model):
    code = ("import sys\nfrom gguftool.cli import main\n"
            "try:\n    main(['inspect', '--json', sys.argv[1]])\nexcept SystemExit as e:\n    assert not e.code\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite')), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "[]"
    assert json.loads(r.stdout)["summary"]["n_tensors"] == 3


# --- bad input: one line on stderr, exit 1, no traceback
def _bad(args):
    r = invoke(*args)
    assert r.exit_code == 1
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def test_bad_inputs_exact_messages(tmp_path, model):
    assert _bad(["inspect", tmp_path]) == f"Error: {tmp_path}: is a directory, not a GGUF file"
    e = tmp_path / "empty.gguf"
    e.write_bytes(b"")
    assert _bad(["inspect", e]) == f"Error: {e}: file is empty (0 bytes), not a GGUF file"
    missing = tmp_path / "missing.gguf"
    assert _bad(["inspect", missing]) == f"Error: {missing}: no such file"
    t = tmp_path / "text.gguf"
    t.write_bytes(b"hello world, not a model")
    assert _bad(["inspect", t]) == f"Error: {t}: at byte 0: not a GGUF file (magic b'hell', expected b'GGUF')"
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(b"GGUF" + struct.pack("<III", 1, 0, 0))
    assert _bad(["inspect", v1]) == \
        f"Error: {v1}: at byte 4: GGUF version 1 is not supported (only versions 2 and 3 are)"
    be = tmp_path / "be.gguf"
    be.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0))
    assert _bad(["inspect", be]) == (f"Error: {be}: at byte 4: big-endian GGUF file (version 3 stored "
                                     f"big-endian); only little-endian files are supported")
    raw = bytearray(model.read_bytes())
    raw[16:24] = struct.pack("<Q", 2**50)
    absurd = tmp_path / "absurd.gguf"
    absurd.write_bytes(raw)
    assert _bad(["inspect", absurd]).startswith(f"Error: {absurd}: at byte 16: KV count 1125899906842624 is "
                                                f"impossible")


def test_overlapping_tensors(tmp_path):
    p = tmp_path / "o.gguf"
    with GGUFWriter(p) as w:
        w.add_tensor_info("a", (16,), GGMLType.F32)
        w.add_tensor_info("b", (16,), GGMLType.F32)
        w.write_tensor_data("a", bytes(64))
        w.write_tensor_data("b", bytes(64))
    raw = bytearray(p.read_bytes())
    # point b's offset (the last 8 bytes of its info record) at a's data
    from gguftool.gguf.reader import GGUFReader
    with GGUFReader(p) as r:
        b = r.tensor("b")
        at = b.info_offset + 8 + 1 + 4 + 8 + 4
    raw[at:at + 8] = struct.pack("<Q", 32)
    p.write_bytes(raw)
    assert _bad(["inspect", p]) == (f"Error: {p}: at byte {b.info_offset}: tensor 'b' data (data offset 32, 64 "
                                    f"bytes) overlaps tensor 'a' (ends at data offset 64)")


def test_truncated_at_every_header_boundary(model, tmp_path):
    from gguftool.gguf.reader import GGUFReader
    with GGUFReader(model) as r:
        cuts = {0, 4, 8, 16, 24, r.header_end, r.data_offset, r.file_size - 1} | set(r.kv_offsets) \
            | {t.info_offset for t in r.tensors}
        cuts |= {o + 8 for o in r.kv_offsets} | {t.info_offset + 8 + len(t.name) for t in r.tensors}
    raw = model.read_bytes()
    p = tmp_path / "cut.gguf"
    for n in sorted(cuts):
        p.write_bytes(raw[:n])
        line = _bad(["inspect", p])
        assert line.startswith(f"Error: {p}: "), line
        if n:
            assert "at byte" in line


def test_human_full(model):
    out = invoke("inspect", "--full", model).output
    assert '"t94"]' in out and "…" not in out.split("Tokenizer:")[0]
    assert '"{{ bos_token }}' + "x" * 100 + '"' in out
    assert "2 items: [2 items: [1, -2], 1 item: [\"z\"]]" in out


@pytest.mark.slow
def test_inspect_cpu_time_gemma(gemma3_gguf):
    # the budget: a tenth of gguf-dump --no-tensors (about 12 s on 2 cores) -> 1.2 s, start-up included
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "from gguftool.cli import main; main()", "inspect", "--no-tensors",
                    str(gemma3_gguf)], check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    assert cpu < 1.2, f"inspect used {cpu:.2f} s of CPU"


def test_shipped_fixture_is_reproducible(tmp_path):
    from gguf_samples import TINY_FIXTURE, make_tiny_gguf
    assert TINY_FIXTURE.exists(), "fixtures/tiny.gguf is missing: python tests/gguf_samples.py"
    made = make_tiny_gguf(tmp_path / "tiny.gguf")
    assert made.read_bytes() == TINY_FIXTURE.read_bytes()
    doc = json.loads(invoke("inspect", "--json", TINY_FIXTURE).output)
    assert doc["metadata"]["general.architecture"] == "llama" and doc["summary"]["n_tensors"] == 11

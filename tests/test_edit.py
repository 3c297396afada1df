"""`gguftool edit`: metadata changes with typed values, tensor data copied verbatim, safe output handling."""
from __future__ import annotations

import filecmp
import os

import numpy as np
import pytest
from conftest import run_cli as invoke
from gguftool.tools.edit import apply_edits, edit_file, value_from_text
from gguftool.errors import GGUFError
from gguftool.gguf.constants import GGMLType, GGUFValueType as VT
from gguftool.gguf.reader import GGUFReader
from gguftool.gguf.values import KV, GGUFArray
from gguftool.gguf.writer import GGUFWriter


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "in.gguf"
    rng = np.random.default_rng(1)
    with GGUFWriter(p) as w:
        w.add_kvs([KV("general.name", VT.STRING, "orig"), KV("ctx", VT.UINT32, 7), KV("neg", VT.INT8, -3),
                   KV("eps", VT.FLOAT32, 1e-5), KV("flag", VT.BOOL, False),
                   KV("arr", VT.ARRAY, GGUFArray(VT.INT32, [1, 2])),
                   KV("tokenizer.chat_template", VT.STRING, "old")])
        w.add_tensor_info("a", (32, 3), GGMLType.Q8_0)
        w.add_tensor_info("b", (5,), GGMLType.F32)
        w.write_tensor_data("a", rng.integers(0, 256, 102, dtype=np.uint8))
        w.write_tensor_data("b", rng.standard_normal(5).astype(np.float32))
    return p


def _tensors_equal(p, q):
    with GGUFReader(p) as r, GGUFReader(q) as s:
        assert [(t.name, t.shape, t.type, t.offset) for t in r.tensors] == \
            [(t.name, t.shape, t.type, t.offset) for t in s.tensors]
        for t in r.tensors:
            assert np.array_equal(r.tensor_bytes(t), s.tensor_bytes(t.name))


def test_no_changes_is_byte_identical(src, tmp_path):
    out = tmp_path / "out.gguf"
    r = invoke("edit", src, out)
    assert r.exit_code == 0 and r.stdout == f"wrote {out}: no metadata changes\n"
    assert filecmp.cmp(src, out, shallow=False)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2_gguf", "gemma3_gguf"])
def test_no_changes_real_files(fixture, request, tmp_path):
    p = request.getfixturevalue(fixture)
    out = tmp_path / "out.gguf"
    edit_file(p, out)
    assert filecmp.cmp(p, out, shallow=False)


def test_set_remove_template(src, tmp_path):
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text("{% for m in messages %}{{ m.content }}\n{% endfor %}", encoding="utf-8")
    out = tmp_path / "out.gguf"
    r = invoke("edit", src, out, "--set", "general.name=new=name", "--set", "ctx=4096", "--set", "neg=-100",
               "--set", "eps=0.5", "--set", "flag=true", "--set", "new.int=int:-5", "--set", "new.u=uint32:0x10",
               "--set", "new.f=float:2.5", "--set", "new.s=str:a:b", "--set", "new.b=bool:no",
               "--remove", "arr", "--chat-template-file", tmpl)
    assert r.exit_code == 0, r.stderr
    with GGUFReader(out) as g:
        types = {kv.key: kv.type for kv in g.kvs}
        md = g.metadata
    assert list(md) == ["general.name", "ctx", "neg", "eps", "flag", "tokenizer.chat_template", "new.int",
                        "new.u", "new.f", "new.s", "new.b"]
    assert md["general.name"] == "new=name" and md["ctx"] == 4096 and types["ctx"] == VT.UINT32
    assert md["neg"] == -100 and types["neg"] == VT.INT8
    assert md["eps"] == 0.5 and types["eps"] == VT.FLOAT32 and md["flag"] is True
    assert (md["new.int"], types["new.int"]) == (-5, VT.INT64)
    assert (md["new.u"], types["new.u"]) == (16, VT.UINT32)
    assert (md["new.f"], types["new.f"]) == (2.5, VT.FLOAT32)
    assert (md["new.s"], types["new.s"]) == ("a:b", VT.STRING)
    assert (md["new.b"], types["new.b"]) == (False, VT.BOOL)
    assert md["tokenizer.chat_template"] == "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    _tensors_equal(src, out)
    # the data section is copied byte for byte
    with GGUFReader(src) as a, GGUFReader(out) as b:
        assert a.data_section().tobytes() == b.data_section().tobytes()


def test_setting_same_value_is_no_change(src, tmp_path):
    out = tmp_path / "out.gguf"
    r = invoke("edit", src, out, "--set", "ctx=7", "--set", "general.name=orig")
    assert r.stdout == f"wrote {out}: no metadata changes\n"
    assert filecmp.cmp(src, out, shallow=False)


def test_alignment_change_relays_tensors(src, tmp_path):
    out, back = tmp_path / "a64.gguf", tmp_path / "back.gguf"
    edit_file(src, out, set_items=["general.alignment=uint32:64"])
    with GGUFReader(out) as r:
        assert r.alignment == 64 and r.data_offset % 64 == 0 and all(t.offset % 64 == 0 for t in r.tensors)
    _tensors_equal_ignoring_offsets(src, out)
    res = edit_file(out, back, remove=["general.alignment"])
    assert res.relaid and filecmp.cmp(src, back, shallow=False)


def _tensors_equal_ignoring_offsets(p, q):
    with GGUFReader(p) as r, GGUFReader(q) as s:
        for t in r.tensors:
            assert np.array_equal(r.tensor_bytes(t), s.tensor_bytes(t.name))


@pytest.mark.parametrize("args, message", [
    (["--set", "ctx=-1"], "Error: key 'ctx': -1 is out of range for UINT32 (0..4294967295)"),
    (["--set", "neg=200"], "Error: key 'neg': 200 is out of range for INT8 (-128..127)"),
    (["--set", "ctx=abc"], "Error: key 'ctx': 'abc' is not an integer (UINT32)"),
    (["--set", "eps=fast"], "Error: key 'eps': 'fast' is not a number (FLOAT32)"),
    (["--set", "flag=maybe"], "Error: key 'flag': 'maybe' is not a boolean (true/false)"),
    (["--set", "arr=1"], "Error: key 'arr' is an array; edit can only set scalar and string keys"),
    (["--set", "nokey=5"], "Error: key 'nokey' is not in the file: give its type as --set nokey=TYPE:VALUE with "
                           "TYPE one of int, uint32, int32, float, bool, str"),
    (["--set", "nokey=complex:5"], "Error: key 'nokey' is not in the file: give its type as --set "
                                   "nokey=TYPE:VALUE with TYPE one of int, uint32, int32, float, bool, str"),
    (["--set", "novalue"], "Error: --set 'novalue': expected KEY=VALUE (or KEY=TYPE:VALUE for a new key)"),
    (["--remove", "nokey"], "Error: cannot remove key 'nokey': it is not in the file"),
    (["--set", "ctx=1", "--remove", "ctx"], "Error: key 'ctx' is both set and removed"),
    (["--set", "ctx=1", "--set", "ctx=2"], "Error: key 'ctx' is set more than once"),
    (["--set", "general.alignment=uint32:48"], "Error: general.alignment = 48 is not a power of two"),
    (["--set", "general.alignment=int32:64"], "Error: general.alignment must be UINT32, not INT32"),
    (["--set", "tokenizer.chat_template=x", "--chat-template-file", "{tmpl}"],
     "Error: --chat-template-file and --set tokenizer.chat_template both given"),
])
def test_bad_edits(src, tmp_path, args, message):
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text("x")
    out = tmp_path / "out.gguf"
    r = invoke("edit", src, out, *[a.replace("{tmpl}", str(tmpl)) for a in args])
    assert r.exit_code == 1
    assert r.stderr == message + "\n"
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["in.gguf", "t.jinja"]


def test_output_exists_force_and_input_protected(src, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    r = invoke("edit", src, out)
    assert (r.exit_code, r.stderr) == (1, f"Error: {out}: output file already exists (use --force to overwrite "
                                          f"it)\n")
    assert out.read_bytes() == b"keep me"
    assert invoke("edit", src, out, "--force").exit_code == 0
    assert filecmp.cmp(src, out, shallow=False)
    before = src.read_bytes()
    r = invoke("edit", src, src, "--force", "--set", "ctx=1")
    assert (r.exit_code, r.stderr) == (1, f"Error: {src} is the input file {src} (same path); inputs are never "
                                          f"overwritten\n")
    assert src.read_bytes() == before


def test_bad_input_files(tmp_path):
    out = tmp_path / "out.gguf"
    r = invoke("edit", tmp_path, out)
    assert (r.exit_code, r.stderr) == (1, f"Error: {tmp_path}: is a directory, not a GGUF file\n")
    trunc = tmp_path / "t.gguf"
    trunc.write_bytes(b"GGUF\x03\x00\x00\x00")
    r = invoke("edit", trunc, out)
    assert r.exit_code == 1 and r.stderr == (f"Error: {trunc}: at byte 8: tensor count needs 8 bytes but only 0 "
                                             f"are left in the file (truncated?)\n")
    assert not out.exists()


def test_template_not_utf8(src, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_bytes(b"ok\xff")
    r = invoke("edit", src, tmp_path / "o.gguf", "--chat-template-file", bad)
    assert r.stderr == f"Error: {bad}: chat template is not valid UTF-8 (byte 2)\n"


def test_library_helpers():
    assert value_from_text("k", "0x1F", KV("k", VT.UINT16, 0)) == KV("k", VT.UINT16, 31)
    kvs, res = apply_edits([KV("a", VT.UINT8, 1), KV("b", VT.UINT8, 2)], [KV("b", VT.UINT8, 3)], ["a"])
    assert kvs == [KV("b", VT.UINT8, 3)] and res.set == ["b"] and res.removed == ["a"] and res.changed
    with pytest.raises(GGUFError):
        value_from_text("k", "1", KV("k", VT.ARRAY, GGUFArray(VT.UINT8, [1])))


def test_template_file_missing_or_directory(src, tmp_path):
    missing = tmp_path / "nope.jinja"
    r = invoke("edit", src, tmp_path / "o.gguf", "--chat-template-file", missing)
    assert (r.exit_code, r.stderr) == (1, f"Error: No such file or directory: {str(missing)!r}\n")
    r = invoke("edit", src, tmp_path / "o.gguf", "--chat-template-file", tmp_path)
    assert (r.exit_code, r.stderr) == (1, f"Error: {tmp_path}: chat template file is a directory\n")
    assert not (tmp_path / "o.gguf").exists()

"""The tokenizer of a Hugging Face checkpoint as GGUF metadata, the way llama.cpp's converter writes it.

Three sources, chosen per architecture as llama.cpp's ``set_vocab`` chooses them:

- ``tokenizer.model`` (SentencePiece, read with the ``sentencepiece`` library): ``tokenizer.ggml.model`` "llama",
  tokens, scores, token types (normal, unknown, control, user-defined, unused, byte), added tokens from
  added_tokens.json / tokenizer_config.json (``_create_vocab_sentencepiece`` in conversion/base.py);
- ``tokenizer.json`` BPE in the GPT-2 / Llama-3 style (read with the ``tokenizers`` library): "gpt2", tokens,
  token types, merges, and ``tokenizer.ggml.pre`` found by hashing the ids of a fixed check text
  (``get_vocab_base`` / ``get_vocab_base_pre``);
- ``tokenizer.json`` BPE in the Llama-2 style (byte fallback): "llama" with scores -1000 (gguf-py LlamaHfVocab).

Special tokens, add_bos/add_eos/add_sep, the chat template and normalizer flags follow gguf-py's ``SpecialVocab``
(tokenizer.json post-processor, tokenizer_config.json, chat_template.jinja / chat_template.json, config.json).
No transformers or torch: the hash uses the ``tokenizers`` library's encoding of the check text.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConvertError
from ..gguf.constants import GGUFValueType
from ..gguf.values import KV, GGUFArray
from .archs import KVList
from .pre_hashes import CHECK_TEXT, PRE_TOKENIZER_HASHES
from .schema import AnyOf, Bool, Int, ListOf, Num, Obj, Str, checked
from .tiktoken_vocab import TIKTOKEN_FILE, is_kimi_tokenizer, kimi_vocab

from .token_types import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED

SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# SpecialVocab.add_to_gguf looks up gguf-py writer methods by name; these are the ones that exist
_ID_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
            "unk": "tokenizer.ggml.unknown_token_id", "sep": "tokenizer.ggml.seperator_token_id",
            "pad": "tokenizer.ggml.padding_token_id", "mask": "tokenizer.ggml.mask_token_id",
            "eot": "tokenizer.ggml.eot_token_id", "eom": "tokenizer.ggml.eom_token_id",
            "prefix": "tokenizer.ggml.prefix_token_id", "suffix": "tokenizer.ggml.suffix_token_id",
            "middle": "tokenizer.ggml.middle_token_id"}
_ADD_KEYS = {"bos": "tokenizer.ggml.add_bos_token", "eos": "tokenizer.ggml.add_eos_token",
             "sep": "tokenizer.ggml.add_sep_token"}


@dataclass
class VocabInfo:
    """What the tokenizer section holds, for --dry-run and error messages."""

    model: str = ""
    pre: str | None = None
    n_tokens: int = 0
    n_merges: int = 0
    source: str = ""
    special: dict[str, int] = field(default_factory=dict)
    chat_template: bool = False
    warnings: list[str] = field(default_factory=list)


# --- the shape of each tokenizer file, checked when it is read (see schema.py): the code below relies on it
_TOKEN_ID = Int(min=0, max=2**31 - 1)   # llama_token is an int32
_ADDED_TOKEN = Obj({"content": Str(), "special": Bool(), "normalized": Bool(), "id": _TOKEN_ID},
                   required=("content",))
_TOKEN_REF = AnyOf((Str(), Obj({"content": Str()}, required=("content",))),
                   'a string or an object with a "content" string')
_CHAT_TEMPLATE = AnyOf((Str(), ListOf(Obj({"name": Str(), "template": Str()}, required=("name", "template")))),
                       'a string or a list of objects with "name" and "template" strings')
_PIECE = Obj({"SpecialToken": Obj({"id": Str()}), "Sequence": Obj({"id": Str()})})
_PROCESSOR = {"type": Str(), "single": ListOf(_PIECE), "pair": ListOf(_PIECE),
              "cls": ListOf(AnyOf((Str(), Int()), "a token or an id"), 1),
              "sep": ListOf(AnyOf((Str(), Int()), "a token or an id"), 1)}
_NORMALIZER = {"type": Str(), "lowercase": Bool(), "strip_accents": Bool()}
_SCHEMAS = {
    "tokenizer.json": Obj({
        "added_tokens": ListOf(Obj(_ADDED_TOKEN.fields, required=("id", "content"))),
        "model": Obj({"type": Str(), "byte_fallback": Bool(), "ignore_merges": Bool(),
                      "vocab": AnyOf((Obj(values=_TOKEN_ID), ListOf(ListOf(AnyOf((Str(), Num()), "a piece or a "
                                                                                   "score")))),
                                     "an object of token ids or a list of [piece, score] pairs"),
                      "merges": ListOf(AnyOf((Str(), ListOf(Str())), "a string or a pair of strings"))}),
        "normalizer": Obj({**_NORMALIZER, "normalizers": ListOf(Obj(_NORMALIZER))}),
        "post_processor": Obj({**_PROCESSOR, "processors": ListOf(Obj(_PROCESSOR))}),
        "decoder": Obj({"type": Str()}),
    }),
    "tokenizer_config.json": Obj({
        "added_tokens_decoder": Obj(values=_ADDED_TOKEN, int_keys=True),
        "chat_template": _CHAT_TEMPLATE,
        **{f"{t}_token": _TOKEN_REF for t in SPECIAL_TYPES},
        **{f"add_{t}_token": Bool() for t in SPECIAL_TYPES},
        "add_prefix_space": Bool(),
        "additional_special_tokens": ListOf(_TOKEN_REF),
        "tokenizer_class": Str(),
    }),
    "added_tokens.json": Obj(values=_TOKEN_ID),
    "chat_template.json": Obj({"chat_template": _CHAT_TEMPLATE}),
    "config.json": Obj(),   # its values are checked by archs.normalized_config
}


def _load_json(path: Path) -> Any:
    """A tokenizer file's JSON, checked against the schema of its file name."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    return checked(str(path), data, _SCHEMAS[path.name])


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not valid UTF-8 ({e})") from None


def _str_array(key: str, values: list[str]) -> KV:
    return KV(key, GGUFValueType.ARRAY, GGUFArray(GGUFValueType.STRING, values))


def _array(key: str, etype: GGUFValueType, values) -> KV:
    return KV(key, GGUFValueType.ARRAY, GGUFArray(etype, values))


def does_token_look_special(text: str) -> bool:
    """TextModel.does_token_look_special: added tokens that ought to be control tokens."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


# --- SpecialVocab (gguf-py/gguf/vocab.py), restated
class SpecialVocab:
    def __init__(self, directory: Path, load_merges: bool = False, n_vocab: int | None = None,
                 special_token_types=None):
        self.dir = directory
        self.load_merges = load_merges
        self.n_vocab = n_vocab
        self.types = tuple(special_token_types) if special_token_types is not None else SPECIAL_TYPES
        self.merges: list[str] = []
        self.ids: dict[str, int] = {}
        self.add: dict[str, bool] = {}
        self.chat_template: Any = None
        self.lowercase: bool | None = None
        self.strip_accents: bool | None = None
        self.warnings: list[str] = []
        self._from_tokenizer_json()
        self._from_config_json()
        if self.load_merges and not self.merges:
            self._from_merges_txt()

    def set_id(self, typ: str, tid: Any) -> None:
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if tid < 0:
            raise ConvertError(f"invalid value for special token type {typ}: {tid}")
        if self.n_vocab is None or tid < self.n_vocab:
            self.ids.setdefault(typ, tid)
            return
        self.warnings.append(f"special token type {typ}, id {tid} out of range, must be under {self.n_vocab}")

    def _from_merges_txt(self) -> None:
        p = self.dir / "merges.txt"
        if not p.is_file():
            return
        merges = []
        lines = _read_text(p).splitlines()
        if lines and lines[0].strip().startswith("#"):
            lines = lines[1:]
        for line in lines:
            parts = line.strip().split(None, 3)
            if len(parts) == 2:
                merges.append(f"{parts[0]} {parts[1]}")
        self.merges = merges

    def _normalizer(self, n: dict) -> None:
        t = n.get("type")
        if t == "Lowercase":
            self.lowercase = True
        elif t == "StripAccents":
            self.strip_accents = True
        elif t == "BertNormalizer":
            if "lowercase" in n:
                self.lowercase = n["lowercase"]
            if "strip_accents" in n:
                self.strip_accents = n["strip_accents"]
        elif t == "Sequence":
            inner = n.get("normalizers")   # the schema checks two levels; deeper ones are read if well-formed
            for m in inner if isinstance(inner, list) else []:
                if isinstance(m, dict):
                    self._normalizer(m)

    def _from_tokenizer_json(self) -> None:
        tok = None
        p = self.dir / "tokenizer.json"
        added_tokens: list = []
        if p.is_file():
            tok = _load_json(p)
            if self.load_merges:
                merges = (tok.get("model") or {}).get("merges")
                if isinstance(merges, list) and merges:
                    if isinstance(merges[0], str):
                        self.merges = merges
                    elif isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
                        # pairs (transformers >= 4.45): spaces inside a part become U+0120 as llama.cpp expects
                        self.merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part)
                                                for part in pair) for pair in merges]
                    else:
                        raise ConvertError(f"{p}: unknown tokenizer merges format")
            if normalizer := tok.get("normalizer"):
                self._normalizer(normalizer)
            added_tokens = tok.get("added_tokens") or []
        cfg = None
        pc = self.dir / "tokenizer_config.json"
        if pc.is_file():
            cfg = _load_json(pc)
        if tok:
            self._post_processor(tok, cfg)
        if not cfg:
            return
        alt = None
        jinja, cjson = self.dir / "chat_template.jinja", self.dir / "chat_template.json"
        if jinja.is_file():
            alt = _read_text(jinja)
            extra = sorted((self.dir / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}] + [
                    {"name": e.stem, "template": _read_text(e)} for e in extra]
        elif cjson.is_file():
            alt = _load_json(cjson).get("chat_template")
        ct = cfg.get("chat_template", alt)
        if ct is None or isinstance(ct, (str, list)):
            self.chat_template = ct
        for typ in self.types:
            add_entry = cfg.get(f"add_{typ}_token")
            if isinstance(add_entry, bool) and typ not in self.add:
                self.add[typ] = add_entry
            entry = cfg.get(f"{typ}_token")
            if isinstance(entry, dict):
                entry = entry.get("content")
            if not isinstance(entry, str):
                continue
            tid = next((a.get("id") for a in added_tokens if a.get("content") == entry), None)
            self.set_id(typ, tid)

    def _post_processor(self, tok: dict, cfg: dict | None) -> None:
        """SpecialVocab's crude reading of the post-processor: which specials are added around a sequence."""
        c = cfg or {}
        bos, cls_, eos, sep = c.get("bos_token"), c.get("cls_token"), c.get("eos_token"), c.get("sep_token")
        if not bos and cls_ and cfg:
            cfg["bos_token"] = bos = cls_
        if not eos and sep and cfg:
            cfg["eos_token"] = eos = sep
        pp = tok.get("post_processor")
        if not pp:
            return
        for proc in pp.get("processors") or [pp]:
            ptype = proc.get("type")
            if ptype == "ByteLevel":
                self.add.setdefault("bos", False)
                self.add.setdefault("eos", False)
            elif ptype == "RobertaProcessing":
                self.add["bos"] = self.add["eos"] = self.add["sep"] = True
                if not cls_ and cfg:
                    cls_ = (proc.get("cls") or [bos])[0]
                    cfg["cls_token"] = cls_
                if not sep and cfg:
                    sep = (proc.get("sep") or [eos])[0]
                    cfg["sep_token"] = sep
            elif ptype == "TemplateProcessing":
                single, pair = proc.get("single") or [], proc.get("pair") or []
                first = last = None
                if len(single) > 1:
                    if first := (single[0].get("SpecialToken") or {}).get("id"):
                        if not cfg:
                            bos = first
                        elif first not in (bos, cls_):
                            if not bos:
                                cfg["bos_token"] = bos = first
                            if not cls_:
                                cfg["cls_token"] = cls_ = first
                        self.add["bos"] = first in (bos, cls_)
                    if last := (single[-1].get("SpecialToken") or {}).get("id"):
                        if not cfg:
                            eos = last
                        elif last != eos:
                            if "eot" not in self.types:
                                self.types = self.types + ("eot",)
                                cfg["eot_token"] = eos
                            elif "eom" not in self.types:
                                self.types = self.types + ("eom",)
                                cfg["eom_token"] = eos
                            cfg["eos_token"] = eos = last
                        self.add["eos"] = last == eos
                if pair:
                    start = 1 if first and (pair[0].get("SpecialToken") or {}).get("id") == first else 0
                    stop = -1 if last and (pair[-1].get("SpecialToken") or {}).get("id") == last else None
                    pair = pair[slice(start, stop)]
                    if pair:
                        a = (pair[0].get("Sequence") or {}).get("id")
                        b = (pair[-1].get("Sequence") or {}).get("id")
                        if a == "A" and b == "B" and (mid := pair[1:-1]):
                            add_sep = False
                            if entry := (mid[0].get("SpecialToken") or {}).get("id"):
                                if entry in (sep, eos) and not last:
                                    add_sep = True
                            if len(mid) == 2:
                                if entry := (mid[1].get("SpecialToken") or {}).get("id"):
                                    if entry in (sep, eos):
                                        add_sep = True
                            self.add["sep"] = add_sep
                            if add_sep and not sep and cfg:
                                cfg["sep_token"] = eos

    def _from_config_json(self) -> None:
        p = self.dir / "config.json"
        if not p.is_file():
            return
        cfg = _load_json(p)
        for typ in self.types:
            tid = cfg.get(f"{typ}_token_id")
            if tid is None and isinstance(cfg.get("text_config"), dict):
                tid = cfg["text_config"].get(f"{typ}_token_id")
            self.set_id(typ, tid)

    def add_to(self, kv: KVList) -> None:
        """SpecialVocab.add_to_gguf."""
        if self.merges:
            kv.extend([_str_array("tokenizer.ggml.merges", list(self.merges))])
        elif self.load_merges:
            self.warnings.append("merges requested but none found, output may be non-functional")
        for typ, tid in self.ids.items():
            if typ in _ID_KEYS:
                kv.u32(_ID_KEYS[typ], tid)
        for typ, val in self.add.items():
            if typ in _ADD_KEYS:
                kv.boolean(_ADD_KEYS[typ], val)
        if self.chat_template is not None:
            add_chat_template(kv, self.chat_template)
        if self.lowercase is not None:
            kv.boolean("tokenizer.ggml.normalizer.lowercase", self.lowercase)
        if self.strip_accents is not None:
            kv.boolean("tokenizer.ggml.normalizer.strip_accents", self.strip_accents)


def add_chat_template(kv: KVList, value) -> None:
    """GGUFWriter.add_chat_template: one string, or named templates plus the default."""
    if isinstance(value, str):
        kv.string("tokenizer.chat_template", value)
        return
    default, names = None, []
    for choice in value:
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in choice.get("name", ""))
        template = choice.get("template")
        if name and template is not None:
            if name == "default":
                default = template
            else:
                if name not in names:
                    names.append(name)
                kv.string(f"tokenizer.chat_template.{name}", template)
    if names:
        kv.extend([_str_array("tokenizer.chat_templates", names)])
    if default is not None:
        kv.string("tokenizer.chat_template", default)


# --- SentencePiece
def sentencepiece_vocab(directory: Path, vocab_size: int | None, info: VocabInfo, phi3: bool = False):
    """(tokens as str, scores, token types) as _create_vocab_sentencepiece builds them (phi3: as
    Phi3MiniModel.set_vocab builds them, which treats added tokens its own way)."""
    path = directory / "tokenizer.model"
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConvertError("the sentencepiece package is needed to read tokenizer.model") from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError, ValueError) as e:   # ValueError: UnicodeDecodeError of a damaged piece
        raise ConvertError(f"{path}: cannot load SentencePiece model ({(str(e).splitlines() or [type(e).__name__])[0]})"
                           ) from None
    n = vocab_size or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [UNUSED] * n
    for i in range(sp.vocab_size()):
        if i >= n:
            info.warnings.append(f"ignoring tokenizer.model tokens from {i}: config.json vocab_size is {n}")
            break
        t = NORMAL
        if sp.IsUnknown(i):
            t = UNKNOWN
        elif sp.IsControl(i):
            t = CONTROL
        elif sp.IsUnused(i):
            t = UNUSED
        elif sp.IsByte(i):
            t = BYTE
        try:
            tokens[i] = sp.IdToPiece(i).encode("utf-8")
        except UnicodeDecodeError:
            raise ConvertError(f"{path}: token {i} is not valid UTF-8 (a damaged SentencePiece model)") from None
        scores[i] = sp.GetScore(i)
        types[i] = t
    added = directory / "added_tokens.json"
    if added.is_file():
        for key, tid in _load_json(added).items():
            if tid >= n:   # llama.cpp's converter ignores it too, with a warning
                info.warnings.append(f"{added}: ignoring token {key!r}: id {tid} is out of range (vocab_size {n})")
                continue
            tokens[tid] = key.encode("utf-8")
            scores[tid] = -1000.0
            types[tid] = USER_DEFINED
    if phi3:   # Phi3MiniModel.set_vocab: every added token of tokenizer_config.json, then of tokenizer.json
        sources = []
        tc = directory / "tokenizer_config.json"
        if tc.is_file():
            sources += [(int(i), d) for i, d in (_load_json(tc).get("added_tokens_decoder") or {}).items()]
        tj = directory / "tokenizer.json"
        if tj.is_file():
            sources += [(int(d["id"]), d) for d in _load_json(tj).get("added_tokens") or []]
        for tid, data in sources:
            if not 0 <= tid < n:
                raise ConvertError(f"added token {data.get('content')!r} has id {tid}, outside the vocabulary "
                                   f"(vocab_size {n})")
            tokens[tid] = data["content"].encode("utf-8")
            scores[tid] = -1000.0
            types[tid] = CONTROL if data.get("special") else USER_DEFINED
        return [t.decode("utf-8", errors="surrogateescape") for t in tokens], scores, types
    tc = directory / "tokenizer_config.json"
    if tc.is_file():
        for tid, data in (_load_json(tc).get("added_tokens_decoder") or {}).items():
            tid = int(tid)
            text: str = data["content"]
            if tid >= n:
                info.warnings.append(f"{tc}: ignoring added token {text!r}: id {tid} is out of range "
                                     f"(vocab_size {n})")
                continue
            if data.get("special") or does_token_look_special(text):
                types[tid] = CONTROL
            else:
                text = text.replace("\u2581", " ")  # pre-normalize user-defined spaces
                types[tid] = USER_DEFINED
            scores[tid] = -1000.0
            tokens[tid] = text.encode("utf-8")
    # GGUF strings are bytes; keep str for the KV model (all pieces are valid UTF-8)
    return [t.decode("utf-8", errors="surrogateescape") for t in tokens], scores, types


def _llama_vocab(directory: Path, kv: KVList, info: VocabInfo, tokens: list, scores: list, types: list,
                 source: str) -> None:
    """The metadata of a SentencePiece-style ("llama") vocabulary with its special tokens, read from ``source``."""
    kv.string("tokenizer.ggml.model", "llama")
    kv.string("tokenizer.ggml.pre", "default")
    kv.extend([_str_array("tokenizer.ggml.tokens", tokens),
               _array("tokenizer.ggml.scores", GGUFValueType.FLOAT32, scores),
               _array("tokenizer.ggml.token_type", GGUFValueType.INT32, types)])
    sv = SpecialVocab(directory, n_vocab=len(tokens))
    sv.add_to(kv)
    info.warnings += sv.warnings
    info.model, info.pre, info.n_tokens, info.source = "llama", "default", len(tokens), source
    info.special = dict(sv.ids)


def _spm_kvs(directory: Path, hp: dict, kv: KVList, info: VocabInfo, phi3: bool = False) -> None:
    tokens, scores, types = sentencepiece_vocab(directory, hp.get("vocab_size"), info, phi3)
    _llama_vocab(directory, kv, info, tokens, scores, types, "tokenizer.model")


# --- tokenizer.json
def _load_tokenizers(path: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConvertError("the tokenizers package is needed to read tokenizer.json") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises its own Exception type
        raise ConvertError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None


def _added_tokens(directory: Path, tj: dict) -> dict[int, dict]:
    """id -> {content, special, normalized}: tokenizer.json added_tokens, overridden by tokenizer_config.json."""
    out = {int(a["id"]): dict(a) for a in (tj.get("added_tokens") or []) if "id" in a}
    tc = directory / "tokenizer_config.json"
    if tc.is_file():
        for tid, data in (_load_json(tc).get("added_tokens_decoder") or {}).items():
            out[int(tid)] = {**out.get(int(tid), {}), **data, "id": int(tid)}
    return out


def pre_tokenizer_name(tokenizer) -> tuple[str | None, str]:
    """(llama.cpp's tokenizer.ggml.pre for this tokenizer or None if unknown, the check hash)."""
    ids = tokenizer.encode(CHECK_TEXT).ids
    chkhsh = hashlib.sha256(str(list(ids)).encode()).hexdigest()
    return PRE_TOKENIZER_HASHES.get(chkhsh), chkhsh


def _bpe_kvs(directory: Path, hp: dict, kv: KVList, info: VocabInfo) -> None:
    """_set_vocab_gpt2 (get_vocab_base + SpecialVocab with merges)."""
    path = directory / "tokenizer.json"
    tj = _load_json(path)
    tk = _load_tokenizers(path)
    vocab = tk.get_vocab(with_added_tokens=True)
    vocab_size = hp.get("vocab_size", len(vocab))
    if vocab and max(vocab.values()) >= vocab_size:
        raise ConvertError(f"{path}: token id {max(vocab.values())} does not fit config.json vocab_size "
                           f"{vocab_size}")
    pre, chkhsh = pre_tokenizer_name(tk)
    if pre is None:
        info.warnings.append(f"BPE pre-tokenizer not recognized (check hash {chkhsh}); writing 'default' "
                             f"(llama.cpp's converter refuses such a tokenizer)")
        pre = "default"
    reverse = {i: t for t, i in vocab.items()}
    added = _added_tokens(directory, tj)
    added_by_text = {a["content"]: a for a in added.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        t = reverse[i]
        a = added_by_text.get(t)
        if a is not None:
            if not added.get(i, a).get("normalized", True):
                t = tk.decode(tk.encode(t, add_special_tokens=False).ids, skip_special_tokens=False)
            if added.get(i, a).get("special") or does_token_look_special(t):
                types.append(CONTROL)
            else:
                t = t.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(t)
    kv.string("tokenizer.ggml.model", "gpt2")
    kv.string("tokenizer.ggml.pre", pre)
    kv.extend([_str_array("tokenizer.ggml.tokens", tokens),
               _array("tokenizer.ggml.token_type", GGUFValueType.INT32, types)])
    sv = SpecialVocab(directory, load_merges=True)
    sv.add_to(kv)
    info.warnings += sv.warnings
    info.model, info.pre, info.n_tokens, info.n_merges = "gpt2", pre, len(tokens), len(sv.merges)
    info.source, info.special = "tokenizer.json", dict(sv.ids)


def _is_llama_hf(tj: dict) -> bool:
    """gguf-py LlamaHfVocab accepts a tokenizer.json: Llama-2-style BPE with byte fallback."""
    m = tj.get("model") or {}
    llama3 = m.get("type") == "BPE" and m.get("ignore_merges", False) and not m.get("byte_fallback", True)
    return (not llama3 and m.get("type") == "BPE" and bool(m.get("byte_fallback", False))
            and (tj.get("decoder") or {}).get("type") == "Sequence")


def _llama_hf_kvs(directory: Path, hp: dict, kv: KVList, info: VocabInfo) -> None:
    """_set_vocab_llama_hf: base tokens (byte tokens typed BYTE, specials CONTROL), then added tokens."""
    path = directory / "tokenizer.json"
    tj = _load_json(path)
    base = (tj.get("model") or {}).get("vocab") or {}
    if not isinstance(base, dict) or sorted(base.values()) != list(range(len(base))):
        raise ConvertError(f'{path}: "model.vocab" of a BPE tokenizer must map its {len(base)} tokens to the ids '
                           f'0 to {len(base) - 1}, each id once')
    added = _added_tokens(directory, tj)
    n_base = len(base)
    reverse = {i: t for t, i in base.items()}
    tc = _load_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    special_texts = set()
    for typ in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        e = tc.get(f"{typ}_token")
        e = e.get("content") if isinstance(e, dict) else e
        if isinstance(e, str):
            special_texts.add(e)
    for e in tc.get("additional_special_tokens") or []:
        special_texts.add(e.get("content") if isinstance(e, dict) else e)
    vocab_all = {**base, **{a["content"]: i for i, a in added.items()}}
    special_ids = {vocab_all[t] for t in special_texts if t in vocab_all}
    added_list = sorted((i, a["content"]) for i, a in added.items() if i >= n_base)
    added_ids = {i for i, _ in added_list}
    tokens, scores, types = [], [], []
    for i in range(n_base):
        if i in added_ids:
            continue
        t = reverse[i]
        tokens.append(t)
        scores.append(-1000.0)
        types.append(BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t) else CONTROL if i in special_ids else NORMAL)
    for i, t in added_list:
        tokens.append(t)
        scores.append(-1000.0)
        types.append(CONTROL if t in special_texts and vocab_all.get(t) in special_ids else USER_DEFINED)
    _llama_vocab(directory, kv, info, tokens, scores, types, "tokenizer.json")


# --- tiktoken.model (Kimi-K2)
def _kimi_kvs(directory: Path, hp: dict, kv: KVList, info: VocabInfo) -> None:
    """DeepseekV2Model.set_vocab's "kimi-k2" branch: tiktoken ranks -> GPT-2 tokens + rebuilt merges (tiktoken_vocab),
    Kimi's special tokens, then SpecialVocab without merges. The pre-tokenizer is decided from the files (see
    tiktoken_vocab.is_kimi_tokenizer); llama.cpp applies Kimi's regex for tokenizer.ggml.pre "kimi-k2"."""
    tc_path = directory / "tokenizer_config.json"
    tc = _load_json(tc_path) if tc_path.is_file() else None
    if not is_kimi_tokenizer(directory, tc, hp):
        raise ConvertError(f"{directory}: {TIKTOKEN_FILE} without Kimi's tokenizer (tokenizer_config.json's "
                           f"tokenizer_class TikTokenTokenizer / auto_map tokenization_kimi, or a kimi model_type): "
                           "its pre-tokenizer is unknown, as it is to llama.cpp's converter")
    if tc is None:
        raise _missing(directory, "tokenizer_config.json (Kimi's special tokens) next to tiktoken.model")
    from tqdm import tqdm

    with tqdm(desc="tokenizer merges", unit="tok", leave=False, disable=None) as bar:
        tokens, types, merges = kimi_vocab(directory, hp.get("vocab_size"), tc, bar)
    kv.string("tokenizer.ggml.model", "gpt2")
    kv.string("tokenizer.ggml.pre", "kimi-k2")
    kv.extend([_str_array("tokenizer.ggml.tokens", tokens),
               _array("tokenizer.ggml.token_type", GGUFValueType.INT32, types),
               _str_array("tokenizer.ggml.merges", merges)])
    sv = SpecialVocab(directory, load_merges=False)
    sv.add_to(kv)
    info.warnings += sv.warnings
    info.model, info.pre, info.n_tokens, info.n_merges = "gpt2", "kimi-k2", len(tokens), len(merges)
    info.source, info.special = TIKTOKEN_FILE, dict(sv.ids)


# --- per-architecture set_vocab
def _missing(directory: Path, expected: str = "tokenizer.model or tokenizer.json") -> ConvertError:
    return ConvertError(f"{directory}: no tokenizer found (expected {expected})")


def vocab_kvs(vocab_style: str, directory: Path, hp: dict) -> tuple[list[KV], VocabInfo]:
    """The tokenizer KVs llama.cpp writes for an architecture's ``set_vocab``, and a summary."""
    directory = Path(directory)
    kv = KVList()
    info = VocabInfo()
    spm = (directory / "tokenizer.model").is_file()
    tjson = (directory / "tokenizer.json").is_file()
    if vocab_style == "llama":
        tc = directory / "tokenizer_config.json"
        if tc.is_file():
            cfg = _load_json(tc)
            if cfg.get("add_prefix_space") is not None:
                kv.boolean("tokenizer.ggml.add_space_prefix", cfg["add_prefix_space"])
        if spm:
            _spm_kvs(directory, hp, kv, info)
        elif tjson and _is_llama_hf(_load_json(directory / "tokenizer.json")):
            _llama_hf_kvs(directory, hp, kv, info)
        elif tjson:
            _bpe_kvs(directory, hp, kv, info)
        else:
            raise _missing(directory)
        vs = hp.get("vocab_size", 32000)
        if vs == 32016:  # CodeLlama infill tokens
            sv = SpecialVocab(directory, special_token_types=("prefix", "suffix", "middle", "eot"))
            for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                sv.set_id(typ, tid)
            sv.add_to(kv)
        if vs == 49152:  # llama.cpp: "granite small models" (SmolLM shares the vocab size)
            kv.boolean("tokenizer.ggml.add_bos_token", False)
    elif vocab_style == "qwen2":
        if spm:
            _spm_kvs(directory, hp, kv, info)
        elif tjson:
            _bpe_kvs(directory, hp, kv, info)
        else:
            raise _missing(directory)
    elif vocab_style == "gpt2":  # TextModel's default set_vocab: tokenizer.json (byte-level BPE) only
        if tjson:
            _bpe_kvs(directory, hp, kv, info)
        else:
            raise _missing(directory, "tokenizer.json")
    elif vocab_style == "deepseek":  # DeepseekV2Model.set_vocab: tokenizer.json, else Kimi's tiktoken (kimi-k2)
        if tjson:
            _bpe_kvs(directory, hp, kv, info)
        elif (directory / TIKTOKEN_FILE).is_file():
            _kimi_kvs(directory, hp, kv, info)
        else:
            raise _missing(directory, f"tokenizer.json, or {TIKTOKEN_FILE} with Kimi's tokenizer_config.json")
    elif vocab_style == "phi3":  # Phi3MiniModel.set_vocab: GPT2Tokenizer (Phi-4) -> tokenizer.json, else SPM
        tc = directory / "tokenizer_config.json"
        if tc.is_file() and _load_json(tc).get("tokenizer_class") == "GPT2Tokenizer":
            if not tjson:
                raise _missing(directory, "tokenizer.json")
            _bpe_kvs(directory, hp, kv, info)
        elif spm:
            _spm_kvs(directory, hp, kv, info, phi3=True)
        else:
            raise _missing(directory, "tokenizer.model")
    elif vocab_style == "gemma2":  # Gemma2Model.set_vocab: SentencePiece only, no space prefix
        if not spm:
            raise _missing(directory, "tokenizer.model")
        _spm_kvs(directory, hp, kv, info)
        kv.boolean("tokenizer.ggml.add_space_prefix", False)
    elif vocab_style == "gemma3":
        if spm:
            _spm_kvs(directory, hp, kv, info)
            kv.boolean("tokenizer.ggml.add_space_prefix", False)
        elif tjson:
            _bpe_kvs(directory, hp, kv, info)
        else:
            raise _missing(directory)
    else:  # pragma: no cover - the arch table names one of the above
        raise ConvertError(f"unknown vocabulary style {vocab_style!r}")
    info.chat_template = "tokenizer.chat_template" in kv
    return kv.items(), info


def gemma3_vocab_rows(directory: Path, hp: dict) -> int:
    """Gemma3Model.modify_tensors: how many token_embd rows llama.cpp keeps (the tokenizer's real size)."""
    directory = Path(directory)
    if (directory / "tokenizer.model").is_file():
        info = VocabInfo()
        return len(sentencepiece_vocab(directory, hp.get("vocab_size"), info)[0])
    p = directory / "tokenizer.json"
    if not p.is_file():
        raise _missing(directory)
    tj = _load_json(p)
    return len((tj.get("model") or {}).get("vocab") or {}) + len(tj.get("added_tokens") or [])


# every file of the checkpoint folder the functions above may read (besides config.json)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "added_tokens.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", TIKTOKEN_FILE)


def tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files present in the checkpoint folder ``directory``: what converting it may read."""
    directory = Path(directory)
    found = [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]
    return found + sorted((directory / "additional_chat_templates").glob("*.jinja"))

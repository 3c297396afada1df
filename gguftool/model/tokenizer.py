"""Text -> token ids exactly as llama.cpp's ``llama_tokenize`` does, from a model's GGUF vocabulary metadata.

Two vocabulary kinds are supported, the ones llama-family checkpoints use:

- ``tokenizer.ggml.model = "llama"`` (SentencePiece-style, "SPM"): spaces become U+2581, a space is prefixed when
  ``add_space_prefix``; symbols (UTF-8 characters) are merged greedily by the highest token score (ties: leftmost);
  characters that never form a token are emitted as ``<0xXX>`` byte tokens.
- ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE): the text is split by the pre-tokenizer regexes of
  ``tokenizer.ggml.pre`` (applied one after the other, each to the pieces of the previous one, keeping the
  non-matching gaps as pieces), every piece is byte-encoded with GPT-2's byte -> unicode table and merged by
  merge rank (lowest rank first, ties leftmost).

Before either, the text is partitioned on user-defined special tokens (llama.cpp does this even when special
tokens are not parsed; control tokens are only split out with ``parse_special=True``). Mirrors
``llama_vocab::impl::tokenize``, ``tokenizer_st_partition``, ``llm_tokenizer_spm_session`` and
``llm_tokenizer_bpe_session`` in src/llama-vocab.cpp.

The regexes are run with the regex engine of the ``tokenizers`` package (Oniguruma), which supports ``\\p{L}``
classes and lookahead, so no extra dependency is needed.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from ..errors import ImatrixError
from .metadata import Metadata, MetadataReader

# --- token types as stored in tokenizer.ggml.token_type (llama_token_type)
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6

# Token texts llama.cpp's vocab loader marks as control tokens whatever their stored type (EOT/EOM/FIM detection
# in llama_vocab::impl::load); a control token is not split out of text when special tokens are not parsed.
_FORCED_CONTROL = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>",
    "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>", "<|eom_id|>", "<|fim_prefix|>", "<fim-prefix>",
    "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>", "<|prefix|>", "<|fim_suffix|>",
    "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>",
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>",
    "<|middle|>", "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>", "<|repo_name|>",
    "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
    # end-of-generation texts
    "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "</s>", "[EOS]", "<eos>", "<turn|>", "<|tool_response>",
    "[e~[",
])

# --- BPE pre-tokenizer regexes (llm_tokenizer_bpe's constructor), by tokenizer.ggml.pre
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Kimi-K2 (KIMI_K2; its tokenization_kimi.py's tiktoken pattern, which llama.cpp's unicode.cpp implements by hand):
# Han runs; words split at case changes (Han excluded from the letter classes by "&&" intersections) with
# English contractions; up to 3 digits; punctuation runs; newlines; spaces
_KIMI_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_KIMI_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_KIMI_K2 = "|".join([
    r"[\p{Han}]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_KIMI_LETTERS_UPPER}*{_KIMI_LETTERS_LOWER}+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_KIMI_LETTERS_UPPER}+{_KIMI_LETTERS_LOWER}*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+"])

_PRE_REGEXES = {}
for _names, _exprs in [
    (("default",), [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
     [_LLAMA3]),
    (("dbrx", "smaug-bpe"), [_LLAMA3]),
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
     [r"\p{N}", _GPT2]),
    (("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
      "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "trillion",
      "granite-docling", "exaone4"), [_GPT2]),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"), [_QWEN2]),
    (("deepseek-llm",), ['[\r\n]',
                         '\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+',
                         '\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+',
                         '\\s+$',
                         '[一-龥ࠀ-一가-\ud7ff]+',
                         '\\p{N}+']),   # DeepSeek-V2 / V2-Lite (DEEPSEEK_LLM)
    (("kimi-k2",), [_KIMI_K2]),
    (("deepseek-v3",), [r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",          # DeepSeek-V3 / R1 (DEEPSEEK3_LLM)
                        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]),
]:
    for _n in _names:
        _PRE_REGEXES[_n] = _exprs
# pre-tokenizers whose vocab sets add_bos / ignore_merges (llama_vocab::impl::load)
_PRE_ADD_BOS = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                "jina-v5-nano"}
_PRE_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                      "jina-v5-nano"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_ENC = _bytes_to_unicode()


@dataclass
class Tokenizer:
    """A llama.cpp-compatible tokenizer built from GGUF tokenizer metadata (see ``from_metadata``)."""

    model: str                          # "llama" (SPM) or "gpt2" (BPE)
    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    merges: dict[tuple[str, str], int] = field(default_factory=dict)
    pre: str = "default"
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    ignore_merges: bool = False

    def __post_init__(self):
        self.token_to_id: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            if t == "":
                t = f"[EMPTY_{i}]"
            self.token_to_id[t] = i
        attrs = list(self.token_types)
        # special-token partition list: user-defined, control and unknown tokens, longest text first
        special = []
        for i, t in enumerate(self.tokens):
            tt = attrs[i] if i < len(attrs) else TT_NORMAL
            control = tt == TT_CONTROL or t in _FORCED_CONTROL
            if tt in (TT_CONTROL, TT_USER_DEFINED, TT_UNKNOWN) or control:
                special.append((i, t, control or tt == TT_UNKNOWN))
        special.sort(key=lambda e: -len(e[1].encode("utf-8")))
        self._special = special
        self._bpe_cache: dict[str, list[int]] = {}
        if self.model == "gpt2":
            exprs = _PRE_REGEXES.get(self.pre)
            if exprs is None:
                raise ImatrixError(f"unsupported BPE pre-tokenizer {self.pre!r} (tokenizer.ggml.pre)")
            from tokenizers import Regex
            from tokenizers.pre_tokenizers import Split
            self._splitters = [Split(Regex(e), behavior="isolated") for e in exprs]
        elif self.model != "llama":
            raise ImatrixError(f"unsupported tokenizer model {self.model!r} (tokenizer.ggml.model); "
                               "supported: llama (SentencePiece), gpt2 (BPE)")

    # --- construction
    @classmethod
    def from_metadata(cls, kvs: Metadata, *, origin: str = "") -> "Tokenizer":
        """``kvs``: anything with ``.get(key, default)`` returning GGUF metadata values (a TensorSource works).
        Every value is checked for type and range first; errors (ImatrixError) name ``origin`` (the file), the
        key and the value."""
        md = MetadataReader(kvs, origin)
        model = md.get_str("tokenizer.ggml.model")
        if model is None:
            md.fail("the model has no tokenizer (metadata key tokenizer.ggml.model is missing)")
        tokens = md.str_array("tokenizer.ggml.tokens")
        if not tokens:
            md.fail("the model has no vocabulary (metadata key tokenizer.ggml.tokens is missing)")
        n = len(tokens)
        scores_arr = md.number_array("tokenizer.ggml.scores", n)
        scores = scores_arr.tolist() if scores_arr is not None else [0.0] * n
        types_arr = md.number_array("tokenizer.ggml.token_type", n, integer=True)
        if types_arr is not None and n and not (types_arr.min() >= 0 and types_arr.max() <= TT_BYTE):
            bad = int(np.flatnonzero((types_arr < 0) | (types_arr > TT_BYTE))[0])
            md.bad(f"tokenizer.ggml.token_type[{bad}]", int(types_arr[bad]), f"token types are 0 .. {TT_BYTE}")
        types = types_arr.tolist() if types_arr is not None else [TT_NORMAL] * n
        pre = md.get_str("tokenizer.ggml.pre") or "default"
        merges: dict[tuple[str, str], int] = {}
        if model == "gpt2":
            raw = md.str_array("tokenizer.ggml.merges")
            if raw is None:
                md.fail("BPE vocabulary without merges (metadata key tokenizer.ggml.merges is missing)")
            for rank, m in enumerate(raw):
                pos = m.find(" ", 1)
                if pos < 0:
                    md.bad(f"tokenizer.ggml.merges[{rank}]", m, "expected two token texts separated by a space")
                merges.setdefault((m[:pos], m[pos + 1:]), rank)
        bos: int | None
        if model == "llama":
            bos, eos, add_bos, add_space = 1, 2, True, True
            ignore_merges = False
        else:
            bos, eos = 11, 11
            add_bos = pre in _PRE_ADD_BOS
            add_space = False
            ignore_merges = pre in _PRE_IGNORE_MERGES
        # an id outside the vocabulary is ignored, as llama.cpp does (it keeps the default)
        bos_key = md.get_int("tokenizer.ggml.bos_token_id", lo=-2**31, hi=2**32 - 1)
        eos_key = md.get_int("tokenizer.ggml.eos_token_id", lo=-2**31, hi=2**32 - 1)
        if bos_key is not None and 0 <= bos_key < n:
            bos = bos_key
        if eos_key is not None and 0 <= eos_key < n:
            eos = eos_key
        add_bos = md.get_bool("tokenizer.ggml.add_bos_token", add_bos)
        add_eos = md.get_bool("tokenizer.ggml.add_eos_token", False)
        add_space = md.get_bool("tokenizer.ggml.add_space_prefix", add_space)
        if bos is not None and bos >= n:
            bos = None
        return cls(model=model, tokens=tokens, scores=scores, token_types=types, merges=merges, pre=pre,
                   bos_id=bos, eos_id=eos, add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space,
                   ignore_merges=ignore_merges)

    # --- public
    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` (what ``llama_tokenize(vocab, text, add_special, parse_special)`` returns)."""
        fragments = self._partition(text, parse_special) if text else []
        out: list[int] = []
        if self.model == "llama":
            if add_special and self.add_bos and self.bos_id is not None:
                out.append(self.bos_id)
            prev_special = True
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                t = (" " if self.add_space_prefix and prev_special else "") + frag
                self._spm(t.replace(" ", "\u2581"), out)
                prev_special = False
        else:
            if add_special and self.add_bos and self.bos_id is not None:
                out.append(self.bos_id)
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._bpe_text(frag, out)
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    # --- special-token partition (tokenizer_st_partition)
    def _partition(self, text: str, parse_special: bool) -> list:
        frags: list = [text]
        for tid, ttext, is_control in self._special:
            if is_control and not parse_special:
                continue
            if not ttext:
                continue
            new: list = []
            for f in frags:
                if not isinstance(f, str) or ttext not in f:
                    new.append(f)
                    continue
                parts = f.split(ttext)
                for k, p in enumerate(parts):
                    if k:
                        new.append(tid)
                    if p:
                        new.append(p)
            frags = new
        return frags

    # --- SPM (llm_tokenizer_spm_session)
    def _spm(self, text: str, out: list[int]) -> None:
        if not text:
            return
        chars = list(text)
        n = len(chars)
        sym_text = chars[:]            # current text of each symbol ('' once merged away)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list = []
        tok = self.token_to_id
        scores = self.scores

        def add(left, right):
            if left == -1 or right == -1:
                return
            t = sym_text[left] + sym_text[right]
            tid = tok.get(t)
            if tid is None or tid >= len(scores):
                return
            heapq.heappush(heap, (-scores[tid], left, right, t))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, t = heapq.heappop(heap)
            if not sym_text[left] or not sym_text[right] or sym_text[left] + sym_text[right] != t:
                continue
            sym_text[left] = t
            sym_text[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        i = 0
        while i != -1:
            s = sym_text[i]
            tid = tok.get(s)
            if tid is not None:
                out.append(tid)
            else:
                for b in s.encode("utf-8"):
                    bt = tok.get(f"<0x{b:02X}>")
                    if bt is None:
                        bt = tok.get(chr(b)) if b < 128 else None
                    if bt is None:
                        raise ImatrixError(f"the vocabulary has no byte token <0x{b:02X}> for {s!r}")
                    out.append(bt)
            i = nxt[i]

    # --- BPE (llm_tokenizer_bpe_session)
    def _pieces(self, text: str) -> list[str]:
        pieces = [text]
        for sp in self._splitters:
            new = []
            for p in pieces:
                new.extend(s for s, _ in sp.pre_tokenize_str(p) if s)
            pieces = new
        return pieces

    def _bpe_text(self, text: str, out: list[int]) -> None:
        cache = self._bpe_cache
        for piece in self._pieces(text):
            word = "".join(_BYTE_ENC[b] for b in piece.encode("utf-8"))
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe_word(word)
                if len(cache) < 200000:
                    cache[word] = ids
            out.extend(ids)

    def _bpe_word(self, word: str) -> list[int]:
        tok = self.token_to_id
        if self.ignore_merges and word in tok:
            return [tok[word]]
        syms = list(word)
        n = len(syms)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        ranks = self.merges
        heap: list = []

        def add(left, right):
            if left == -1 or right == -1:
                return
            r = ranks.get((syms[left], syms[right]))
            if r is None:
                return
            heapq.heappush(heap, (r, left, right, syms[left] + syms[right]))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, t = heapq.heappop(heap)
            if not syms[left] or not syms[right] or syms[left] + syms[right] != t:
                continue
            syms[left] = t
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        ids = []
        i = 0
        while i != -1:
            s = syms[i]
            tid = tok.get(s)
            if tid is not None:
                ids.append(tid)
            else:
                for b in s.encode("utf-8"):
                    bt = tok.get(chr(b)) if b < 128 else None
                    if bt is not None:
                        ids.append(bt)
            i = nxt[i]
        return ids

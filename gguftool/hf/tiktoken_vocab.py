"""A TikToken BPE vocabulary (Kimi-K2's ``tiktoken.model``) as the GGUF "gpt2" tokenizer llama.cpp's converter writes.

Kimi-K2 ships no tokenizer.json. Its tokenizer is ``tiktoken.model`` (one ``base64(token bytes) rank`` line per
token: the BPE ranks, no merges), a remote-code class ``TikTokenTokenizer`` in ``tokenization_kimi.py`` and the
special tokens in ``tokenizer_config.json``. llama.cpp's converter (``DeepseekV2Model.set_vocab``, pre-tokenizer
"kimi-k2") loads that class through transformers and then:

- names every rank's token by its bytes mapped through GPT-2's byte-to-unicode table, in the file's order;
- rebuilds the merges: for every token of two bytes or more, BPE is re-run on its bytes using only ranks below the
  token's own; if that ends in exactly two parts, "part1 part2" is a merge (rank order = file order);
- takes the class's special tokens: the 256 + 2 ids right after the ranks, named by tokenizer_config.json's
  ``added_tokens_decoder`` or ``<|reserved_token_{id}|>``, all CONTROL; ids up to config.json's vocab_size, the
  rest ``[PAD{id}]`` UNUSED;
- writes "gpt2", pre "kimi-k2", tokens, types, merges, then SpecialVocab (bos/eos from config.json, chat template).

This module does the same from the files, without transformers, tiktoken or remote code. The rebuild keeps the
pair ranks of the parts and updates only the two pairs beside a merge, so it costs O(length) dictionary lookups
per merge step instead of re-scanning every pair (scripts/bench_tiktoken_merges.py measures it against the
converter's loop on a Kimi-sized vocabulary).
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path

from ..errors import ConvertError
from .token_types import CONTROL, NORMAL, UNUSED

TIKTOKEN_FILE = "tiktoken.model"
KIMI_TOKENIZER_CLASS = "TikTokenTokenizer"
KIMI_TOKENIZER_MODULE = "tokenization_kimi"
N_RESERVED_SPECIAL = 256 + 2   # TikTokenTokenizer.num_reserved_special_tokens + 2 ids after the ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the token strings of byte-level BPE vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_BYTE_CHARS = bytes_to_unicode()
# bytes.translate can't map to str; latin-1 decoding + str.translate does it in C
_LATIN1_TO_GPT2 = str.maketrans({chr(b): c for b, c in _BYTE_CHARS.items()})


def token_string(token: bytes) -> str:
    """A token's bytes as its GPT-2 byte-level string (QwenModel.token_bytes_to_string)."""
    return token.decode("latin-1").translate(_LATIN1_TO_GPT2)


def read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken.model as tiktoken's ``load_tiktoken_bpe`` reads it (token bytes -> rank, in the file's order), checked:
    every non-empty line is ``base64 rank``, and the ranks are 0..N-1, each once (what TikTokenTokenizer needs to
    decode every id)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror or e})") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ConvertError(f"{path}: line {n} is not 'base64-token rank' (a damaged tiktoken.model?)")
        try:
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (binascii.Error, ValueError):
            raise ConvertError(f"{path}: line {n} is not 'base64-token rank' (a damaged tiktoken.model?)") from None
        if not token or rank < 0:
            raise ConvertError(f"{path}: line {n}: empty token or negative rank")
        if token in ranks:
            raise ConvertError(f"{path}: line {n}: token {token!r} appears twice")
        ranks[token] = rank
    if not ranks:
        raise ConvertError(f"{path}: no tokens (an empty tiktoken.model)")
    seen = sorted(ranks.values())
    if seen != list(range(len(seen))):
        dup = next((a for a, b in zip(seen, seen[1:]) if a == b), None)
        what = f"rank {dup} is given twice" if dup is not None else "some ranks are missing"
        raise ConvertError(f"{path}: the ranks must be 0 to {len(seen) - 1}, each once ({what})")
    return ranks


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE of ``token``'s bytes with the ranks below ``max_rank``: repeatedly merge the adjacent pair of lowest rank,
    the leftmost on a tie (QwenModel.bpe), keeping each pair's rank between steps."""
    parts = [token[i:i + 1] for i in range(len(token))]
    get = ranks.get
    pair = [get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
    while True:
        best, at = max_rank, -1
        for i, r in enumerate(pair):
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            return parts
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
        del pair[at]
        if at > 0:
            pair[at - 1] = get(parts[at - 1] + parts[at])
        if at < len(parts) - 1:
            pair[at] = get(parts[at] + parts[at + 1])


def rebuild_merges(ranks: dict[bytes, int], progress=None) -> list[str]:
    """The merges llama.cpp's converter derives from BPE ranks, as "left right" GPT-2 strings, in the ranks' order."""
    merges = []
    for token, rank in ranks.items():
        if progress is not None:
            progress.update(1)
        if len(token) == 1:
            continue
        parts = _bpe(ranks, token, rank)
        if len(parts) == 2:
            merges.append(f"{token_string(parts[0])} {token_string(parts[1])}")
    return merges


def special_tokens(tokenizer_config: dict, n_base: int) -> dict[str, int]:
    """TikTokenTokenizer.special_tokens: the ids n_base .. n_base + 257 named by added_tokens_decoder (a later id
    wins a name given twice, as the class's dict does), else ``<|reserved_token_{id}|>``."""
    names = {int(i): d["content"] for i, d in (tokenizer_config.get("added_tokens_decoder") or {}).items()}
    return {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(n_base, n_base + N_RESERVED_SPECIAL)}


def is_kimi_tokenizer(directory: Path, tokenizer_config: dict | None, config: dict) -> bool:
    """Whether the folder's tiktoken.model is Kimi's tokenizer, judged from the files (llama.cpp instead hashes the
    ids the real tokenizer gives a check text, which only the real 163,840-token vocabulary matches): the tokenizer
    class is Kimi's ``TikTokenTokenizer`` (tokenizer_config.json's tokenizer_class, or its auto_map naming
    tokenization_kimi.TikTokenTokenizer), or config.json's model_type is a Kimi one ("kimi_k2", "kimi_vl", ...)."""
    if not (directory / TIKTOKEN_FILE).is_file():
        return False
    tc = tokenizer_config or {}
    auto = (tc.get("auto_map") or {}).get("AutoTokenizer") if isinstance(tc.get("auto_map"), dict) else None
    entries = [auto] if isinstance(auto, str) else [e for e in auto or [] if isinstance(e, str)]
    if any(e.split(".")[-2:] == [KIMI_TOKENIZER_MODULE, KIMI_TOKENIZER_CLASS] for e in entries):
        return True
    if tc.get("tokenizer_class") == KIMI_TOKENIZER_CLASS:
        return True
    model_type = config.get("model_type")
    if not isinstance(model_type, str) and isinstance(config.get("text_config"), dict):
        model_type = config["text_config"].get("model_type")
    return isinstance(model_type, str) and model_type.startswith("kimi")


def kimi_vocab(directory: Path, vocab_size: int | None, tokenizer_config: dict, progress=None):
    """(tokens, token types, merges) as DeepseekV2Model.set_vocab writes them for pre-tokenizer "kimi-k2"."""
    path = directory / TIKTOKEN_FILE
    ranks = read_ranks(path)
    n = vocab_size if vocab_size is not None else len(ranks) + N_RESERVED_SPECIAL
    if len(ranks) > n:
        raise ConvertError(f"{path}: {len(ranks)} tokens do not fit config.json vocab_size {n}")
    if progress is not None:
        progress.reset(total=len(ranks))
    merges = rebuild_merges(ranks, progress)
    vocab = {token_string(t): r for t, r in ranks.items()}
    special = special_tokens(tokenizer_config, len(ranks))
    by_id = {i: t for t, i in {**vocab, **special}.items()}
    special_ids = set(special.values())
    tokens, types = [], []
    for i in range(n):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(t)
            types.append(CONTROL if i in special_ids else NORMAL)
    return tokens, types, merges

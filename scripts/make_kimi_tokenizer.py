#!/usr/bin/env python3
"""Write fixtures/kimi-k2/: a small but real TikToken BPE vocabulary shaped like Kimi-K2's.

Kimi-K2 (moonshotai/Kimi-K2-Instruct / -Base) ships no tokenizer.json: its tokenizer is ``tiktoken.model`` (one
``base64(token bytes) rank`` line per token), a remote-code class ``TikTokenTokenizer`` in ``tokenization_kimi.py``
and ``tokenizer_config.json`` (``added_tokens_decoder``: the special tokens right after the BPE ranks). This script
makes the same three files at a small scale:

- ``tiktoken.model``: byte-level BPE *trained* here on fixtures/calibration/essays.txt, pre-tokenized with Kimi's
  regex (the one tokenization_kimi.py gives tiktoken), N_MERGES merges on top of the 256 single bytes. The single
  bytes take ranks 0..255 in GPT-2's byte order (printable bytes first, as tiktoken's vocabularies do), each merge
  the next rank. Training is deterministic: the most frequent adjacent pair wins, ties broken by the smaller pair
  of byte strings; no randomness, no threads.
- ``tokenizer_config.json``: Kimi-K2's special tokens at Kimi's offsets from the first id after the ranks ([BOS],
  [EOS], <|im_end|>, ... [UNK], [PAD] at +254/+255), its bos/eos/unk/pad names, a chat template, the
  tokenizer class and auto_map of the real file.
- ``tokenization_kimi.py``: written for this fixture (not the real file), following the real class's logic: load
  the ranks with tiktoken's loader, name the 256 + 2 ids after the ranks from added_tokens_decoder (else
  ``<|reserved_token_{id}|>``), build a ``tiktoken.Encoding`` with Kimi's regex. It is only here so that
  llama.cpp's converter (which calls ``AutoTokenizer.from_pretrained(trust_remote_code=True)`` and reads
  ``tokenizer.model._mergeable_ranks`` and ``tokenizer.special_tokens``) can load the fixture; gguftool never
  runs it.
- ``configuration_deepseek.py``: the auto_map AutoConfig class Kimi's config.json names (transformers'
  DeepseekV3Config with model_type "kimi_k2"), which AutoTokenizer(trust_remote_code=True) loads first.

    python scripts/make_kimi_tokenizer.py [--out fixtures/kimi-k2]   (needs the `regex` package)
"""
from __future__ import annotations

import argparse
import base64
import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "fixtures" / "calibration" / "essays.txt"
N_MERGES = 768           # 256 bytes + 768 merges = 1024 ranks; with 256 specials the model's vocab_size is 1280

# Kimi-K2's pre-tokenizer regex (tokenization_kimi.py's pat_str; llama.cpp's "kimi-k2" pre-tokenizer): runs of Han,
# words split at case changes with English contractions, up to 3 digits, punctuation runs, newlines, spaces.
# ``&&`` is a class intersection (tiktoken's Rust regex; the Python `regex` module needs its V1 mode for it).
KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# Kimi-K2's special tokens: offset from the first id after the BPE ranks -> content (tokenizer_config.json)
KIMI_SPECIALS = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
                 6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
                 11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
                 14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>",
                 254: "[UNK]", 255: "[PAD]"}
N_RESERVED = 256   # the class's num_reserved_special_tokens; it names 256 + 2 ids after the ranks

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|im_system|>system<|im_middle|>"
    "{%- elif message['role'] == 'user' -%}<|im_user|>user<|im_middle|>"
    "{%- else -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
    "{{ message['content'] }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}")

TOKENIZATION_KIMI = '''\
"""A TikToken tokenizer class for gguftool's Kimi-K2-shaped test fixture (scripts/make_kimi_tokenizer.py).

Follows the logic of Kimi-K2's remote-code tokenization_kimi.py so that transformers' AutoTokenizer
(trust_remote_code=True), as llama.cpp's converter calls it, can load the fixture. Not used by gguftool.
"""
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from transformers import PreTrainedTokenizer

PATTERN = PATTERN_PLACEHOLDER


class TikTokenTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tiktoken.model"}
    model_input_names = ["input_ids", "attention_mask"]
    num_reserved_special_tokens = 256

    def __init__(self, vocab_file, bos_token="[BOS]", eos_token="[EOS]", unk_token=None, pad_token=None,
                 additional_special_tokens=None, added_tokens_decoder=None, **kwargs):
        names = {int(i): str(getattr(t, "content", t)) for i, t in (added_tokens_decoder or {}).items()}
        ranks = load_tiktoken_bpe(vocab_file)
        first = len(ranks)
        self.special_tokens = {names.get(i, f"<|reserved_token_{i}|>"): i
                               for i in range(first, first + self.num_reserved_special_tokens + 2)}
        self.model = tiktoken.Encoding(name=Path(vocab_file).name, pat_str=PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.vocab_file = vocab_file
        self.n_words = self.model.n_vocab
        table = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
        chars, extra = {b: chr(b) for b in table}, 0
        for b in range(256):
            if b not in chars:
                chars[b] = chr(256 + extra)
                extra += 1
        self.byte_encoder = chars
        self.byte_decoder = {c: b for b, c in chars.items()}
        self.decoder = {i: "".join(chars[b] for b in self.model.decode_single_token_bytes(i))
                        for i in range(self.n_words)}
        self.encoder = {s: i for i, s in self.decoder.items()}
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         additional_special_tokens=additional_special_tokens, **kwargs)

    def encode(self, text, allow_special_tokens=True, **kwargs):
        if kwargs:
            return super().encode(text, **kwargs)
        if allow_special_tokens:
            return self.model.encode(text, allowed_special="all")
        return self.model.encode(text, disallowed_special=())

    def decode(self, token_ids, **kwargs):
        if kwargs:
            return super().decode(token_ids, **kwargs)
        return self.model.decode([token_ids] if isinstance(token_ids, int) else list(token_ids))

    @property
    def vocab_size(self):
        return self.n_words

    def get_vocab(self):
        return dict(self.encoder)

    def _tokenize(self, text, **kwargs):
        return [self.decoder[t] for t in self.encode(text)]

    def _convert_token_to_id(self, token):
        return self.encoder.get(token, self.unk_token_id)

    def _convert_id_to_token(self, index):
        return self.decoder.get(index)

    def convert_tokens_to_string(self, tokens):
        return bytes(self.byte_decoder[c] for c in "".join(tokens)).decode("utf-8", "replace")

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return (self.vocab_file,)
'''

CONFIGURATION_DEEPSEEK = '''\
"""config.json's auto_map AutoConfig for gguftool's Kimi-K2-shaped test fixture (scripts/make_kimi_tokenizer.py).

Kimi-K2 ships its own configuration_deepseek.py (model_type "kimi_k2"); transformers' AutoTokenizer with
trust_remote_code loads it to find the tokenizer class. This stand-in is transformers' DeepseekV3Config under
Kimi's model type. Not used by gguftool; llama.cpp's converter reads config.json itself (no remote code).
"""
from transformers import DeepseekV3Config as _DeepseekV3Config


class DeepseekV3Config(_DeepseekV3Config):
    model_type = "kimi_k2"
'''


def gpt2_byte_order() -> list[int]:
    """The 256 byte values in GPT-2's bytes_to_unicode order: printable ones first, then the rest ascending."""
    first = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    return first + [b for b in range(256) if b not in first]


def train_ranks(text: str, n_merges: int) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 single bytes, then one token per merge in the order they were learned."""
    import regex

    words = Counter(regex.findall(KIMI_PATTERN, text, flags=regex.V1))
    seqs = [[bytes([b]) for b in w.encode("utf-8")] for w in words]
    counts = list(words.values())
    ranks = {bytes([b]): i for i, b in enumerate(gpt2_byte_order())}
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for seq, c in zip(seqs, counts):
            for a, b in zip(seq, seq[1:]):
                pairs[a, b] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        if merged in ranks:     # a second pair with the same bytes: merge it, but the token already exists
            pass
        else:
            ranks[merged] = len(ranks)
        for seq in seqs:
            i = 0
            while i < len(seq) - 1:
                if seq[i] == best[0] and seq[i + 1] == best[1]:
                    seq[i:i + 2] = [merged]
                i += 1
    return ranks


def write(out: Path, n_merges: int = N_MERGES) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    ranks = train_ranks(TEXT.read_text(encoding="utf-8"), n_merges)
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    (out / "tiktoken.model").write_text("".join(lines))
    first = len(ranks)
    decoder = {str(first + k): {"content": v, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": True} for k, v in KIMI_SPECIALS.items()}
    cfg = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "TikTokenTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "tokenization_kimi.py").write_text(TOKENIZATION_KIMI.replace("PATTERN_PLACEHOLDER", repr(KIMI_PATTERN)))
    (out / "configuration_deepseek.py").write_text(CONFIGURATION_DEEPSEEK)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "fixtures" / "kimi-k2")
    ap.add_argument("--merges", type=int, default=N_MERGES)
    args = ap.parse_args()
    print(f"wrote {write(args.out, args.merges)}")


if __name__ == "__main__":
    main()

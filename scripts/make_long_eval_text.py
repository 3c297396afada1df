#!/usr/bin/env python3
"""A long held-out evaluation text, made deterministically from a source every CPython has offline.

    python scripts/make_long_eval_text.py OUT.txt

The English prose of the Python language reference's topic texts (``pydoc_data.topics``, what ``help()`` shows):
the topics in sorted order, each topic's paragraphs that are not indented (grammar rules, code examples and
tables are indented or are underlines, and are dropped), one blank line between paragraphs. No tokenizer is
involved; the text depends only on the Python version's pydoc_data, so the script prints that version, the size
and the SHA-256 of what it wrote: the same version gives the same bytes (Python 3.11.7: 227477 bytes, sha256
f1c96fa66a61d5e1..., 51754 SmolLM2 tokens = 101 chunks of 512). Never committed (too large); a perplexity run on
it is reproduced by remaking it with the same Python.

Used by docs/ppl_agreement.md (the long-text rows: 80 chunks of 512, against the 21 of
fixtures/calibration/essays.txt).
"""
from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path


def prose(topic: str) -> list[str]:
    """The topic text's prose paragraphs, each joined to one line: unindented paragraphs, and list items ("* " or
    "1. " with their continuation lines indented to the item's text); headings (a line over an underline of
    * = - ^ ~), tables (+---, |, ===) and every indented block (grammar, code, quoted examples) dropped."""
    out = []
    for para in re.split(r"\n\s*\n", topic):
        lines = [ln.rstrip() for ln in para.split("\n") if ln.strip()]
        if len(lines) >= 2 and re.fullmatch(r"[*=\-^~]{3,}", lines[1]):
            lines = lines[2:]                               # a heading and its underline
        if not lines:
            continue
        item = re.match(r"(\* |\d+\. )", lines[0])
        indent = " " * len(item.group(1)) if item else ""
        if lines[0][:1].isspace() or lines[0].startswith(("+-", "|", "=")) or any(not ln.startswith(indent) or ln[len(indent):][:1].isspace()
                                         for ln in lines[1:]):
            continue                                        # an indented block
        text = " ".join(ln.strip() for ln in lines)
        if len(text) >= 40:                                 # not a one-line label
            out.append(text)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    from pydoc_data.topics import topics

    paras = [p for key in sorted(topics) for p in prose(topics[key])]
    data = ("\n\n".join(paras) + "\n").encode("utf-8")
    Path(argv[0]).write_bytes(data)
    print(f"python {sys.version.split()[0]}: {len(topics)} topics, {len(paras)} paragraphs, {len(data)} bytes, "
          f"sha256 {hashlib.sha256(data).hexdigest()} -> {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

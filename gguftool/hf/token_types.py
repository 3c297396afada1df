"""GGUF token types (gguf-py TokenType / SentencePieceTokenTypes), shared by the tokenizer readers."""

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

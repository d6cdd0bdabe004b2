"""Incremental detokenization: each new token costs the decode of a short window, not of the whole output.

Decoding the whole output after every token costs O(n) per token, O(n²) per request. Decoding ids
one at a time is wrong instead: SentencePiece pieces carry their leading space, and byte-level BPE
splits one character over several tokens. The usual fix (TGI, vLLM): decode a window that ends at
the newest token and the same window without it, both from ``prefix`` (a point early enough to give
the tokenizer its context), and emit the difference. A window that ends inside a multi-byte
character decodes to U+FFFD; its text waits for the next token, or for :meth:`flush` at the end.
The pieces concatenate to ``tokenizer.decode(ids, skip_special_tokens=True)`` for the tokenizers
we serve (checked against the whole decode in tests/unit/serve/test_detokenize.py).
"""
from __future__ import annotations


class IncrementalDecoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix = 0   # where both windows start
        self.read = 0     # ids before this were emitted already

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def step(self, ids: list[int]) -> str:
        """The text that the newest ids add (possibly empty while a character is incomplete)."""
        before = self._decode(ids[self.prefix: self.read])
        now = self._decode(ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(ids)
            return now[len(before):]
        return ""

    def flush(self, ids: list[int]) -> str:
        """Whatever is still held back (an incomplete character at the end), as the full decode shows it."""
        before = self._decode(ids[self.prefix: self.read])
        now = self._decode(ids[self.prefix:])
        self.prefix = self.read = len(ids)
        return now[len(before):]

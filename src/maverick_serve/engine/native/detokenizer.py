"""Incremental detokenization in O(new tokens) per step.

Byte-level BPE tokens can split a UTF-8 character, and decoding a token alone can differ from
decoding it in context, so each step decodes a short window: the tokens since the last
emitted boundary (`prefix_offset`) with and without the new ones, and appends the difference
once it no longer ends in an incomplete character.
"""

from __future__ import annotations

from tokenizers import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token: int) -> str:
        """Add one token; returns the text it completed (possibly empty) and extends `self.text`."""
        self.ids.append(token)
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of generation: emit whatever is held back, replacement characters included."""
        full = self._decode(self.ids[self._prefix_offset :])
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        delta = full[len(prefix) :] if full.startswith(prefix) else ""
        self._prefix_offset = self._read_offset = len(self.ids)
        self.text += delta
        return delta

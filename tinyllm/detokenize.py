"""Streaming detokenization: printing text one token at a time, correctly.

Decoding each token on its own and joining the pieces goes wrong in three ways:
- spaces vanish: SentencePiece decoders drop the `▁` (space) at the start of a text, so
  decoding "▁a", "▁baker", "▁had" one by one gives "abakerhad" instead of "a baker had";
- characters break: a byte-level token may hold half of a UTF-8 character (an emoji is
  often split over two or three tokens); decoded alone it becomes U+FFFD "�";
- byte-fallback tokens (`<0xE4>` `<0xB8>` `<0xAD>` -> "中") only mean something together.

So the detokenizer never decodes a token alone. It decodes a short window of recent
tokens twice, without and with the new ones, and emits the difference:

    prefix = decode(ids[prefix_at:read_at])      # text already emitted (its start is clean)
    full   = decode(ids[prefix_at:])             # the same window plus the new tokens
    piece  = full[len(prefix):]

The window starts where earlier text was complete, so a decoder that strips a leading
space strips it from both decodes and the difference keeps the new token's space. A
piece that ends in U+FFFD (an unfinished character) is held back until the character
is complete; a run of byte-fallback tokens is held until it ends, because the decoder
turns a run into text (or into U+FFFDs) as a whole. `flush()` returns whatever is held
at the end. The pieces always concatenate to `tokenizer.decode(all ids)`.
"""
from __future__ import annotations

import re

REPLACEMENT = "\ufffd"
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class StreamingDetokenizer:
    """Feed token ids one at a time with `add(id)`; each call returns the new text ("" while held)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        # `tokenizer` is tinyllm's Tokenizer (or anything with decode(ids, skip_special_tokens) and .tk)
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_at = 0  # window start: decoding from here gives clean text
        self.read_at = 0    # tokens before this index have been emitted
        self.byte_fallback = _has_byte_fallback(tokenizer)
        self._is_byte = {}

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _is_byte_token(self, token_id: int) -> bool:
        if token_id not in self._is_byte:
            piece = self.tokenizer.tk.id_to_token(token_id)
            self._is_byte[token_id] = bool(piece and BYTE_TOKEN.match(piece))
        return self._is_byte[token_id]

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self.byte_fallback and self._is_byte_token(token_id):
            return ""  # inside a run of byte tokens: wait for the run to end
        prefix = self._decode(self.ids[self.prefix_at:self.read_at])
        full = self._decode(self.ids[self.prefix_at:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""  # nothing new yet, or a character is still incomplete
        self.prefix_at, self.read_at = self.read_at, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """The text still held back (an unfinished character or byte run) at the end of a stream."""
        prefix = self._decode(self.ids[self.prefix_at:self.read_at])
        full = self._decode(self.ids[self.prefix_at:])
        self.prefix_at = self.read_at = len(self.ids)
        return full[len(prefix):]

    @property
    def text(self) -> str:
        """The whole text so far (emitted or not)."""
        return self._decode(self.ids)


def _has_byte_fallback(tokenizer) -> bool:
    """True when the tokenizer's decoder joins `<0xNN>` tokens (SentencePiece byte fallback)."""
    tk = getattr(tokenizer, "tk", None)
    return tk is not None and "ByteFallback" in repr(tk.decoder)

"""Showing log-probabilities: a token's own text and bytes, and the views built on them.

The sampler gives a `TokenLogprob` per token (ids and numbers; sampler.py says which
distribution they come from). To show one, each id needs a text of its own, which the
streaming detokenizer never makes (detokenize.py decodes windows, not single tokens):

- `token_bytes`: the bytes a token stands for, read from its vocabulary entry: a
  byte-level BPE entry spells each byte with one printable character (`Ġ` is a space);
  a SentencePiece entry writes a space as `▁`, and a byte-fallback entry `<0xNN>` is one
  byte. A token may hold part of a UTF-8 character (an emoji split over three tokens), so
  its text is those bytes decoded with U+FFFD for an unfinished character, and its bytes
  are given as well, as OpenAI's `bytes` field does: a client joins them to rebuild text.
- `as_dict` is the CLI's `--json` entry; `table_row` its terminal view.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache

from .sampler import TokenLogprob

BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte -> printable character map, inverted (the `bytes_to_unicode` table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """id -> (text, bytes) of one token on its own, for a tokenizer (cached per id)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = repr(getattr(tokenizer.tk, "decoder", ""))
        self.byte_level = "ByteLevel" in decoder
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        if token_id not in self._cache:
            data = self.token_bytes(token_id)
            self._cache[token_id] = (data.decode("utf-8", errors="replace"), data)
        return self._cache[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.tk.id_to_token(int(token_id))
        if piece is None:
            return b""
        if m := BYTE_TOKEN.match(piece):
            return bytes([int(m.group(1), 16)])
        if self.byte_level:
            table = _byte_level_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return piece.encode("utf-8")  # an added token written as plain text
        return piece.replace("\u2581", " ").encode("utf-8")


def as_dict(entry: TokenLogprob, text: TokenText) -> dict:
    """One token's entry for the CLI's --json: its id, text, log-probability, alternatives."""
    return {"id": entry.id, "token": text(entry.id)[0], "logprob": entry.logprob,
            "top": [{"id": i, "token": text(i)[0], "logprob": lp} for i, lp in entry.top]}


def table_row(entry: TokenLogprob, text: TokenText) -> str:
    """One line of the terminal view: the chosen token, its probability, the alternatives."""
    def shown(token_id: int) -> str:
        return repr(text(token_id)[0])

    others = "  ".join(f"{shown(i)} {math.exp(lp):6.1%}" for i, lp in entry.top)
    return f"{shown(entry.id):>16} {math.exp(entry.logprob):6.1%}  | {others}"

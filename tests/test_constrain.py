"""The constraint as a sampler step (hand-made masks), and llguidance's mask on a small
BPE vocabulary: every allowed token keeps the text a prefix of valid JSON."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tinyllm.sampler import Sampler, SamplingParams


class Only:
    """A grammar whose constraint allows a fixed set of tokens, and records what it is fed."""

    def __init__(self, allowed):
        self.allowed, self.fed = set(allowed), []

    def start(self):
        return self

    def mask(self, logits):
        return np.where(np.isin(np.arange(len(logits)), list(self.allowed)), logits, -np.inf).astype(np.float32)

    def advance(self, token):
        self.fed.append(token)


def test_the_mask_comes_before_the_bias_and_every_token_is_fed_back():
    logits = np.array([5.0, 1.0, 0.5, 0.0], dtype=np.float32)
    grammar = Only({1, 2})
    params = SamplingParams(grammar=grammar, logit_bias={0: 100, 2: 1.0})
    assert params.needs_host  # a GPU hands such rows to the host sampler
    sampler = Sampler(params)
    assert sampler(logits) == 2  # token 0's bias cannot bring back a forbidden token
    for seed in range(20):
        assert Sampler(SamplingParams(grammar=grammar, temperature=5.0, seed=seed))(logits) in (1, 2)
    assert grammar.fed[0] == 2 and len(grammar.fed) == 21  # each chosen token, once


def test_a_grammar_must_be_one():
    with pytest.raises(ValueError, match="grammar"):
        SamplingParams(grammar="json")


def test_llguidance_mask_allows_only_json_prefixes():
    pytest.importorskip("llguidance")
    from helpers_generate import SentencePieceStyle

    from tinyllm.constrain import ConstraintError, Grammars
    from tinyllm.tokenizer import Tokenizer

    tk = SentencePieceStyle.llama2()
    tokenizer = Tokenizer(tk, 1, (2,), True, None, "test")
    grammars = Grammars(tokenizer, tk.get_vocab_size())
    constraint = grammars.json_schema({"type": "object", "properties": {"a": {"enum": [1, 22]}},
                                       "required": ["a"], "additionalProperties": False}).start()
    text = b""
    for _ in range(12):
        allowed = np.flatnonzero(constraint.allowed())
        if list(allowed) == [2]:
            break  # complete: only the end of sequence remains
        for t in allowed:  # each candidate keeps the text a prefix of '{"a":1}' or '{"a":22}'
            candidate = text + _bytes(tk, t)
            assert b'{"a":1}'.startswith(candidate) or b'{"a":22}'.startswith(candidate), candidate
        choice = max(allowed, key=lambda t: len(_bytes(tk, t)))
        text += _bytes(tk, choice)
        constraint.advance(int(choice))
    assert json.loads(text) in ({"a": 1}, {"a": 22})
    with pytest.raises(ConstraintError, match="invalid JSON schema"):
        grammars.json_schema({"type": "nonsense"})


def _bytes(tk, token) -> bytes:
    """A token's bytes: a `<0xNN>` byte-fallback piece is that byte, `▁` a space."""
    piece = tk.id_to_token(int(token))
    if piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:-1], 16)])
    return piece.replace("\u2581", " ").encode()

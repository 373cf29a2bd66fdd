"""Constrained decoding: only tokens that keep the text a valid prefix of a grammar.

A request for JSON (the OpenAI API's `response_format`) is honoured by masking the logits
before every draw: a token that would make the text so far impossible to complete as
JSON of the asked shape gets -inf, so it can never be chosen, whatever the temperature.
The grammar work is done by llguidance (a Rust core with Python bindings): given the
tokenizer's vocabulary and a JSON schema, its matcher says, per step, which tokens may
come next, as a bitmask of one bit per token, filled into a NumPy array.

    Grammars(tokenizer, vocab_size)      once per model: the vocabulary as llguidance reads it
      .json_schema(schema) -> Grammar   a checked, immutable grammar (SamplingParams carries it)
    Grammar.start() -> Constraint       per sequence: the matcher's state, owned by its Sampler
      .mask(logits)                     disallowed tokens -> -inf (a sampler step)
      .advance(token)                   the chosen token moves the matcher on

When the grammar is complete (the JSON value closed), the end-of-sequence ids are the
only tokens allowed, so a constrained answer ends with them. A token budget that runs out
first leaves the JSON unfinished.

JSON is written compactly (no optional whitespace between tokens of the grammar): a
small model left free to add whitespace can spend its whole budget on newlines. A
schema's own `"x-guidance": {"whitespace_flexible": true}` turns that off.

llguidance is an optional dependency (`pip install 'tinyllm[json]'`), imported only when
a grammar is first asked for.
"""
from __future__ import annotations

import json

import numpy as np

from .errors import TinyLLMError

NEG_INF = np.float32(-np.inf)
# llguidance's JSON compiler options, under a schema's own "x-guidance" (which wins)
JSON_DEFAULTS = {"whitespace_flexible": False}


class ConstraintError(TinyLLMError, ValueError):
    """A schema llguidance cannot compile, a missing llguidance, or a matcher that refused a
    token (`param` names what the user wrote: 'response_format')."""

    param = "response_format"


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy
    except ImportError:
        raise ConstraintError("constrained decoding needs llguidance: pip install 'tinyllm[json]'") from None
    return llguidance


class Grammars:
    """Compiles JSON schemas for one model's vocabulary. Building llguidance's view of the
    vocabulary reads every token once, so it is done once per model, on first use."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer        # tinyllm's Tokenizer: its `tk` is a `tokenizers.Tokenizer`
        self.vocab_size = vocab_size      # V of the logits (the embedding may be padded past the tokenizer)
        self._lltokenizer = None

    @property
    def lltokenizer(self):
        if self._lltokenizer is None:
            llg = _llguidance()
            eos = list(self.tokenizer.eos_ids)
            if not eos:
                raise ConstraintError("this model's tokenizer has no end-of-sequence token to end a constrained answer")
            tk = self.tokenizer.tk
            self._lltokenizer = llg.LLTokenizer(tk.to_str(), n_vocab=max(self.vocab_size, tk.get_vocab_size()),
                                                eos_token=eos)
        return self._lltokenizer

    def json_schema(self, schema: dict) -> "Grammar":
        """A grammar for JSON values valid under `schema` (a JSON Schema object); a schema
        llguidance cannot compile raises ConstraintError with its reason."""
        llg = _llguidance()
        if not isinstance(schema, dict):
            raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_DEFAULTS)
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"invalid JSON schema: {e}") from None
        error = llg.LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error:
            raise ConstraintError(f"invalid JSON schema: {error}")
        return Grammar(self.lltokenizer, grammar, self.vocab_size)

    def json_object(self) -> "Grammar":
        """Any JSON object (OpenAI's `json_object`)."""
        return self.json_schema({"type": "object"})

    def compiled(self, grammar: str) -> "Grammar":
        """A grammar's text (`Grammar.grammar`, checked where it was compiled) for this
        vocabulary: how a grammar reaches the engine in a process of its own."""
        return Grammar(self.lltokenizer, grammar, self.vocab_size)


class Grammar:
    """A compiled grammar for one vocabulary: immutable, shared by the choices of a request;
    each sequence's sampler starts its own Constraint from it."""

    def __init__(self, lltokenizer, grammar: str, vocab_size: int):
        self.lltokenizer = lltokenizer
        self.grammar = grammar            # llguidance's grammar text (JSON)
        self.vocab_size = vocab_size

    def start(self) -> "Constraint":
        llg = _llguidance()
        matcher = llg.LLMatcher(self.lltokenizer, self.grammar, log_level=0)
        return Constraint(matcher, self.lltokenizer.vocab_size, self.vocab_size)


class Constraint:
    """One sequence's position in the grammar: which tokens may come next, and the chosen one fed back."""

    def __init__(self, matcher, n_tokens: int, vocab_size: int):
        llg = _llguidance()
        self.matcher = matcher
        self.vocab_size = vocab_size  # V: the logits' length (n_tokens, llguidance's count, is >= V)
        self._fill = llg.numpy.fill_next_token_bitmask
        self.bitmask = llg.numpy.allocate_token_bitmask(1, n_tokens)  # int32 [1, ceil(n_tokens / 32)]

    def allowed(self) -> np.ndarray:
        """bool [V]: the tokens that keep the text a valid prefix (only EOS once it is complete)."""
        self._check()
        self._fill(self.matcher, self.bitmask)
        # bit j of int32 word i is token 32 i + j; the words are little-endian in memory
        bits = np.unpackbits(self.bitmask[0].view(np.uint8), bitorder="little")  # [32 * words]
        return bits[:self.vocab_size].astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """logits [V] with every disallowed token at -inf."""
        masked = np.where(self.allowed(), logits, NEG_INF).astype(np.float32)
        if masked.max() == NEG_INF:  # else the argmax of all -inf would pick token 0
            raise ConstraintError("no token the grammar allows has a finite logit")
        return masked

    def advance(self, token: int) -> None:
        """Feed the chosen token to the matcher (a token outside the mask puts it in error)."""
        self.matcher.consume_token(int(token))
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ConstraintError(f"the grammar refused the text: {self.matcher.get_error()}")


"""Chat templates: turning a conversation into the exact text the model was trained on.

An instruction-tuned model expects its conversation wrapped in markers of its own, e.g.
SmolLM2 (ChatML):

    <|im_start|>system
    You are a helpful assistant.<|im_end|>
    <|im_start|>user
    What is 2+2?<|im_end|>
    <|im_start|>assistant

The checkpoint ships this layout as a Jinja2 template (`tokenizer.chat_template` in GGUF
metadata, `chat_template` in `tokenizer_config.json`). tinyllm renders it the way
`transformers` does: in Jinja2's sandbox (a template is code from a download and must
not reach Python internals), with `trim_blocks`/`lstrip_blocks`, the variables
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and the helpers
`raise_exception` and `strftime_now`. `add_generation_prompt=True` appends the header of
the assistant's turn, so the model's next tokens are its answer.

The rendered text already holds any BOS the template wants, so it is tokenized without
adding special tokens (as `transformers`' `apply_chat_template` does).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime

from .errors import TinyLLMError


class ChatTemplateError(TinyLLMError, ValueError):
    """No chat template, a template that fails to render, or malformed messages."""


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates want plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A compiled chat template with the tokenizer's special-token strings."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 origin: str = "chat template"):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.origin = origin
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"{origin}: the chat template does not compile ({_one_line(e)})") from None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatTemplate":
        """The checkpoint's template, or a clear error when it has none."""
        if not tokenizer.chat_template:
            raise ChatTemplateError(
                f"{tokenizer.source}: this checkpoint has no chat template (tokenizer.chat_template in GGUF, "
                "chat_template in tokenizer_config.json); use --raw for plain text completion")
        return _compiled(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, tokenizer.source)

    def render(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        """The conversation as the model's prompt text."""
        from jinja2 import TemplateError

        messages = check_messages(messages)
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except TemplateError as e:
            raise ChatTemplateError(f"{self.origin}: chat template error: {_one_line(e)}") from None


@functools.lru_cache(maxsize=8)
def _compiled(source, bos_token, eos_token, origin) -> ChatTemplate:
    """Templates are compiled once per checkpoint, not once per turn."""
    return ChatTemplate(source, bos_token, eos_token, origin)


def check_messages(messages) -> list[dict]:
    """A list of {'role': str, 'content': str} dicts; anything else is named in the error."""
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages: expected a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ChatTemplateError(f"messages[{i}]: expected a dict with a 'role' string and 'content', got {m!r:.80}")
    return [dict(m) for m in messages]


def build_messages(user: str, system: str | None = None) -> list[dict]:
    """[system?, user] — the conversation of a one-shot chat prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}]


def chat_prompt_ids(tokenizer, messages, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation (no extra BOS: the template writes its own)."""
    text = ChatTemplate.from_tokenizer(tokenizer).render(messages, add_generation_prompt)
    return tokenizer.encode(text, add_bos=False)


def _one_line(error) -> str:
    return " ".join(str(error).split())


class ChatSession:
    """A multi-turn conversation that keeps its KV cache between turns.

    Each turn re-renders the whole conversation with the template, and the Context
    prefills only the tokens after the part already in the cache (the new user turn,
    and the end of the assistant's previous answer).

        session = ChatSession(llm, system="Be brief.")
        for tok in session.send("Hello!"):
            print(tok.text, end="")
    """

    def __init__(self, llm, system: str | None = None, max_context: int | None = None,
                 sampler=None, rules=None):
        from .generate import Context

        self.llm = llm
        self.template = ChatTemplate.from_tokenizer(llm.tokenizer)  # fail early when there is none
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.context = Context(llm.model, max_context)
        self.sampler = sampler
        self.rules = rules

    def send(self, text: str):
        """Add a user turn; returns the Generation of the answer (iterate it to run it)."""
        from .generate import Generation

        self.messages.append({"role": "user", "content": text})
        prompt = self.template.render(self.messages, add_generation_prompt=True)
        ids = self.llm.tokenizer.encode(prompt, add_bos=False)
        return Generation(self.llm.model, self.llm.tokenizer, ids, sampler=self.sampler, rules=self.rules,
                          context=self.context, on_finish=self._answered)

    def _answered(self, generation) -> None:
        if generation.stats.finish_reason is None and not generation.token_ids:
            self.messages.pop()  # the turn failed before any answer (e.g. it did not fit): forget it
        else:  # a full answer, or the part produced before an interruption
            self.messages.append({"role": "assistant", "content": generation.text})

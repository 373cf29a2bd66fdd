"""The OpenAI API's shapes: from a request body to a validated `Job`, and from the
scheduler's events to the answer's JSON.

- Errors have OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, and a bad
  request names every bad field at once ("temperature: must be >= 0; stop: ..."), `param`
  being the first, as OpenAI's API does.
- Every field is checked by hand, with tinyllm's own checks where they exist
  (`SamplingParams`, `StopRules`), so that the messages name the request's fields.
- Sizes are checked before the work they would cost: a prompt longer than the context
  could hold is refused before it is tokenized (no token is longer than the vocabulary's
  longest entry, so more characters than `context x longest entry` cannot fit).
- `Validator.job` tokenizes and renders the chat template: CPU work that the app runs in
  a worker thread, never on the event loop.

Sampling defaults are the CLI's: temperature 0 (greedy) unless the request sets one.
`return_token_ids: true` (an extension, as in vLLM) adds the generated token ids to a choice.
"""
from __future__ import annotations

import json
import time

from ..errors import TinyLLMError
from ..generate import StopRules
from ..sampler import SamplingError, SamplingParams

# The sampling parameters of the CLI, accepted in a request body under the same names.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "seed")
# OpenAI fields tinyllm does not implement: refused when set, rather than silently ignored.
UNSUPPORTED_FIELDS = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "tool_choice")
# tinyllm's reasons (generate.py) -> OpenAI's finish_reason
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "cancelled"}
MAX_STOPS, MAX_STOP_CHARS = 16, 1024  # stop strings are matched against the text after every token


# ---- errors, OpenAI style -------------------------------------------------------------------

class APIError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class FieldErrors:
    """Collects every bad field of a request, so one 400 names them all (param: the first)."""

    def __init__(self):
        self.errors: list[tuple[str, str]] = []

    def add(self, param: str, message: str) -> None:
        self.errors.append((param, message))

    def raise_if_any(self) -> None:
        if self.errors:
            message = "; ".join(f"{param}: {message}" for param, message in self.errors)
            code = "model_not_found" if self.errors[0][0] == "model" else None
            raise APIError(400, message, self.errors[0][0], code=code)


def _short(value) -> str:
    """A value quoted in an error message: its repr, cut short (a body may be megabytes)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---- from a request body to a scheduler job ---------------------------------------------------

class Job:
    """A validated request: what to feed the scheduler and how to answer."""

    def __init__(self, kind: str, prompt_ids: list[int], sampling: SamplingParams, rules: StopRules,
                 stream: bool, include_usage: bool, return_token_ids: bool):
        self.kind = kind  # "completion" or "chat"
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.rules = rules
        self.stream = stream
        self.include_usage = include_usage
        self.return_token_ids = return_token_ids


class Validator:
    """Checks a request body against the served model: field by field, all errors collected."""

    def __init__(self, llm, model_id: str, max_context: int, default_max_tokens: int):
        self.llm = llm
        self.model_id = model_id
        self.max_context = max_context
        self.default_max_tokens = default_max_tokens
        # A normalizer that composed characters could beat this bound; Llama tokenizers do not.
        longest = max(map(len, llm.tokenizer.tk.get_vocab(with_added_tokens=True)), default=1)
        self.max_prompt_chars = max_context * longest

    def job(self, body: dict, kind: str) -> Job:
        errors = FieldErrors()
        model = body.get("model")
        if model is not None and model != self.model_id:
            errors.add("model", f"unknown model {_short(model)}; this server serves {self.model_id!r}")
        n = body.get("n")
        if n is not None and n != 1:
            errors.add("n", f"only n=1 is supported, got {_short(n)}")
        best_of = body.get("best_of")
        if best_of is not None and best_of != 1:
            errors.add("best_of", f"only best_of=1 is supported, got {_short(best_of)}")
        for name in UNSUPPORTED_FIELDS:
            if body.get(name) not in (None, False):
                errors.add(name, "not supported by this server")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            errors.add("stream", f"expected true or false, got {_short(stream)}")
        include_usage = False
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
                errors.add("stream_options", f"expected {{\"include_usage\": true|false}}, got {_short(options)}")
            else:
                include_usage = options.get("include_usage", False)
        return_ids = body.get("return_token_ids", False)
        if not isinstance(return_ids, bool):
            errors.add("return_token_ids", f"expected true or false, got {_short(return_ids)}")
        sampling = self._sampling(body, errors)
        stop = self._stop(body.get("stop"), errors)
        max_name = "max_tokens"
        max_tokens = body.get("max_tokens")
        if kind == "chat" and body.get("max_completion_tokens") is not None:
            max_name, max_tokens = "max_completion_tokens", body["max_completion_tokens"]
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
            errors.add(max_name, f"must be an integer >= 1, got {_short(max_tokens)}")
            max_tokens = None
        prompt_name, prompt_ids = ("messages", self._messages(body, errors)) if kind == "chat" else \
                                  ("prompt", self._prompt(body, errors))
        if prompt_ids is not None:
            room = self.max_context - len(prompt_ids)
            if room < 1:
                errors.add(prompt_name, f"the prompt has {len(prompt_ids)} tokens but the context holds "
                           f"{self.max_context} (and at least one must be generated)")
            elif max_tokens is not None and max_tokens > room:
                errors.add(max_name, f"{max_tokens} new tokens do not fit: the prompt has {len(prompt_ids)} "
                           f"tokens and the context holds {self.max_context}")
            elif max_tokens is None:
                max_tokens = min(self.default_max_tokens, room)
        errors.raise_if_any()
        rules = StopRules(max_tokens, stop)
        return Job(kind, prompt_ids, sampling, rules, stream, include_usage, return_ids)

    def _sampling(self, body: dict, errors: FieldErrors) -> SamplingParams | None:
        """Each field checked by SamplingParams itself (one at a time, so all errors show)."""
        given = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
        ok = {}
        for name, value in given.items():
            try:
                SamplingParams(**{name: value})
                ok[name] = value
            except SamplingError as e:
                errors.add(e.param, e.detail)
            except (TypeError, ValueError, OverflowError):  # a type SamplingParams did not expect
                errors.add(name, f"not a valid value: {_short(value)}")
        return SamplingParams(**ok)

    def _stop(self, stop, errors: FieldErrors) -> tuple[str, ...]:
        if stop is None:
            return ()
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            errors.add("stop", f"expected a non-empty string or a list of them, got {_short(stop)}")
            return ()
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            errors.add("stop", f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters each")
            return ()
        return tuple(stops)

    def _too_long(self, chars: int) -> str | None:
        if chars > self.max_prompt_chars:
            return (f"{chars} characters cannot fit in a context of {self.max_context} tokens "
                    f"(at most {self.max_prompt_chars} characters)")
        return None

    def _prompt(self, body: dict, errors: FieldErrors) -> list[int] | None:
        """A string, a list of token ids, or a batch of one of either."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        vocab = self.llm.config.vocab_size
        if isinstance(prompt, str):
            if too_long := self._too_long(len(prompt)):
                errors.add("prompt", too_long)
                return None
            return self.llm.prompt_ids(prompt)
        if isinstance(prompt, list) and len(prompt) > self.max_context:
            errors.add("prompt", f"{len(prompt)} token ids do not fit in a context of {self.max_context} tokens")
            return None
        if isinstance(prompt, list) and prompt and all(_is_int(t) and 0 <= t < vocab for t in prompt):
            return list(prompt)
        errors.add("prompt", "expected a string or a non-empty list of token ids in [0, "
                   f"{vocab}) (one prompt: n=1, no batches), got {_short(prompt)}")
        return None

    def _messages(self, body: dict, errors: FieldErrors) -> list[int] | None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            errors.add("messages", f"expected a non-empty list of {{'role', 'content'}} objects, got {_short(messages)}")
            return None
        if len(messages) > self.max_context:  # every message the template renders costs tokens
            errors.add("messages", f"{len(messages)} messages cannot fit in a context of {self.max_context} tokens")
            return None
        plain = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                errors.add("messages", f"messages[{i}]: expected an object with a 'role' string")
                return None
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    errors.add("messages", f"messages[{i}].content: only text parts are supported")
                    return None
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                errors.add("messages", f"messages[{i}].content: expected a string, got {_short(content)}")
                return None
            plain.append({"role": m["role"], "content": content})
        if too_long := self._too_long(sum(len(m["role"]) + len(m["content"]) for m in plain)):
            errors.add("messages", too_long)
            return None
        try:
            return self.llm.prompt_ids(plain, chat=True)
        except TinyLLMError as e:
            errors.add("messages", str(e))
            return None


# ---- answers ------------------------------------------------------------------------------------

def usage(event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def completion(job: Job, rid: str, model_id: str, text: str, event) -> dict:
    """A whole (non-streamed) answer: `text_completion` or `chat.completion`."""
    choice = {"index": 0, "logprobs": None, "finish_reason": FINISH_REASONS[event.reason]}
    if job.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    if job.return_token_ids:
        choice["token_ids"] = event.token_ids
    return {"id": rid, "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_id, "choices": [choice], "usage": usage(event)}


class Chunks:
    """The pieces of a streamed answer (`text_completion` or `chat.completion.chunk` objects)."""

    def __init__(self, job: Job, rid: str, model_id: str):
        self.chat = job.kind == "chat"
        self.head = {"id": rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": int(time.time()), "model": model_id}

    def text(self, text: str | None, finish: str | None = None, first: bool = False, token_ids=None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return {**self.head, "choices": [choice]}

    def finish(self, event, return_token_ids: bool) -> dict:
        return self.text(None, FINISH_REASONS[event.reason], token_ids=event.token_ids if return_token_ids else None)

    def usage(self, event) -> dict:
        return {**self.head, "choices": [], "usage": usage(event)}


def sse_line(obj) -> str:
    """One Server-Sent Event: `data: {json}` and a blank line."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"

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
`ignore_eos: true` (vLLM's too) generates past the end-of-sequence token, up to `max_tokens` or a
stop string: what a load test wants, every answer its full length.

What each field does (anything else is refused with a 400 naming it, never ignored):
- `n`: n independent choices per prompt; with a `seed`, choice i samples with seed + i, so
  each choice is the answer a request with that seed alone would get. Each choice is its
  own sequence in the batch; with the prefix cache (tinyllm/prefix.py) the first computes
  the prompt and the others copy its whole blocks.
- `prompt` (completions) may be a list of prompts: choices come prompt by prompt, n each
  (choice index = prompt index x n + i), as OpenAI numbers them.
- `logprobs` (completions: an integer N; chat: true, with `top_logprobs` N) gives each
  generated token's log-probability and the N most likely alternatives, from the
  distribution the token was drawn from (sampler.py: greedy, the log-softmax of the
  logits after logit_bias and penalties; sampled, of the filtered logits). `echo: true`
  (completions) puts the prompt before the answer and, with `logprobs`, the prompt
  tokens' log-probabilities under the model (the first token's is null); `max_tokens: 0`
  is then allowed, to score a text without generating.
- `logit_bias`: {token id: bias in [-100, 100]} added to the logits before sampling.
- `response_format`: `{"type": "json_object"}` (any JSON object) or `{"type": "json_schema",
  "json_schema": {"name", "schema", "strict"?, "description"?}}` (JSON valid under the schema),
  by constrained decoding (constrain.py, llguidance): the sampler masks every token that
  would leave the grammar, and once the JSON is complete only end-of-sequence is allowed,
  so the answer ends with finish_reason "stop". With "length" the JSON may be unfinished,
  as OpenAI's may. A schema llguidance cannot compile is a 400 naming `response_format`.
- `user`, `metadata`, `store: false`, `service_tier` auto/default, `parallel_tool_calls`,
  `modalities: ["text"]`, `response_format: {"type": "text"}`: accepted, as they change
  nothing here. Refused: `suffix`, tools and functions, audio, `prediction`,
  `reasoning_effort`, `web_search_options`.
- Every answer carries `system_fingerprint`: the tinyllm version, checkpoint, device,
  dtype and decode step that produced it (a change of any may change the tokens).
"""
from __future__ import annotations

import json
import time

import dataclasses

from ..constrain import ConstraintError, Grammars
from ..errors import TinyLLMError
from ..generate import StopRules
from ..logprobs import TokenText
from ..sampler import MAX_LOGPROBS, SamplingError, SamplingParams

# The sampling parameters of the CLI, accepted in a request body under the same names.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "seed")
# Every field a body may hold; any other is refused (400), as OpenAI's API refuses one it does not know.
COMMON_FIELDS = {"model", "n", "best_of", "stream", "stream_options", "stop", "max_tokens", "logit_bias",
                 "user", "return_token_ids", "ignore_eos", *SAMPLING_FIELDS}
FIELDS = {"completion": COMMON_FIELDS | {"prompt", "echo", "logprobs", "suffix", "response_format"},
          "chat": COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "response_format",
                                   "metadata", "store", "service_tier", "parallel_tool_calls", "modalities", "tools",
                                   "tool_choice", "functions", "function_call", "audio", "prediction",
                                   "reasoning_effort", "web_search_options", "prompt_cache_key",
                                   "safety_identifier", "verbosity"}}
# OpenAI fields tinyllm does not implement: refused when set, rather than silently ignored.
UNSUPPORTED_FIELDS = ("suffix", "tools", "tool_choice", "functions", "function_call", "audio", "prediction",
                      "reasoning_effort", "web_search_options", "verbosity")
MAX_N = 16           # choices per prompt
MAX_CHOICES = 64     # choices per request, all prompts together
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

    def add(self, param: str, message: str, code: str | None = None) -> None:
        self.errors.append((param, message, code))

    def raise_if_any(self) -> None:
        if self.errors:
            message = "; ".join(f"{param}: {message}" for param, message, _ in self.errors)
            raise APIError(400, message, self.errors[0][0], code=self.errors[0][2])


def _short(value) -> str:
    """A value quoted in an error message: its repr, cut short (a body may be megabytes)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---- from a request body to a scheduler job ---------------------------------------------------

@dataclasses.dataclass
class Job:
    """A validated request: what to feed the scheduler and how to answer."""

    kind: str                        # "completion" or "chat"
    prompts: list                    # token ids of each prompt
    sampling: SamplingParams         # n choices per prompt: choice_sampling(i) for the i-th
    rules: StopRules
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    n: int = 1
    echo: bool = False               # completions: the prompt text before the answer
    prompt_texts: list | None = None  # what echo shows of each prompt
    prompt_logprobs: int | None = None  # echo with logprobs: the prompt's, with N alternatives

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompts[0]

    @property
    def choices(self) -> list[tuple[int, SamplingParams]]:
        """(prompt index, sampling) of each choice, in the answer's order."""
        return [(p, self.choice_sampling(i)) for p in range(len(self.prompts)) for i in range(self.n)]

    def choice_sampling(self, i: int) -> SamplingParams:
        """Choice i of a prompt: seed + i when a seed is given (each choice its own draws)."""
        if i == 0 or self.sampling.seed is None:
            return self.sampling
        return dataclasses.replace(self.sampling, seed=(self.sampling.seed + i) % 2**64)


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
        self.grammars = Grammars(llm.tokenizer, llm.config.vocab_size)  # response_format's JSON grammars

    def check_model(self, body: dict) -> None:
        """An unknown model is a 404, as OpenAI answers it."""
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise APIError(404, f"model: unknown model {_short(model)}; this server serves {self.model_id!r}",
                           "model", code="model_not_found")

    def job(self, body: dict, kind: str) -> Job:
        self.check_model(body)
        errors = FieldErrors()
        for name in sorted(set(body) - FIELDS[kind]):
            errors.add(name, "unrecognized request argument" + (" (the chat endpoint takes 'messages')"
                                                                 if name == "prompt" else ""))
        for name in UNSUPPORTED_FIELDS:
            if name in FIELDS[kind] and body.get(name) not in (None, False, [], {}):
                errors.add(name, "not supported by this server")
        self._no_effect_fields(body, kind, errors)
        n = body.get("n")
        if n is None:
            n = 1
        elif not _is_int(n) or not 1 <= n <= MAX_N:
            errors.add("n", f"must be an integer in [1, {MAX_N}], got {_short(n)}")
            n = 1
        best_of = body.get("best_of")
        if best_of is not None and best_of != n:
            errors.add("best_of", f"only best_of = n is supported (no ranking of extra choices), got {_short(best_of)}")
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
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            errors.add("ignore_eos", f"expected true or false, got {_short(ignore_eos)}")
            ignore_eos = False
        echo = body.get("echo", False) if kind == "completion" else False
        if echo is None:
            echo = False
        if not isinstance(echo, bool):
            errors.add("echo", f"expected true or false, got {_short(echo)}")
            echo = False
        logprobs = self._logprobs(body, kind, errors)
        sampling = self._sampling(body, errors)
        grammar = self._response_format(body.get("response_format"), errors)
        if logprobs is not None or body.get("logit_bias") is not None or grammar is not None:
            try:
                sampling = dataclasses.replace(sampling, logprobs=logprobs, grammar=grammar,
                                               logit_bias=self._logit_bias(body.get("logit_bias"), errors))
            except SamplingError as e:
                errors.add(e.param, e.detail)
        stop = self._stop(body.get("stop"), errors)
        max_name = "max_tokens"
        max_tokens = body.get("max_tokens")
        if kind == "chat" and body.get("max_completion_tokens") is not None:
            max_name, max_tokens = "max_completion_tokens", body["max_completion_tokens"]
        least = 0 if echo else 1  # echo with max_tokens 0 scores the prompt alone
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < least):
            errors.add(max_name, f"must be an integer >= {least}" + ("" if echo else " (0 only with echo)")
                       + f", got {_short(max_tokens)}")
            max_tokens = None
        prompt_name, prompts = ("messages", [self._messages(body, errors)]) if kind == "chat" else \
                               ("prompt", self._prompts(body, errors))
        if prompts is not None and None in prompts:
            prompts = None
        if prompts is not None and len(prompts) * n > MAX_CHOICES:
            errors.add(prompt_name if len(prompts) > 1 else "n", f"{len(prompts)} prompts x n={n} choices is more "
                       f"than the {MAX_CHOICES} choices one request may ask for")
        if prompts is not None:
            longest = max(len(ids) for ids in prompts)
            room = self.max_context - longest
            if room < least:
                errors.add(prompt_name, f"the prompt has {longest} tokens but the context holds "
                           f"{self.max_context} (and at least one must be generated)", "context_length_exceeded")
            elif max_tokens is not None and max_tokens > room:
                errors.add(max_name, f"{max_tokens} new tokens do not fit: the prompt has {longest} "
                           f"tokens and the context holds {self.max_context}", "context_length_exceeded")
            elif max_tokens is None:
                max_tokens = min(self.default_max_tokens, room)
        errors.raise_if_any()
        texts = None
        if echo:
            texts = [p if isinstance(p, str) else self.llm.tokenizer.decode(ids, skip_special_tokens=False)
                     for p, ids in zip(self._raw_prompts(body), prompts)]
        rules = StopRules(max_tokens, stop, () if ignore_eos else None)  # (): no id ends the answer
        return Job(kind, prompts, sampling, rules, stream, include_usage, return_ids, n, echo,
                   texts, logprobs if echo else None)

    def _no_effect_fields(self, body: dict, kind: str, errors: FieldErrors) -> None:
        """Fields that change nothing in this server, accepted with the values that say so."""
        checks = {"user": (lambda v: isinstance(v, str), "a string"),
                  "metadata": (lambda v: isinstance(v, dict), "an object"),
                  "store": (lambda v: v is False, "false (this server stores nothing)"),
                  "service_tier": (lambda v: v in ("auto", "default"), "'auto' or 'default'"),
                  "parallel_tool_calls": (lambda v: isinstance(v, bool), "true or false"),
                  "modalities": (lambda v: v == ["text"], "[\"text\"] (text is all this server makes)"),
                  "prompt_cache_key": (lambda v: isinstance(v, str), "a string"),
                  "safety_identifier": (lambda v: isinstance(v, str), "a string")}
        for name, (ok, expected) in checks.items():
            value = body.get(name)
            if name in FIELDS[kind] and value is not None and not ok(value):
                errors.add(name, f"expected {expected}, got {_short(value)}")

    def _response_format(self, value, errors: FieldErrors):
        """OpenAI's response_format -> a constrain.Grammar, or None for plain text."""
        expected = ("expected {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
                    "\"json_schema\": {\"name\", \"schema\", \"strict\"}}")
        if value is None or value == {"type": "text"}:
            return None
        if not isinstance(value, dict):
            errors.add("response_format", f"{expected}, got {_short(value)}")
            return None
        kind = value.get("type")
        try:
            if kind == "json_object" and set(value) == {"type"}:
                return self.grammars.json_object()
            spec = value.get("json_schema")
            if kind != "json_schema" or set(value) != {"type", "json_schema"} or not isinstance(spec, dict):
                errors.add("response_format", f"{expected}, got {_short(value)}")
                return None
            unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
            name = spec.get("name")
            if unknown or not isinstance(name, str) or not name or not isinstance(spec.get("strict", False),
                                                                                 (bool, type(None))):
                errors.add("response_format", "json_schema: expected {\"name\": a non-empty string, \"schema\": "
                           "an object, \"strict\": true|false, \"description\": a string}, got " + _short(spec))
                return None
            # strict or not, the schema is enforced: constrained decoding cannot be partly strict
            return self.grammars.json_schema(spec.get("schema", {}))
        except ConstraintError as e:
            errors.add("response_format", str(e))
            return None

    def _logprobs(self, body: dict, kind: str, errors: FieldErrors) -> int | None:
        """How many alternatives per token (None: no logprobs): completions' `logprobs` N, or
        chat's `logprobs: true` with `top_logprobs` N (0 when left out)."""
        value = body.get("logprobs")
        if kind == "completion":
            if value is None:
                return None
            if not _is_int(value) or not 0 <= value <= MAX_LOGPROBS:
                errors.add("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {_short(value)}")
                return None
            return value
        top = body.get("top_logprobs")
        if value is not None and not isinstance(value, bool):
            errors.add("logprobs", f"expected true or false, got {_short(value)}")
            return None
        if top is not None and (not _is_int(top) or not 0 <= top <= MAX_LOGPROBS):
            errors.add("top_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {_short(top)}")
            return None
        if top is not None and not value:
            errors.add("top_logprobs", "needs \"logprobs\": true")
            return None
        return (top or 0) if value else None

    def _logit_bias(self, bias, errors: FieldErrors) -> tuple:
        """{"token id": bias}: JSON keys are strings; ids must be in the vocabulary."""
        if bias is None:
            return ()
        vocab = self.llm.config.vocab_size
        if not isinstance(bias, dict) or len(bias) > vocab:
            errors.add("logit_bias", f"expected an object {{\"token id\": bias}}, got {_short(bias)}")
            return ()
        pairs = []
        for key, value in bias.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < vocab):
                errors.add("logit_bias", f"{_short(key)} is not a token id in [0, {vocab})")
                return ()
            pairs.append((int(key), value))
        return tuple(pairs)

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

    @staticmethod
    def _raw_prompts(body: dict) -> list:
        """The prompt field as a list of prompts: a string, a list of ids, or a list of either."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            return prompt
        return [prompt]

    def _prompts(self, body: dict, errors: FieldErrors) -> list | None:
        prompts = self._raw_prompts(body)
        if len(prompts) > MAX_CHOICES:
            errors.add("prompt", f"{len(prompts)} prompts: at most {MAX_CHOICES} in one request")
            return None
        out = [self._prompt(p, errors) for p in prompts]
        return None if None in out else out

    def _prompt(self, prompt, errors: FieldErrors) -> list[int] | None:
        """A string or a list of token ids."""
        vocab = self.llm.config.vocab_size
        if isinstance(prompt, str):
            if too_long := self._too_long(len(prompt)):
                errors.add("prompt", too_long, "context_length_exceeded")
                return None
            return self.llm.prompt_ids(prompt)
        if isinstance(prompt, list) and len(prompt) > self.max_context:
            errors.add("prompt", f"{len(prompt)} token ids do not fit in a context of {self.max_context} tokens",
                       "context_length_exceeded")
            return None
        if isinstance(prompt, list) and prompt and all(_is_int(t) and 0 <= t < vocab for t in prompt):
            return list(prompt)
        errors.add("prompt", "expected a string, a non-empty list of token ids in [0, "
                   f"{vocab}), or a list of either, got {_short(prompt)}")
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
            errors.add("messages", too_long, "context_length_exceeded")
            return None
        try:
            return self.llm.prompt_ids(plain, chat=True)
        except TinyLLMError as e:
            errors.add("messages", str(e))
            return None


# ---- answers ------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def job_usage(job: Job, finished: list) -> dict:
    """Each prompt counted once, every choice's tokens counted."""
    return usage(sum(len(ids) for ids in job.prompts), sum(e.completion_tokens for e in finished))


class Logprobs:
    """TokenLogprob entries -> OpenAI's two shapes: chat's `content` list, and completions'
    parallel lists (tokens, token_logprobs, top_logprobs, text_offset)."""

    def __init__(self, tokenizer):
        self.text = TokenText(tokenizer)

    def chat(self, entries) -> dict:
        def item(token_id, logprob):
            text, data = self.text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(data)}

        return {"content": [{**item(e.id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                            for e in entries], "refusal": None}

    def completion(self, entries, offset: int, ids=None) -> dict:
        """`entries` may hold None (a prompt's first token has no log-probability): then its
        id comes from `ids`. `offset`: where the first token's text starts in the answer."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for k, e in enumerate(entries):
            token = self.text(e.id if e is not None else ids[k])[0]
            out["tokens"].append(token)
            out["token_logprobs"].append(None if e is None else e.logprob)
            out["top_logprobs"].append(None if e is None else {self.text(i)[0]: lp for i, lp in e.top})
            out["text_offset"].append(offset)
            offset += len(token)
        return out

    @staticmethod
    def end(block: dict) -> int:
        """The offset after a completions block (where the next block's text starts)."""
        if not block["tokens"]:
            return 0
        return block["text_offset"][-1] + len(block["tokens"][-1])


class Choice:
    """One choice's answer as its events arrive: text, logprob entries, the prompt's, the end."""

    def __init__(self, index: int, prompt: int):
        self.index = index
        self.prompt = prompt          # which prompt of the request
        self.text: list[str] = []
        self.logprobs: list = []
        self.prompt_logprobs: list | None = None
        self.finished = None          # the scheduler's Finished event


def completion(job: Job, rid: str, model_id: str, fingerprint: str, choices: list[Choice], logprobs: Logprobs) -> dict:
    """A whole (non-streamed) answer: `text_completion` or `chat.completion`."""
    out = []
    for c in choices:
        event = c.finished
        choice = {"index": c.index, "logprobs": None, "finish_reason": FINISH_REASONS[event.reason]}
        text = "".join(c.text)
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
            if job.sampling.logprobs is not None:
                choice["logprobs"] = logprobs.chat(c.logprobs)
        else:
            prompt_text = job.prompt_texts[c.prompt] if job.echo else ""
            choice["text"] = prompt_text + text
            block = None
            if job.prompt_logprobs is not None:
                block = logprobs.completion(c.prompt_logprobs, 0, job.prompts[c.prompt])
            if job.sampling.logprobs is not None:
                generated = logprobs.completion(c.logprobs, len(prompt_text))
                block = generated if block is None else {k: block[k] + generated[k] for k in block}
            choice["logprobs"] = block
        if job.return_token_ids:
            choice["token_ids"] = event.token_ids
        out.append(choice)
    return {"id": rid, "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_id, "system_fingerprint": fingerprint, "choices": out,
            "usage": job_usage(job, [c.finished for c in choices])}


class Chunks:
    """The pieces of a streamed answer (`text_completion` or `chat.completion.chunk` objects)."""

    def __init__(self, job: Job, rid: str, model_id: str, fingerprint: str, logprobs: Logprobs | None = None):
        self.job = job
        self.chat = job.kind == "chat"
        self.logprobs = logprobs
        self.head = {"id": rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": int(time.time()), "model": model_id, "system_fingerprint": fingerprint}
        self.offsets: dict[int, int] = {}  # completions: each choice's text length so far (text_offset)
        self._frames: dict[int, tuple[str, str] | None] = {}  # choice -> its piece line around the text's
        # JSON; None: a frame that holds the marker itself, so its lines are encoded whole

    def text(self, text: str | None, finish: str | None = None, first: bool = False, token_ids=None,
             index: int = 0, entries=None, ids=None) -> dict:
        """One chunk of choice `index`: its text, its logprob `entries` (a prompt's may hold None,
        then `ids` names those tokens), its finish reason."""
        logprobs = None
        if entries is not None and self.logprobs is not None:
            if self.chat:
                logprobs = self.logprobs.chat(entries)
            else:
                logprobs = self.logprobs.completion(entries, self.offsets.get(index, 0), ids)
        if not self.chat:
            self.offsets[index] = self.offsets.get(index, 0) + len(text or "")
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return {**self.head, "choices": [choice]}

    def piece(self, text: str, index: int = 0) -> str:
        """`sse_line(self.text(text, index=index))` for a piece of text without logprobs, the
        most common line of a stream: every such line of a choice is the same JSON around the
        text, so that frame is encoded once and only the text per piece."""
        if index not in self._frames:
            marker = "\x00piece\x00"  # not in the frame (checked below: else the slow way)
            offsets = dict(self.offsets)
            whole = sse_line(self.text(marker, index=index))
            self.offsets = offsets  # the marker was never sent
            before, found, after = whole.partition(json.dumps(marker))
            self._frames[index] = (before, after) if found and json.dumps(marker) not in after else None
        frame = self._frames[index]
        if frame is None:
            return sse_line(self.text(text, index=index))
        if not self.chat:
            self.offsets[index] = self.offsets.get(index, 0) + len(text)
        return f"{frame[0]}{json.dumps(text, ensure_ascii=False)}{frame[1]}"

    def finish(self, event, return_token_ids: bool, index: int = 0) -> dict:
        return self.text(None, FINISH_REASONS[event.reason], token_ids=event.token_ids if return_token_ids else None,
                         index=index)

    def usage(self, finished: list) -> dict:
        return {**self.head, "choices": [], "usage": job_usage(self.job, finished)}


def sse_line(obj) -> str:
    """One Server-Sent Event: `data: {json}` and a blank line."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"

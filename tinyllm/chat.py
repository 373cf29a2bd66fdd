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

The sandbox keeps a template away from Python's internals; it does not bound its work.
A template that loops for ever or builds gigabytes (nested loops, `"x" * 10**9`, a string
doubled in a loop, `9**9**9`, recursive macros) ends here with a ChatTemplateLimitError
within about MAX_SECONDS and with at most a few MAX_SIZE-sized values alive:
- a deadline, checked by a trace hook set for the render only, in the rendering thread:
  on every function call, and on every line of the template's own compiled code (tracing
  Jinja's runtime line by line too would make real templates several times slower);
- sizes: an operator (`*`, `**`, `+`, `%`, `~`), a filter or a method whose result would
  be too large is refused before it runs where its size can be known (repetition, powers,
  joins, replacements, indents, widths in format strings, integer arguments), and its
  result is checked after it otherwise;
- the rendered text is counted as it is produced.
"""
from __future__ import annotations

import functools
import json
import re
import sys
import time
from datetime import datetime

from .errors import TinyLLMError, one_line

MAX_SECONDS = 1.0   # a real template renders in a tiny fraction of this
MAX_SIZE = 2**22    # characters in a string, items in a list, characters rendered: past any context window
MAX_INT_BITS = 2**14
MAX_SOURCE = 2**20  # characters of template source; real ones are a few thousand


class ChatTemplateError(TinyLLMError, ValueError):
    """No chat template, a template that fails to render, or malformed messages."""


class ChatTemplateLimitError(ChatTemplateError):
    """A template that needs more time or memory than rendering a prompt can take."""


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates want plain JSON.
    if isinstance(indent, (int, str)) and _size(indent) > 64:  # the indent repeats on every line
        raise _Limit(f"tojson with an indent of {_size(indent)}")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# ---- bounding a template's work -------------------------------------------------------------------

class _Limit(BaseException):
    """A limit hit inside a render. A BaseException, so that no `except Exception` in
    Jinja's runtime or in a filter can swallow it (the trace hook is gone once it fires)."""


def _size(value) -> int:
    """What a value costs: characters, items, or an integer's own magnitude."""
    if isinstance(value, (str, list, tuple, dict)):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value)
    return 0


def _check_size(value, what: str = "a value"):
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > MAX_INT_BITS:
            raise _Limit(f"{what} is an integer of more than {MAX_INT_BITS} bits")
    elif _size(value) > MAX_SIZE:
        raise _Limit(f"{what} has more than {MAX_SIZE} characters or items")
    return value


def _check_binop(operator, left, right) -> None:
    """Refuse an operation whose result would be too large, before computing it."""
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (left, right))
    if ints and operator in ("*", "**"):
        if operator == "*":
            bits = left.bit_length() + right.bit_length()
        else:  # |left| ** right has at least right * floor(log2 |left|) bits
            bits = right * (abs(left).bit_length() - 1) if right > 0 else 0
        if bits > MAX_INT_BITS:
            raise _Limit(f"{operator} would make an integer of more than {MAX_INT_BITS} bits")
    elif operator == "*" and (isinstance(left, int) or isinstance(right, int)):
        sequence, times = (right, left) if isinstance(left, int) else (left, right)
        if isinstance(sequence, (str, list, tuple)) and len(sequence) * times > MAX_SIZE:
            raise _Limit(f"a repetition ({len(sequence)} x {times}) has more than {MAX_SIZE} characters or items")
    elif operator == "+" and not ints and _size(left) + _size(right) > MAX_SIZE:
        raise _Limit(f"a sum has more than {MAX_SIZE} characters or items")
    elif operator == "%" and isinstance(left, str):
        _check_format(left)


def _check_format(spec: str) -> None:
    """Widths and precisions in a format string (`%9999999d`, `{:>9999999}`) allocate."""
    for digits in re.findall(r"\d+", spec):
        if len(digits) > 7 or int(digits) > MAX_SIZE:
            raise _Limit(f"a format string asks for a width of {digits[:12]}")


def _check_call(function, args, kwargs) -> None:
    """Refuse calls whose result is a product of their arguments' sizes, before they run."""
    name = getattr(function, "__name__", "").removeprefix("sync_").removeprefix("do_")
    owner = getattr(function, "__self__", None)
    args = ([owner] if isinstance(owner, str) else []) + list(args)  # "text".method(...) as method(text, ...)
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SIZE:
            raise _Limit(f"{name}() with an argument of {_shown(value)}")
    strings = [a for a in args if isinstance(a, str)]
    if name == "format" and strings:
        _check_format(strings[0])
    elif name == "replace" and len(strings) >= 3:
        text, old, new = strings[-3:]
        count = text.count(old) if old else len(text) + 1
        if len(text) + count * (len(new) - len(old)) > MAX_SIZE:
            raise _Limit(f"replace() would make more than {MAX_SIZE} characters")
    elif name == "join":
        items = next((a for a in args if isinstance(a, (list, tuple))), ())
        separator = next((a for a in args if isinstance(a, str)), "")
        total = 0
        for item in items:  # stops at the first item past the limit: the same huge string may repeat
            total += len(separator) + len(item if isinstance(item, str) else str(item))
            if total > MAX_SIZE:
                raise _Limit(f"join() would make more than {MAX_SIZE} characters")
    elif name in ("indent", "expandtabs") and strings:
        width = max([_size(a) for a in args[1:] + list(kwargs.values())] + [8])
        if width * (strings[0].count("\n") + strings[0].count("\t") + 1) > MAX_SIZE:
            raise _Limit(f"{name}() would make more than {MAX_SIZE} characters")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _checked_filter(function):
    @functools.wraps(function)  # keeps Jinja's pass_context/pass_eval_context marks
    def checked(*args, **kwargs):
        _check_call(function, args, kwargs)
        return _check_size(function(*args, **kwargs), "a filter's result")
    return checked


def _bounded_environment(**options):
    """Jinja's immutable sandbox, with every operator, call, filter and join size-checked."""
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class JoinChecked(CodeGenerator):
        def visit_Concat(self, node, frame):  # `a ~ b` compiles to a join the sandbox never sees
            self.write("environment.concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})
        code_generator_class = JoinChecked

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return _check_size(super().call_binop(context, operator, left, right), f"the result of {operator}")

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
            _check_call(getattr(__obj, "__wrapped__", __obj), args, kwargs)
            return _check_size(super().call(__context, __obj, *args, **kwargs), "a call's result")

        def wrap_str_format(self, value):
            if isinstance(getattr(value, "__self__", None), str):
                _check_format(value.__self__)
            return super().wrap_str_format(value)

        def concat(self, pieces):  # macros, blocks, {% set %} blocks and `~`: many pieces, one string
            pieces = [str(piece) for piece in pieces]
            if sum(map(len, pieces)) > MAX_SIZE:
                raise _Limit(f"a joined string has more than {MAX_SIZE} characters")
            return "".join(pieces)

    env = BoundedSandbox(**options)
    env.filters = {name: _checked_filter(f) for name, f in env.filters.items()}
    return env


class _Deadline:
    """A trace hook for one render: each call, and each line of the template's own code
    (compiled from "<template>"), checks the clock."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def __call__(self, frame, event, arg):
        if time.monotonic() > self.end:
            raise _Limit(f"it ran for more than {self.seconds:g} s")
        return self if frame.f_code.co_filename == "<template>" else None


def _bounded(run, origin: str, stage: str):
    """run() under the deadline, with every way a template can fail turned into one line;
    stage: 'compiling' or 'rendering'."""
    from jinja2 import TemplateError

    def error(detail):
        if stage == "compiling":
            return ChatTemplateError(f"{origin}: the chat template does not compile ({detail})")
        return ChatTemplateError(f"{origin}: chat template error: {detail}")

    def stopped(detail):
        return ChatTemplateLimitError(f"{origin}: the chat template was stopped while {stage}: {detail}")

    previous = sys.gettrace()  # a debugger's or coverage's hook: suspended for the render, then restored
    sys.settrace(_Deadline(MAX_SECONDS))
    try:
        return run()
    except _Limit as e:
        raise stopped(e) from None
    except RecursionError:
        raise stopped("it recursed deeper than Python allows") from None
    except MemoryError:
        raise stopped("it ran out of memory") from None
    except TemplateError as e:
        raise error(_one_line(e)) from None
    except Exception as e:  # e.g. 1 / 0, int('x'): the template's own bug, as one line
        raise error(f"{type(e).__name__}: {_one_line(e)}") from None
    finally:
        sys.settrace(previous)


class ChatTemplate:
    """A compiled chat template with the tokenizer's special-token strings."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 origin: str = "chat template"):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.origin = origin
        if not isinstance(source, str) or len(source) > MAX_SOURCE:
            raise ChatTemplateError(f"{origin}: expected a chat template of at most {MAX_SOURCE} characters, "
                                    f"got {len(source) if isinstance(source, str) else type(source).__name__}")
        env = _bounded_environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _checked_filter(_tojson)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        # compiling runs the template's constant parts (Jinja folds them), so it is bounded too
        self.template = _bounded(lambda: env.from_string(source), origin, "compiling")

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatTemplate":
        """The checkpoint's template, or a clear error when it has none."""
        if not tokenizer.chat_template:
            raise ChatTemplateError(
                f"{tokenizer.source}: this checkpoint has no chat template (tokenizer.chat_template in GGUF, "
                "chat_template in tokenizer_config.json); use --raw for plain text completion")
        return _compiled(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, tokenizer.source)

    def render(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        """The conversation as the model's prompt text (within MAX_SECONDS and MAX_SIZE)."""
        messages = check_messages(messages)
        variables = dict(messages=messages, add_generation_prompt=add_generation_prompt,
                         bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)

        def run():
            pieces, size = [], 0
            for piece in self.template.generate(**variables):
                size += len(piece)
                if size > MAX_SIZE:
                    raise _Limit(f"it rendered more than {MAX_SIZE} characters")
                pieces.append(piece)
            return "".join(pieces)

        return _bounded(run, self.origin, "rendering")


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


def _one_line(error, limit: int = 300) -> str:
    """errors.one_line, cut short: a template's error may quote a long piece of it."""
    text = one_line(error)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
        return Generation(self.llm.step, self.llm.tokenizer, ids, sampler=self.sampler, rules=self.rules,
                          context=self.context, on_finish=self._answered)

    def _answered(self, generation) -> None:
        if generation.stats.finish_reason is None and not generation.token_ids:
            self.messages.pop()  # the turn failed before any answer (e.g. it did not fit): forget it
        else:  # a full answer, or the part produced before an interruption
            self.messages.append({"role": "assistant", "content": generation.text})

    def clear(self) -> None:
        """Forget the conversation and empty the KV cache; the system prompt stays."""
        system = self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None
        self.set_system(system)

    def set_system(self, system: str | None) -> None:
        """A new system prompt (None or '': none), and the conversation starts over."""
        from .generate import Context

        self.messages = [{"role": "system", "content": system}] if system else []
        cache = self.context.cache
        cache.trim(cache.length)
        self.context = Context(self.llm.model, cache=cache)  # the same buffers, holding nothing

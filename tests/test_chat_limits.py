"""Hostile chat templates: each one that would render for ever or build gigabytes ends with
a one-line ChatTemplateLimitError naming the template and the limit, in bounded time and
memory; ordinary template bugs are one-line ChatTemplateErrors; the trace hook that keeps
the deadline is gone after the render."""
import sys
import threading
import time
import tracemalloc

import pytest

from tinyllm import chat
from tinyllm.chat import ChatTemplate, ChatTemplateError, ChatTemplateLimitError
from tinyllm.errors import TinyLLMError

MESSAGES = [{"role": "user", "content": "hi"}]
SECONDS = 3.0          # generous: a slow 2-core machine, with tracemalloc slowing Python down
PEAK_BYTES = 256 * 2**20

HOSTILE = {  # name: (template, what the error says)
    "nested loops without output": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "ran for more than"),
    "nested loops with output": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endfor %}",
        "rendered more than"),
    "huge range": ("{{ range(10**9)|list|length }}", "argument of 1000000000"),
    "string multiplication": ("{{ 'x' * 10**9 }}", "repetition"),
    "list multiplication": ("{{ ([0] * 10**9)|length }}", "repetition"),
    "string doubling with ~": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "joined string"),
    "string doubling with +": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
        "sum"),
    "list doubling": (
        "{% set ns = namespace(l=[0]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l }}",
        "sum"),
    "big integer power": ("{{ 9 ** (9 ** 9) }}", "integer of more than"),
    "big integer squaring": (
        "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}",
        "integer of more than"),
    "recursive macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed"),
    "recursive loop": ("{% for x in range(1000) recursive %}{{ loop(range(1000)) }}{% endfor %}", "recursed"),
    "exponential macro calls": (
        "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
        "ran for more than"),
    "macro joining a huge string": (
        "{% set s = 'a' * 4000000 %}{% macro f() %}{% for i in range(10) %}{{ s }}{% endfor %}{% endmacro %}"
        "{{ f() }}", "joined string"),
    "set block joining a huge string": (
        "{% set s = 'a' * 4000000 %}{% set t %}{% for i in range(10) %}{{ s }}{% endfor %}{% endset %}{{ t }}",
        "joined string"),
    "center filter": ("{{ 'x'|center(10**9) }}", "argument of 1000000000"),
    "format filter width": ("{{ '%999999999d'|format(1) }}", "width"),
    "str.format width": ("{{ '{:>999999999}'.format(1) }}", "width"),
    "% operator width": ("{{ '%999999999d' % messages|length }}", "width"),
    "replace blow-up": ("{% set s = 'a' * 4000000 %}{{ s|replace('a', s) }}", "replace()"),
    "join blow-up": ("{% set s = 'a' * 4000000 %}{{ ([s] * 4000000)|join }}", "join()"),
    "str.join blow-up": ("{% set s = 'a' * 4000000 %}{{ s.join([s, s]) }}", "join()"),
    "indent blow-up": ("{{ ('\\n' * 4000000)|indent(4000000) }}", "indent()"),
    "tojson indent": ("{{ messages|tojson(indent=4000000) }}", "indent"),
    "slow filter over a large list": ("{{ (range(100000)|list * 40)|sort|unique|list|length }}", "ran for more than"),
}


def render_measured(source, messages=MESSAGES):
    """(error, seconds, peak traced bytes) of compiling and rendering `source`."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        ChatTemplate(source, origin="evil.gguf").render(messages)
        error = None
    except ChatTemplateError as e:
        error = e
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return error, seconds, peak


@pytest.fixture
def short_deadline(monkeypatch):
    """The deadline's own test keeps MAX_SECONDS; the others need not wait a second each."""
    monkeypatch.setattr(chat, "MAX_SECONDS", 0.25)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_ends_with_a_clear_error_in_bounded_time_and_memory(name, monkeypatch):
    source, says = HOSTILE[name]
    # The deadline's own cases need not wait a whole second each; the others keep the real
    # deadline, so that on a slow machine their own limit, not the clock, is what stops them.
    if says == "ran for more than":
        monkeypatch.setattr(chat, "MAX_SECONDS", 0.25)
    error, seconds, peak = render_measured(source)
    assert isinstance(error, ChatTemplateLimitError), f"{name}: {error!r}"
    message = str(error)
    assert message.startswith("evil.gguf: the chat template was stopped while") and says in message, message
    assert "\n" not in message and len(message) < 400
    assert seconds < SECONDS, (name, seconds)
    assert peak < PEAK_BYTES, (name, peak)


def test_the_deadline_is_about_a_second():
    error, seconds, _ = render_measured(HOSTILE["nested loops without output"][0])
    assert isinstance(error, ChatTemplateLimitError) and f"more than {chat.MAX_SECONDS:g} s" in str(error)
    assert chat.MAX_SECONDS <= seconds < SECONDS


def test_a_limit_hit_while_compiling_is_reported_too():
    """Jinja folds constant expressions at compile time, so a template can blow up there."""
    with pytest.raises(ChatTemplateLimitError, match="while compiling: .*width"):
        ChatTemplate("{{ '%999999999d'|format(1) }}")


def test_limit_error_is_a_tinyllm_error():
    assert issubclass(ChatTemplateLimitError, ChatTemplateError)
    assert issubclass(ChatTemplateLimitError, TinyLLMError) and issubclass(ChatTemplateLimitError, ValueError)


@pytest.mark.parametrize("source, says", [
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
    ("{{ 'abc'|int + [] }}", "TypeError"),
    ("{{ raise_exception('x' * 100000) }}", "..."),
])
def test_template_bugs_are_one_line_errors(source, says):
    with pytest.raises(ChatTemplateError) as err:
        ChatTemplate(source, origin="buggy.gguf").render(MESSAGES)
    message = str(err.value)
    assert message.startswith("buggy.gguf: chat template error: ") and says in message
    assert "\n" not in message and len(message) < 400
    assert not isinstance(err.value, ChatTemplateLimitError)


def test_an_oversized_template_source_is_refused_before_compiling():
    with pytest.raises(ChatTemplateError, match="at most"):
        ChatTemplate("x" * (chat.MAX_SOURCE + 1))


def test_large_honest_inputs_still_render():
    """Limits bound the template's work, not a long conversation: a message of a million
    characters and a conversation of a thousand turns render as they are."""
    template = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}\n{% endfor %}")
    long = [{"role": "user", "content": "word " * 200_000}]
    assert len(template.render(long)) == len("<user>") + 200_000 * 5 - 1 + 1
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(1000)]
    assert template.render(turns).count("\n") == 1000


def test_the_trace_hook_is_restored_after_success_and_failure():
    def outer(frame, event, arg):
        return None

    before = sys.gettrace()
    sys.settrace(outer)
    try:
        ChatTemplate("{{ messages|length }}").render(MESSAGES)
        assert sys.gettrace() is outer
        with pytest.raises(ChatTemplateLimitError):
            ChatTemplate("{{ 'x' * 10**9 }}").render(MESSAGES)
        assert sys.gettrace() is outer
    finally:
        sys.settrace(before)


def test_a_render_in_a_worker_thread_is_bounded_there(short_deadline):
    """The server renders off its event loop: the deadline holds in the rendering thread."""
    results = []

    def work():
        results.append(render_measured(HOSTILE["exponential macro calls"][0])[0])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(SECONDS)
    assert not thread.is_alive() and isinstance(results[0], ChatTemplateLimitError)

"""The chat REPL (`tinyllm run --chat`): /commands, multi-line messages, history, and keys
typed during an answer. Driven through piped stdin on a tiny model with a chat template;
the expected prompt ids come from transformers' own apply_chat_template on the same files."""
import io
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyllm.run import CHAT_HELP, ChatInput, TypeAhead, load_history, save_history

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama with a tokenizer and a chat template, and transformers' tokenizer of it."""
    from conftest import tiny_checkpoint_dir
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny_chat_model")
    tiny_checkpoint_dir(d, chat_template=TEMPLATE, tokenizer_class="PreTrainedTokenizerFast")
    return d, AutoTokenizer.from_pretrained(d)


def chat(model_dir, stdin: str, *args):
    return subprocess.run([sys.executable, "-m", "tinyllm.run", "--model", str(model_dir), "--chat", "-n", "3", *args],
                          input=stdin, capture_output=True, text=True, encoding="utf-8", cwd=ROOT, timeout=300,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8"))


def reference_ids(tok, messages):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_commands_and_multiline_through_piped_stdin(chat_model):
    d, tok = chat_model
    stdin = ('Name a fruit.\n/system Be brief.\n"""first line\n\nsecond line"""\n/clear\n/help\n/bogus\nHi\n'
             "/exit\nnever read\n")
    r = chat(d, stdin, "--json")
    assert r.returncode == 0, r.stderr
    turns = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(turns) == 3  # /commands are not messages; /exit ends the chat
    fruit = [{"role": "user", "content": "Name a fruit."}]
    assert turns[0]["prompt_ids"] == reference_ids(tok, fruit)
    # /system: a new system prompt and a new conversation (the first turn is forgotten)
    brief = [{"role": "system", "content": "Be brief."}]
    multi = brief + [{"role": "user", "content": "first line\n\nsecond line"}]
    assert turns[1]["prompt_ids"] == reference_ids(tok, multi)
    assert turns[1]["stats"]["cached_tokens"] == 0  # the KV cache was emptied, not reused
    # /clear: the system prompt stays, the conversation and its cache go
    assert turns[2]["prompt_ids"] == reference_ids(tok, brief + [{"role": "user", "content": "Hi"}])
    assert turns[2]["stats"]["cached_tokens"] == 0
    assert CHAT_HELP in r.stderr
    assert "[system prompt set; new conversation]" in r.stderr and "[conversation cleared]" in r.stderr
    assert "unknown command '/bogus'" in r.stderr


def test_without_clear_the_conversation_and_cache_are_kept(chat_model):
    """The control for the test above: the same turns with no command between them."""
    d, tok = chat_model
    r = chat(d, "Name a fruit.\nHi\n", "--json", "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    first, second = [json.loads(line) for line in r.stdout.splitlines()]
    messages = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": first["text"]},
                {"role": "user", "content": "Hi"}]
    assert second["prompt_ids"] == reference_ids(tok, messages)
    assert second["stats"]["cached_tokens"] > 0


def test_system_alone_removes_the_system_prompt_and_quiet_hides_the_notes(chat_model):
    d, tok = chat_model
    r = chat(d, "/system\nHi\n", "--json", "--quiet", "--system", "Be brief.")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    (turn,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert turn["prompt_ids"] == reference_ids(tok, [{"role": "user", "content": "Hi"}])


def piped(monkeypatch, text: str) -> ChatInput:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="utf-8"))
    return ChatInput(interactive=False)


@pytest.mark.parametrize("text, messages", [
    ('"""one line"""\n', [("one line", True)]),
    ('  """\na\n\n  b\n"""\nnext\n', [("a\n\n  b", True), ("next", False)]),
    ('"""/clear\n/exit"""\n/clear\n', [("/clear\n/exit", True), ("/clear", False)]),
    ('"""never closed\nto the end\n', [("never closed\nto the end", True)]),  # the end of input closes it
    ("plain\r\n", [("plain", False)]),
])
def test_read_message_joins_blocks(monkeypatch, text, messages):
    lines = piped(monkeypatch, text)
    got = []
    while (m := lines.read_message()) is not None:
        got.append(m)
    assert got == messages


def test_history_is_kept_bounded_and_failures_are_silent(tmp_path):
    readline = pytest.importorskip("readline")
    from tinyllm.run import HISTORY_LENGTH

    path = tmp_path / "history"
    readline.clear_history()
    try:
        load_history(readline, tmp_path / "missing")  # no file yet: nothing, no error
        for i in range(HISTORY_LENGTH + 20):
            readline.add_history(f"message {i}")
        save_history(readline, path)
        lines = path.read_text().splitlines()
        assert len(lines) <= HISTORY_LENGTH + 1 and lines[-1] == f"message {HISTORY_LENGTH + 19}"  # +1: libedit's header
        readline.clear_history()
        load_history(readline, path)
        assert readline.get_history_item(readline.get_current_history_length()) == f"message {HISTORY_LENGTH + 19}"
        save_history(readline, tmp_path)  # a directory: cannot be written, silently
        load_history(readline, tmp_path)
    finally:
        readline.clear_history()


def readable(fd, wait: float = 0.3) -> bytes:
    if not select.select([fd], [], [], wait)[0]:
        return b""
    return os.read(fd, 1024)


def test_keys_typed_during_an_answer_are_not_echoed_and_are_discarded():
    """On a pseudo-terminal: inside TypeAhead the terminal does not echo, and what was typed
    there is gone afterwards; outside it, typed input stays readable (the premise)."""
    termios = pytest.importorskip("termios")
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "rb", buffering=0)
    try:
        os.write(master, b"kept\n")
        assert readable(slave) == b"kept\n"
        assert termios.tcgetattr(slave)[3] & termios.ECHO
        with TypeAhead(stream):
            assert not termios.tcgetattr(slave)[3] & termios.ECHO
            os.write(master, b"typed while the model answered\n")
            time.sleep(0.1)
        assert termios.tcgetattr(slave)[3] & termios.ECHO  # echo is back for the prompt
        assert readable(slave) == b""
    finally:
        stream.close()
        os.close(master)


def test_type_ahead_is_a_no_op_off_a_terminal():
    with TypeAhead(io.StringIO("not a terminal")) as guard:
        assert guard.fd is None
    guard.flush()

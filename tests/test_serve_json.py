"""`response_format` with the official `openai` client: JSON by constrained decoding.

A tiny random Llama (a trained byte-fallback BPE tokenizer, `</s>` as end of sequence)
cannot be asked nicely for JSON: whatever it writes under a schema is the constraint's
doing, so its answers validating against the schema (checked by `jsonschema`, independent
of llguidance) is the test. The schemas are finite (booleans, enums, bounded integers), so
a complete answer fits the token budget and must end with finish_reason "stop". The real
default model answers the open-ended `json_object` (a random model could write one string
forever)."""
from __future__ import annotations

import contextlib
import json
import socket

import pytest

openai = pytest.importorskip("openai", reason="the server tests need the openai client (pip install 'tinyllm[test]')")
pytest.importorskip("starlette", reason="the server needs starlette (pip install 'tinyllm[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'tinyllm[serve]')")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client (pip install 'tinyllm[serve]')")
pytest.importorskip("llguidance", reason="response_format needs llguidance (pip install 'tinyllm[json]')")
jsonschema = pytest.importorskip("jsonschema", reason="schemas are checked with jsonschema (pip install jsonschema)")

import tinyllm  # noqa: E402
from tinyllm.server.app import Server  # noqa: E402
from tinyllm.server.main import limits, parse_args  # noqa: E402

from helpers_serve import uvicorn_thread  # noqa: E402

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
MESSAGES = [{"role": "user", "content": "a baker had"}]
SCHEMA = {"type": "object",
          "properties": {"ok": {"type": "boolean"},
                         "color": {"enum": ["red", "green", "blue"]},
                         "size": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["ok", "color", "size"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
BUDGET = 64  # tokens: more than the longest answer SCHEMA allows, one character per token


@contextlib.contextmanager
def serve(llm, name):
    """The openai client of a Server for `llm`, on a free port, for the block's duration."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = parse_args(["--port", str(port), "--log-level", "warning"])
    server = Server(llm, name, max_batch=8, max_queue=32, default_max_tokens=BUDGET, limits=limits(args))
    server.start(warm_up=False)
    try:
        with uvicorn_thread(server.app(), args):
            yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The openai client of a server for a tiny random Llama whose EOS is `</s>` (id 2)."""
    from conftest import tiny_checkpoint_dir

    d = tmp_path_factory.mktemp("tiny_json_model")
    tiny_checkpoint_dir(d, chat_template=TEMPLATE, eos_token_id=2)
    with serve(tinyllm.load(d), "tiny") as c:
        yield c


def valid(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


def test_json_schema_greedy_answers_validate_and_end_with_stop(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=BUDGET, response_format=FORMAT)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    valid(choice.message.content)
    again = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=BUDGET, response_format=FORMAT)
    assert again.choices[0].message.content == choice.message.content  # greedy: the same answer

    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=BUDGET,
                                            response_format=FORMAT, stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].finish_reason == "stop"

    r = client.completions.create(model="tiny", prompt="a baker had", max_tokens=BUDGET,
                                  extra_body={"response_format": FORMAT})
    assert r.choices[0].finish_reason == "stop"
    valid(r.choices[0].text)


def test_json_schema_sampled_answers_validate(client):
    """Seeded sampling at a high temperature wanders far from the model's favourites; every
    choice still validates, and a seed gives its choice again."""
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=BUDGET, response_format=FORMAT,
                                       temperature=1.5, seed=7, n=6)
    texts = [c.message.content for c in r.choices]
    assert all(c.finish_reason == "stop" for c in r.choices)
    for text in texts:
        valid(text)
    assert len(set(texts)) > 1  # the choices are independent draws, not one answer repeated
    again = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=BUDGET,
                                           response_format=FORMAT, temperature=1.5, seed=7 + 2)
    assert again.choices[0].message.content == texts[2]


def test_json_cut_by_the_budget_says_length(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, response_format=FORMAT)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 3
    assert choice.message.content.startswith("{")
    with pytest.raises(json.JSONDecodeError):  # unfinished: the smallest valid answer is longer
        json.loads(choice.message.content)


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}},
    {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "integer", "minimum": 5,
                                                                      "maximum": 1}}},
    {"type": "json_schema", "json_schema": {"schema": SCHEMA}},                   # no name
    {"type": "json_schema", "json_schema": {"name": "x", "schema": "an object"}},
    {"type": "json_object", "schema": SCHEMA},                                    # a field json_object lacks
    {"type": "xml"},
    "json",
])
def test_bad_response_formats_are_400s_naming_the_field(client, response_format):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4,
                                       response_format=response_format)
    assert e.value.body["param"] == "response_format"
    assert "response_format" in e.value.body["message"]


@pytest.mark.slow
def test_json_object_from_the_default_model():
    with serve(tinyllm.load(), "default") as client:
        messages = [{"role": "user", "content": 'Reply with the JSON object {"ok": true}.'}]
        r = client.chat.completions.create(model="default", messages=messages, max_tokens=16,
                                           response_format={"type": "json_object"})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)

"""The OpenAI surface with the official `openai` client: logprobs (chat and completions,
streamed and not, echo with the prompt's), n choices, logit_bias, lists of prompts,
system_fingerprint, errors (404 model_not_found, context_length_exceeded, unknown fields),
/v1/models/{id} and the log line per request.

The server runs in this process behind a real uvicorn, on a tiny random Llama with a small
trained tokenizer; every expected log-probability and token comes from `transformers`'
logits for the same ids (log-softmax, argmax, the inverse-CDF draw written here)."""
from __future__ import annotations

import logging
import socket
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the server tests need the openai client (pip install 'tinyllm[test]')")
pytest.importorskip("starlette", reason="the server needs starlette (pip install 'tinyllm[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'tinyllm[serve]')")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client (pip install 'tinyllm[serve]')")

import tinyllm  # noqa: E402
from tinyllm.server.app import Server  # noqa: E402
from tinyllm.server.main import limits, parse_args  # noqa: E402

from helpers_serve import uvicorn_thread  # noqa: E402

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
MESSAGES = [{"role": "user", "content": "a baker had"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tinyllm's LLM, transformers' model) of one tiny random Llama with a trained tokenizer."""
    from conftest import tiny_checkpoint_dir

    d = tmp_path_factory.mktemp("tiny_openai_model")
    hf, _ = tiny_checkpoint_dir(d, eos=False, chat_template=TEMPLATE)
    return tinyllm.load(d), hf


@pytest.fixture(scope="module")
def served(tiny):
    llm, _ = tiny
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = parse_args(["--port", str(port), "--log-level", "warning"])
    server = Server(llm, "tiny", max_batch=8, max_queue=32, default_max_tokens=4, limits=limits(args))
    server.start(warm_up=False)
    with uvicorn_thread(server.app(), args):
        yield server, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    server.stop()


def ref_logprobs(hf, ids) -> np.ndarray:
    """transformers' log-softmax (float64) at every position of `ids`.  [T, V]"""
    from conftest import hf_logits

    logits = hf_logits(hf, ids).astype(np.float64)
    return logits - logits.max(-1, keepdims=True) - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                                        keepdims=True))


def top(row, n):
    return sorted(range(len(row)), key=lambda i: (-row[i], i))[:n]


# ---- logprobs -----------------------------------------------------------------------------------

def test_chat_logprobs_are_the_reference_log_softmax(served, tiny):
    _, client = served
    llm, hf = tiny
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=3,
                                       extra_body={"return_token_ids": True})
    choice = r.model_dump()["choices"][0]
    prompt, generated = llm.prompt_ids(MESSAGES, chat=True), choice["token_ids"]
    ref = ref_logprobs(hf, prompt + generated)
    content = choice["logprobs"]["content"]
    assert len(content) == len(generated) == 5
    for k, entry in enumerate(content):
        row = ref[len(prompt) + k - 1]
        assert generated[k] == int(np.argmax(row))  # greedy: the reference argmax
        assert entry["logprob"] == pytest.approx(row[generated[k]], abs=1e-4)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx([row[i] for i in top(row, 3)], abs=1e-4)
        assert entry["top_logprobs"][0]["token"] == entry["token"]
    for entry in content:  # a token's text is its bytes (U+FFFD for part of a character)
        assert entry["token"] == bytes(entry["bytes"]).decode("utf-8", errors="replace")

    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, logprobs=True,
                                            top_logprobs=3, stream=True)
    streamed = [e.model_dump() for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert streamed == content


def test_completion_logprobs_with_echo_score_the_prompt(served, tiny):
    """echo + logprobs: the prompt tokens' log-probabilities (the first is null), then the
    generated ones, all transformers'; max_tokens 0 scores the prompt alone."""
    _, client = served
    llm, hf = tiny
    prompt = "a baker had a cat"
    ids = llm.prompt_ids(prompt)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, logprobs=2, echo=True,
                                  extra_body={"return_token_ids": True})
    choice = r.model_dump()["choices"][0]
    assert choice["text"].startswith(prompt)
    lp = choice["logprobs"]
    all_ids = ids + choice["token_ids"]
    ref = ref_logprobs(hf, all_ids)
    assert len(lp["tokens"]) == len(all_ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for t in range(1, len(all_ids)):
        assert lp["token_logprobs"][t] == pytest.approx(ref[t - 1][all_ids[t]], abs=1e-4)
        assert sorted(lp["top_logprobs"][t].values(), reverse=True) == \
            pytest.approx([ref[t - 1][i] for i in top(ref[t - 1], 2)], abs=1e-4)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])

    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, logprobs=2, echo=True, stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.text for c in chunks) == choice["text"]
    assert [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs] == lp["token_logprobs"]

    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, logprobs=0, echo=True)
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(lp["token_logprobs"][:len(ids)], abs=1e-9)


# ---- n, lists of prompts, logit_bias --------------------------------------------------------------

def test_n_choices_are_independent_and_seeded(served, tiny):
    """Choice i samples with seed + i: its first token is the inverse-CDF draw of
    default_rng(seed + i)'s first number over transformers' distribution, and each choice
    equals a request for that seed alone."""
    _, client = served
    llm, hf = tiny
    kwargs = dict(model="tiny", prompt="the sky was", max_tokens=6, temperature=1.0, extra_body={"return_token_ids": True})
    r = client.completions.create(n=3, seed=11, **kwargs).model_dump()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    ids = [c["token_ids"] for c in r["choices"]]
    probs = np.exp(ref_logprobs(hf, llm.prompt_ids("the sky was"))[-1])
    order = np.argsort(-probs, kind="stable")
    for i, choice_ids in enumerate(ids):
        u = np.random.default_rng(11 + i).random()
        assert choice_ids[0] == int(order[np.searchsorted(np.cumsum(probs[order]), u, side="right")])
        alone = client.completions.create(n=1, seed=11 + i, **kwargs).model_dump()["choices"][0]["token_ids"]
        assert alone == choice_ids
    assert len({tuple(i) for i in ids}) > 1
    assert r["usage"]["completion_tokens"] == sum(len(i) for i in ids)


def test_a_list_of_prompts_gives_n_choices_each_in_order(served, tiny):
    _, client = served
    llm, hf = tiny
    prompts = ["a baker had", "the sky was"]
    r = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=3,
                                  extra_body={"return_token_ids": True}).model_dump()
    assert len(r["choices"]) == 4 and [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    for k, c in enumerate(r["choices"]):
        ids = llm.prompt_ids(prompts[k // 2])
        expected = []
        for _ in range(3):  # greedy by the reference
            expected.append(int(np.argmax(ref_logprobs(hf, ids + expected)[-1])))
        assert c["token_ids"] == expected
    assert r["usage"]["prompt_tokens"] == sum(len(llm.prompt_ids(p)) for p in prompts)
    assert r["usage"]["completion_tokens"] == 12


def test_logit_bias_moves_the_greedy_choice(served, tiny):
    _, client = served
    llm, hf = tiny
    ids = llm.prompt_ids("a baker had")
    row = ref_logprobs(hf, ids)[-1]
    best, second = top(row, 2)
    r = client.completions.create(model="tiny", prompt="a baker had", max_tokens=1, logit_bias={str(best): -100},
                                  extra_body={"return_token_ids": True})
    assert r.model_dump()["choices"][0]["token_ids"] == [second]
    forced = int(np.argmin(row))
    r = client.completions.create(model="tiny", prompt="a baker had", max_tokens=3, logit_bias={str(forced): 100},
                                  extra_body={"return_token_ids": True})
    assert r.model_dump()["choices"][0]["token_ids"] == [forced] * 3


# ---- identity, errors, models, logging ------------------------------------------------------------

def test_system_fingerprint_models_and_errors(served, tiny):
    server, client = served
    llm, _ = tiny
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert r.system_fingerprint == server.fingerprint and r.system_fingerprint.startswith("fp_")
    chunks = list(client.completions.create(model="tiny", prompt="a", max_tokens=2, stream=True))
    assert {c.system_fingerprint for c in chunks} == {server.fingerprint}

    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-9", prompt="a", max_tokens=1)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"

    too_long = [5] * (llm.config.max_seq_len + 1)
    for kwargs in (dict(prompt=too_long), dict(prompt="a", max_tokens=llm.config.max_seq_len)):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", **kwargs)
        assert e.value.body["code"] == "context_length_exceeded"

    refused = [  # (call, field named)
        (lambda: client.chat.completions.create(model="tiny", messages=MESSAGES,
                                                response_format={"type": "xml"}), "response_format"),
        (lambda: client.chat.completions.create(model="tiny", messages=MESSAGES, top_logprobs=2), "top_logprobs"),
        (lambda: client.chat.completions.create(model="tiny", messages=MESSAGES, extra_body={"echo": True}), "echo"),
        (lambda: client.completions.create(model="tiny", prompt="a", suffix="b"), "suffix"),
        (lambda: client.completions.create(model="tiny", prompt="a", best_of=3), "best_of"),
        (lambda: client.completions.create(model="tiny", prompt="a", extra_body={"typo_field": 1}), "typo_field"),
    ]
    for call, field in refused:
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.body["param"] == field, e.value.body
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1, user="u1", store=False,
                                       response_format={"type": "text"}, metadata={"a": "b"})
    assert r.usage.completion_tokens == 1  # fields that change nothing are accepted


def test_one_log_line_per_request(served, caplog):
    _, client = served
    with caplog.at_level(logging.INFO, logger="tinyllm.server.access"):
        client.completions.create(model="tiny", prompt="a baker had", max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("nope")
        def lines():  # an earlier test's request may log here too: wait for these two lines themselves
            return [r.getMessage() for r in caplog.records if r.name == "tinyllm.server.access"]

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (
                any(line.startswith("POST /v1/completions 200 ") for line in lines())
                and any(line.startswith("GET /v1/models/nope 404") for line in lines())):
            time.sleep(0.02)
    lines = lines()
    assert any(line.startswith("POST /v1/completions 200 ") and "+2 tokens" in line for line in lines), lines
    assert any(line.startswith("GET /v1/models/nope 404 - tokens") for line in lines), lines

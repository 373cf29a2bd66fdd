"""Generation: greedy tinyllm against `transformers`' greedy `generate` on the real default
model, and the stop rules (EOS lists, stop strings across tokens, max_new_tokens, the
context limit, empty prompts) on a scripted model whose next token is known in advance."""
import numpy as np
import pytest

from tinyllm.config import Config
from tinyllm.errors import ContextOverflowError
from tinyllm.generate import Context, Generation, PromptError, StopRules
from tinyllm.kv_cache import KVCache
from tinyllm.sampler import Sampler

from helpers_generate import SentencePieceStyle, wrap

# ---- a scripted model: it continues a fixed token sequence --------------------------------


class ScriptedModel:
    """Stands in for Model: after position p it predicts `script[p + 1]` (one-hot logits).
    It keeps a real KVCache's bookkeeping, so overflow behaves as in the real model."""

    def __init__(self, script, vocab_size, eos_token_ids=(), max_seq_len=512, filler=5):
        self.script = list(script)
        self.filler = filler
        self.config = Config(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=8, vocab_size=vocab_size,
                             max_seq_len=max_seq_len, eos_token_ids=tuple(eos_token_ids), source="scripted")
        self.forwarded = []  # every block of ids run

    def new_cache(self, capacity=None):
        return KVCache(self.config, min(capacity or self.config.max_seq_len, self.config.max_seq_len), np.float32)

    def forward(self, tokens, cache):
        t = np.asarray(tokens).shape[-1]
        cache.check_room(t)
        self.forwarded.append(list(np.asarray(tokens).reshape(-1)))
        cache.advance(t)
        nxt = self.script[cache.length] if cache.length < len(self.script) else self.filler
        logits = np.full((1, 1, self.config.vocab_size), -10.0, dtype=np.float32)
        logits[0, 0, nxt] = 10.0
        return logits


@pytest.fixture(scope="module")
def tok():
    return wrap(SentencePieceStyle.llama2(), bos_id=1, eos_ids=(2,))


def scripted(tok, prompt, continuation, **kwargs):
    """A model that, given `prompt`, answers `continuation` (a string or token ids)."""
    p = tok.encode(prompt)
    c = tok.encode(continuation) if isinstance(continuation, str) else list(continuation)
    return ScriptedModel(p + c, tok.vocab_size, **kwargs), p, c


def run(model, tok, prompt_ids, **rules):
    gen = Generation(model, tok, prompt_ids, rules=StopRules(**rules))
    pieces = [t.text for t in gen]
    return gen, pieces


# ---- stop rules ----------------------------------------------------------------------------

def test_runs_to_max_new_tokens_counting_new_tokens_only(tok):
    model, p, c = scripted(tok, "a baker had", " a little shop in the old town")
    gen, pieces = run(model, tok, p, max_new_tokens=4)
    assert gen.token_ids == c[:4]
    assert gen.stats.finish_reason == "length" and gen.stats.new_tokens == 4
    assert gen.stats.prompt_tokens == len(p)
    assert "".join(pieces) == gen.text == tok.decode(c[:4])
    assert model.forwarded[0] == p and all(len(f) == 1 for f in model.forwarded[1:])
    assert len(model.forwarded) == 4  # one prefill + 3 decodes: the last token is not fed back


def test_default_eos_ids_from_tokenizer_and_config(tok):
    for eos in (2, 7):  # 2: the tokenizer's EOS; 7: an extra EOS id from the model config
        had = tok.tk.token_to_id("▁had")
        model, p, c = scripted(tok, "a baker", [had, eos, 9, 9], eos_token_ids=(7,))
        gen, pieces = run(model, tok, p, max_new_tokens=10)
        assert gen.token_ids == c[:2] and gen.stats.finish_reason == "eos"
        assert gen.text == tok.decode([had]) == "".join(pieces) == "had"  # the EOS adds no text


def test_explicit_eos_list_replaces_default(tok):
    shop = tok.encode(" shop")[-1]
    model, p, c = scripted(tok, "a baker had", " a little shop in the town")
    gen, _ = run(model, tok, p, max_new_tokens=20, eos_ids=(shop,))
    assert gen.token_ids[-1] == shop and gen.stats.finish_reason == "eos"
    assert gen.text == tok.decode(gen.token_ids[:-1])


@pytest.mark.parametrize("stop", ["shop in", "op i", "p", "town.", "ttle sh"])
def test_stop_strings_across_token_boundaries_are_not_printed(tok, stop):
    text = " a little shop in the old town. The end"
    model, p, c = scripted(tok, "a baker had", text)
    gen, pieces = run(model, tok, p, max_new_tokens=50, stop=[stop, "never-appears"])
    assert gen.stats.finish_reason == "stop"
    assert "".join(pieces) == gen.text == text[:text.index(stop)]
    assert stop not in "".join(pieces)


def test_stop_string_split_across_tokens_really_spans_tokens(tok):
    """Make sure the test above exercises a split: 'op i' is spread over two tokens."""
    ids = tok.encode(" a little shop in the old town.")
    pieces = [tok.decode(ids[:i + 1]) for i in range(len(ids))]
    assert not any("op i" in tok.decode([i]) for i in ids)
    assert any("op i" in p for p in pieces)


def test_text_that_only_starts_a_stop_string_is_released(tok):
    text = " a stack of stars, then STOP and more"
    model, p, _ = scripted(tok, "x", text)
    gen, pieces = run(model, tok, p, max_new_tokens=60, stop=["STOP"])
    assert gen.text == " a stack of stars, then "
    model, p, c = scripted(tok, "x", " a stack of st")
    gen, pieces = run(model, tok, p, max_new_tokens=len(c), stop=["STOP"])
    assert gen.stats.finish_reason == "length" and "".join(pieces) == " a stack of st"  # held 'st' released at the end


def test_max_new_tokens_zero(tok):
    model, p, _ = scripted(tok, "a baker had", " a shop")
    gen, pieces = run(model, tok, p, max_new_tokens=0)
    assert pieces == [] and gen.token_ids == [] and gen.text == ""
    assert gen.stats.finish_reason == "length" and gen.stats.new_tokens == 0
    assert model.forwarded == []  # nothing asked for, nothing computed


def test_empty_prompt_starts_from_bos(tok):
    c = tok.encode("hello there")
    model = ScriptedModel([1] + c, tok.vocab_size)  # after BOS (id 1) it says "hello there"
    gen, _ = run(model, tok, [], max_new_tokens=len(c))
    assert model.forwarded[0] == [1]
    assert gen.token_ids == c and gen.text == "hello there"


def test_empty_prompt_without_bos_is_an_error(tok):
    no_bos = wrap(tok.tk, bos_id=None)
    model, _, _ = scripted(tok, "", " hi")
    with pytest.raises(PromptError, match="empty prompt"):
        Generation(model, no_bos, [], rules=StopRules(max_new_tokens=3))


def test_prompt_at_exactly_the_context_limit(tok):
    model, p, c = scripted(tok, "a baker had a little", " shop in town")
    ctx = Context(model, capacity=len(p))
    gen = Generation(model, tok, p, rules=StopRules(max_new_tokens=10), context=ctx)
    list(gen)
    # the prompt fits; its logits give one token, which then has no room in the cache
    assert gen.token_ids == c[:1] and gen.stats.finish_reason == "context"
    assert gen.text == tok.decode(c[:1])


def test_prompt_over_the_context_limit_is_a_one_line_error(tok):
    model, p, _ = scripted(tok, "a baker had a little", " shop")
    gen = Generation(model, tok, p, rules=StopRules(max_new_tokens=3), context=Context(model, capacity=len(p) - 1))
    with pytest.raises(ContextOverflowError, match=f"prompt has {len(p)} tokens but the context holds {len(p) - 1}"):
        list(gen)


def test_generation_stops_when_the_cache_fills(tok):
    model, p, c = scripted(tok, "a", " baker had a little shop in the old town")
    gen = Generation(model, tok, p, rules=StopRules(max_new_tokens=50), context=Context(model, capacity=len(p) + 3))
    list(gen)
    assert gen.stats.finish_reason == "context" and len(gen.token_ids) == 4


def test_context_reuses_the_common_prefix(tok):
    model, p, c = scripted(tok, "a baker had a little", " shop in the old town and more words")
    ctx = Context(model, capacity=100)
    first = Generation(model, tok, p, rules=StopRules(max_new_tokens=3), context=ctx)
    list(first)
    follow = p + c[:5]
    model.forwarded.clear()
    second = Generation(model, tok, follow, rules=StopRules(max_new_tokens=2), context=ctx)
    list(second)
    # cached: the prompt + the 2 tokens fed back during the first call
    assert second.stats.cached_tokens == len(p) + 2
    assert model.forwarded[0] == follow[len(p) + 2:]
    assert second.token_ids == c[5:7]


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": -1}, {"max_new_tokens": 1.5}, {"stop": [""]}])
def test_bad_rules_name_the_field(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        StopRules(**kwargs)


def test_stats_never_count_prompt_tokens(tok):
    model, p, c = scripted(tok, "a baker had a little shop in the old town", " and then some more words here")
    gen, _ = run(model, tok, p, max_new_tokens=5)
    s = gen.stats
    assert s.new_tokens == 5 and s.prompt_tokens == len(p)
    assert s.ttft_s >= s.prefill_s > 0 and s.decode_s > 0
    assert s.decode_tps == pytest.approx(4 / s.decode_s)
    assert s.prefill_tps == pytest.approx(len(p) / s.prefill_s)
    assert "5 tokens (length)" in s.summary() and "\n" not in s.summary()


# ---- the real default model against transformers ------------------------------------------

CHAT = [{"role": "user", "content": "Tell me a short story about a baker."}]


def hf_greedy(hf_default, ids, n, **kwargs):
    import torch

    model, _ = hf_default
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, temperature=None,
                             top_p=None, top_k=None, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             pad_token_id=2, **kwargs)
    return out[0, len(ids):].tolist()


@pytest.mark.slow
def test_greedy_equals_transformers_generate_on_chat_prompt(tiny_llm, hf_default):
    ids = tiny_llm.prompt_ids(CHAT, chat=True)
    expected = hf_greedy(hf_default, ids, 40)
    done = tiny_llm.chat(CHAT, max_new_tokens=40)
    assert done.prompt_ids == ids
    assert done.token_ids == expected
    assert len(done.token_ids) == 40 and done.finish_reason == "length"
    assert done.text == hf_default[1].decode(expected, skip_special_tokens=True)


@pytest.mark.slow
def test_greedy_with_repetition_penalty_equals_transformers(tiny_llm, hf_default):
    ids = tiny_llm.prompt_ids("The baker had a cat, and the cat had a", chat=False)
    expected = hf_greedy(hf_default, ids, 16, repetition_penalty=1.3)
    assert tiny_llm.generate(ids, max_new_tokens=16, repetition_penalty=1.3).token_ids == expected


@pytest.mark.slow
def test_chat_session_keeps_cache_and_matches_transformers(tiny_llm, hf_default):
    session = tiny_llm.chat_session(system="You are brief.", max_new_tokens=12)
    first = session.send("Name a fruit.")
    list(first)
    second = session.send("Name another one.")
    list(second)
    assert second.stats.cached_tokens > len(first.prompt_ids)  # the first turn was not recomputed
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    # the second turn's prompt as transformers renders it, then greedy from scratch
    _, hf_tok = hf_default
    ids = hf_tok.apply_chat_template(session.messages[:4], add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert second.prompt_ids == ids
    assert second.token_ids == hf_greedy(hf_default, ids, 12)[:len(second.token_ids)]


@pytest.mark.slow
def test_real_prompt_at_exactly_the_context_limit(tiny_llm, hf_default):
    ids = tiny_llm.prompt_ids(CHAT, chat=True)
    gen = tiny_llm.stream(ids, max_new_tokens=10, context=Context(tiny_llm.model, capacity=len(ids)))
    list(gen)
    assert gen.stats.finish_reason == "context"
    assert gen.token_ids == hf_greedy(hf_default, ids, 1)


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(tiny_llm):
    a = tiny_llm.generate("Once upon a time", max_new_tokens=12, temperature=0.9, top_p=0.95, seed=3)
    b = tiny_llm.generate("Once upon a time", max_new_tokens=12, temperature=0.9, top_p=0.95, seed=3)
    assert a.token_ids == b.token_ids
    assert a.text == tiny_llm.tokenizer.decode(a.token_ids)


def test_chat_session_forgets_a_turn_that_does_not_fit_and_keeps_partial_answers(tok):
    from types import SimpleNamespace

    from tinyllm.chat import ChatSession
    from tinyllm.tokenizer import Tokenizer

    chat_tok = Tokenizer(tok.tk, 1, (2,), add_bos=False, source="test",
                         chat_template="{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    model = ScriptedModel(tok.encode("user: hi\n") + tok.encode(" a little shop in the old town"), tok.vocab_size)
    session = ChatSession(SimpleNamespace(model=model, step=model, tokenizer=chat_tok), max_context=40,
                          rules=StopRules(max_new_tokens=10))
    gen = session.send("hi")
    tokens = iter(gen)
    for _ in range(3):
        next(tokens)
    tokens.close()  # the caller stops early (Ctrl-C): the partial answer is kept
    assert len(gen.token_ids) == 3 and gen.text
    assert session.messages[-1] == {"role": "assistant", "content": gen.text}
    with pytest.raises(ContextOverflowError):
        list(session.send("a baker had a little shop in the old town " * 3))
    assert [m["role"] for m in session.messages] == ["user", "assistant"]  # the failed turn is forgotten

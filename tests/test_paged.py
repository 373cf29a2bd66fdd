"""The paged KV cache (kv_cache.py BlockPool / PagedKVCache) on the readable path: the same
logits as a contiguous cache, blocks taken as a sequence grows and given back when it ends,
and the scheduler admitting by free blocks and preempting when the pool runs short, with
every request's tokens those it gets alone."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import load_tiny, make_hf_model
from tinyllm.errors import ContextOverflowError
from tinyllm.generate import StopRules
from tinyllm.kv_cache import BlockPool, KVCache, page_size
from tinyllm.prefix import PrefixCache, block_bytes
from tinyllm.sampler import SamplingParams
from tinyllm.scheduler import Failed, Finished, Observer, Request, Scheduler
from tinyllm.step import ReadableBatch, ReadableStep, paged_pool


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_model(seed=3).save_pretrained(path, safe_serialization=True)
    return load_tiny(path)


def pool_of(model, n_blocks, block, capacity=200, rows=8):
    model.rope.ensure(capacity)
    return BlockPool(model.config, n_blocks, block, capacity, rows, model.dtype, model.xp)


IDS = [int(t) for t in np.random.default_rng(0).integers(3, 128, 150)]


@pytest.mark.parametrize("block", [1, 7, 16, 256])
def test_a_paged_cache_gives_the_logits_of_a_contiguous_one(model, block):
    """A prompt in uneven chunks, then decode steps, beside another sequence: bit-identical
    logits whichever layout holds the keys and values (the blocks are gathered in order)."""
    pool = pool_of(model, 2 * -(-200 // block), block)
    other = pool.new_cache(200)  # a neighbour whose blocks interleave with the sequence's
    paged, flat = pool.new_cache(200), KVCache(model.config, 200, model.dtype)
    for start, end in [(0, 37), (37, 40), (40, 120)]:
        model.forward(np.array([IDS[start:end]]), other)
        a = model.forward(np.array([IDS[start:end]]), paged, last_only=False)
        b = model.forward(np.array([IDS[start:end]]), flat, last_only=False)
        np.testing.assert_array_equal(a, b)
    for t in IDS[120:150]:
        model.decode_batch([t], [other])
        a = model.decode_batch([t], [paged])[0]
        b = model.decode_batch([t], [flat])[0]
        np.testing.assert_array_equal(a, b)
    assert paged.length == flat.length == 150 and paged.allocated >= 150
    np.testing.assert_array_equal(paged.read_positions(3, 140), flat.read_positions(3, 140))
    assert sorted(paged.blocks + other.blocks) == sorted(set(paged.blocks + other.blocks))  # none shared
    assert list(pool.table[paged.row, :len(paged.blocks)]) == paged.blocks


def test_blocks_are_taken_as_a_sequence_grows_and_given_back_when_it_ends(model):
    pool = pool_of(model, 10, 16, capacity=100, rows=2)
    cache = pool.new_cache(1000)
    assert cache.capacity == 100 and cache.blocks == [] and pool.free_blocks == 10
    assert cache.reserve(17) and len(cache.blocks) == 2 and pool.free_blocks == 8
    assert cache.reserve(5) and len(cache.blocks) == 2  # already held
    model.forward(np.array([IDS[:40]]), cache)  # a write past the held blocks takes what it needs
    assert len(cache.blocks) == 3 and cache.nbytes == 3 * pool.block_bytes
    assert cache.reserve(1000) and len(cache.blocks) == 7  # never past the capacity
    second = pool.new_cache(100)
    assert not second.reserve(64) and second.blocks == [] and pool.free_blocks == 3  # nothing taken
    assert not pool.can_take(10) or pool.free_rows == 0
    with pytest.raises(ContextOverflowError, match="rows of the KV cache pool"):
        pool.new_cache(10)
    with pytest.raises(ContextOverflowError, match="pool full"):
        model.forward(np.array([IDS[:64]]), second)
    pool.release(cache)
    assert pool.free_blocks == 10 and pool.free_rows == 1 and cache.pool is None
    assert (pool.table[cache.row] == pool.spare).all()
    pool.release(cache)  # a second release changes nothing
    assert pool.free_blocks == 10 and pool.free_rows == 1
    with pytest.raises(ValueError, match="released"):
        cache.read_positions(0, 1)


def test_a_pool_too_small_for_one_sequence_says_so(model):
    with pytest.raises(ContextOverflowError, match="cannot hold one sequence of 100 positions"):
        pool_of(model, 6, 16, capacity=100)
    c = model.config
    assert paged_pool(model, 4, 100, 7 * block_bytes(c, model.dtype, 16), block=16).n_blocks == 7
    assert page_size(64) == 256 and page_size(128) == 128


# ---- the scheduler over a paged pool -----------------------------------------------------------

class IdsTokenizer:
    bos_id, eos_ids, tk = 1, (), None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


class Counting(Observer):
    def __init__(self):
        self.batch_sizes, self.preemptions = [], 0

    def step(self, batch_size):
        self.batch_sizes.append(batch_size)

    def preempted(self):
        self.preemptions += 1


class PagedStep(ReadableStep):
    """The readable step with its caches in a pool of `blocks` blocks of `block` positions."""

    def __init__(self, model, blocks, block=16):
        super().__init__(model)
        self.blocks, self.block = blocks, block

    def batch(self, max_batch, capacity, kv_bytes=None):
        kv_bytes = self.blocks * block_bytes(self.model.config, self.model.dtype, self.block)
        return ReadableBatch(self.model, capacity, paged_pool(self.model, max_batch, capacity, kv_bytes, self.block))


PROMPTS = [[int(t) for t in np.random.default_rng(20 + i).integers(3, 128, 5 + 9 * i)] for i in range(6)]
PARAMS = [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.9, seed=4), SamplingParams(logprobs=2),
          SamplingParams(repetition_penalty=1.3), SamplingParams(temperature=1.0, top_k=10, seed=5),
          SamplingParams(temperature=0.7, seed=6)]


def run(step, prompts, params, budget=40, max_batch=6, prefix=None, cancel=None):
    observer = Counting()
    sched = Scheduler(step, IdsTokenizer(), max_batch=max_batch, max_queue=len(prompts), max_context=200,
                      observer=observer, prefix_cache=prefix)
    events = [[] for _ in prompts]
    requests = [Request(ids, p, StopRules(max_new_tokens=budget, eos_ids=()), emit=ev.append)
                for ids, p, ev in zip(prompts, params, events)]
    for r in requests:
        sched.submit(r)
    for i in range(20 * budget):
        if all(ev and isinstance(ev[-1], (Finished, Failed)) for ev in events):
            break
        if cancel is not None and cancel[0] == i:
            sched.cancel(requests[cancel[1]])
        sched.run_once()
    return events, sched, observer


def tokens_of(events):
    assert all(isinstance(ev[-1], Finished) for ev in events), [ev[-1] for ev in events]
    return [ev[-1].token_ids for ev in events]


def test_a_short_pool_preempts_and_every_request_gets_its_tokens_alone(model):
    """Six requests that together need ~40 blocks of 16 in a pool of 16: the newest are
    preempted as the others grow, rejoin when blocks are free, compute their ids again, and
    finish with the tokens they get alone (greedy, seeded sampling, penalties)."""
    alone = [tokens_of(run(ReadableStep(model), [p], [s])[0])[0] for p, s in zip(PROMPTS, PARAMS)]
    events, sched, observer = run(PagedStep(model, blocks=16), PROMPTS, PARAMS)
    assert tokens_of(events) == alone
    assert observer.preemptions > 0 and sched.preemptions == observer.preemptions
    pool = sched.rows.pool
    assert pool.free_blocks == pool.n_blocks and pool.free_rows == pool.rows
    assert not sched.running and not sched.preempted


def test_memory_follows_the_lengths_reached(model):
    """Short requests in a pool a fraction of max_batch x max_context: all of them decode in
    the same steps (contiguous caches of the context's length would fit two)."""
    prompts = [p[:6] for p in PROMPTS]
    events, sched, observer = run(PagedStep(model, blocks=26), prompts, PARAMS, budget=8)  # 200 positions: 13 blocks
    assert max(observer.batch_sizes) == 6 and observer.preemptions == 0
    alone = [tokens_of(run(ReadableStep(model), [p], [s], budget=8)[0])[0] for p, s in zip(prompts, PARAMS)]
    assert tokens_of(events) == alone


def test_a_cancelled_request_frees_its_blocks_while_running_or_preempted(model):
    for when in (2, 30):
        events, sched, _ = run(PagedStep(model, blocks=16), PROMPTS, PARAMS, cancel=(when, 5))
        assert events[5][-1].reason == "cancelled"
        assert all(isinstance(ev[-1], Finished) for ev in events)
        pool = sched.rows.pool
        assert pool.free_blocks == pool.n_blocks and pool.free_rows == pool.rows


def test_preemption_with_a_prefix_cache_gives_the_cold_tokens(model):
    system = [int(t) for t in np.random.default_rng(2).integers(3, 128, 70)]
    prompts = [system + p for p in PROMPTS[:4]]
    cold = tokens_of(run(ReadableStep(model), prompts, PARAMS[:4])[0])
    prefix = PrefixCache.for_model(model, 1 << 20)
    events, sched, observer = run(PagedStep(model, blocks=20), prompts, PARAMS[:4], prefix=prefix)
    assert tokens_of(events) == cold
    assert observer.preemptions > 0 and prefix.hit_tokens > 0


# ---- the server's --kv-cache-mb -------------------------------------------------------------------

def test_the_server_admits_by_free_blocks_and_reports_them(tmp_path):
    """A pool of two blocks (each holds a whole sequence of this model's 256-token context):
    four simultaneous requests run two at a time, answer what each answers alone, and
    /metrics shows the pool, all of it free again at the end."""
    # (the readable batch decodes two rows with other roundings than one: texts of a random
    # model agree to the greedy choice, which these short answers do not come near to flipping)
    import threading

    import tinyllm
    from conftest import tiny_checkpoint_dir
    from helpers_serve import http_request, uvicorn_thread
    from tinyllm.server.app import Server
    from tinyllm.server.main import parse_args

    tiny_checkpoint_dir(tmp_path, eos=False)
    llm = tinyllm.load(tmp_path)
    one_block = block_bytes(llm.config, llm.model.dtype, page_size(llm.config.head_dim))
    args = parse_args(["--port", "0", "--log-level", "warning", "--kv-cache-mb", str(2 * one_block / 2**20)])
    server = Server(llm, "tiny", max_batch=4, prefix_cache_mb=0, kv_cache_mb=args.kv_cache_mb)
    server.start(warm_up=False)
    prompts = ["Once upon a time", "The cat", "Hello there, how are", "1 2 3"]
    try:
        with uvicorn_thread(server.app(), args) as http:
            port = http.servers[0].sockets[0].getsockname()[1]

            def ask(prompt, out, i):
                out[i] = http_request(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 24})[2]

            alone = [None] * 4
            for i, p in enumerate(prompts):
                ask(p, alone, i)
            together = [None] * 4
            threads = [threading.Thread(target=ask, args=(p, together, i)) for i, p in enumerate(prompts)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert [r["choices"][0]["text"] for r in together] == [r["choices"][0]["text"] for r in alone]
            text = http_request(port, "GET", "/metrics")[2]
    finally:
        server.stop()
    assert "tinyllm_kv_cache_blocks 2.0" in text and "tinyllm_kv_cache_free_blocks 2.0" in text
    steps, rows = (float(text.split(f"\ntinyllm_batch_size_{k} ")[1].split()[0]) for k in ("count", "sum"))
    assert rows > steps  # some steps ran two sequences (never more: the pool holds two)
    assert "tinyllm_preemptions_total 0.0" in text
    pool = server.scheduler.rows.pool
    assert pool.free_blocks == pool.n_blocks == 2


def test_kv_cache_mb_must_be_positive():
    from tinyllm.server.main import UsageError, check_args, parse_args

    with pytest.raises(UsageError, match="--kv-cache-mb: must be > 0"):
        check_args(parse_args(["--kv-cache-mb", "0"]))


class RowLimitedStep(PagedStep):
    """As the GPU's step: at most `max_rows` rows a step, prompts prefilled in chunks."""

    def batch(self, max_batch, capacity, kv_bytes=None):
        rows = super().batch(max_batch, capacity, kv_bytes)
        rows.max_rows = 12
        return rows


def test_a_round_admits_only_the_rows_the_next_step_takes(model):
    """Six waiting prompts of 5..50 ids and steps of 12 rows: a round admits requests until
    their pending ids fill a step (admitting more would only delay that step), the rest join
    in later rounds as rows free up; every request still gets its tokens alone."""
    alone = [tokens_of(run(ReadableStep(model), [p], [s])[0])[0] for p, s in zip(PROMPTS, PARAMS)]
    observer = Counting()
    sched = Scheduler(RowLimitedStep(model, blocks=64), IdsTokenizer(), max_batch=6, max_queue=6,
                      max_context=200, observer=observer)
    events = [[] for _ in PROMPTS]
    for ids, p, ev in zip(PROMPTS, PARAMS, events):
        sched.submit(Request(ids, p, StopRules(max_new_tokens=40, eos_ids=()), emit=ev.append))
    sched.run_once()
    # 5 + 14 ids pending after two joined: 19 >= 12 rows, so the third waits
    assert [len(s.prompt_ids) for s in sched.running] == [5, 14] and len(sched.waiting) == 4
    assert sched.steps == 1 and [len(s.pending) for s in sched.running] == [0, 7]
    while sched.waiting or sched.running:
        planned, before = sum(len(s.pending) or 1 for s in sched.running), set(sched.running)
        sched.run_once()
        joined = [s for s in sched.running if s not in before]
        assert not joined or planned < 12  # nobody joins a round whose step is already full
        assert sched.steps < 1000
    assert tokens_of(events) == alone


class HorizonStep(ReadableStep):
    """The readable step, recording each step's decoding caches and the horizon it was given."""

    def batch(self, max_batch, capacity, kv_bytes=None):
        steps = self.steps = []

        class Recording(ReadableBatch):
            def step(self, tokens, caches, samplers, histories, n_decode=None, horizon=None):
                steps.append(([id(c) for c in caches[:n_decode]], horizon))
                return super().step(tokens, caches, samplers, histories, n_decode)

        return Recording(self.model, capacity)


def test_the_horizon_is_how_many_more_steps_every_decoding_row_takes(model):
    """The GPU's step queues steps ahead as far as the scheduler's horizon: after a step with
    horizon h, every sequence decoding in it decodes in each of the next h steps (a step
    queued that far is fed the rows it was queued for), and one of them no further (so no
    farther step is given up). Budgets of 3 to 12 tokens, no end-of-sequence id, and a
    context that ends one request before its budget."""
    step = HorizonStep(model)
    budgets, prompts = [3, 12, 11, 9], PROMPTS[:4]
    sched = Scheduler(step, IdsTokenizer(), max_batch=4, max_queue=4, max_context=len(prompts[3]) + 6)
    events = [[] for _ in prompts]
    for ids, budget, ev in zip(prompts, budgets, events):
        sched.submit(Request(ids, SamplingParams(), StopRules(max_new_tokens=budget, eos_ids=()), emit=ev.append))
    while sched.running or sched.waiting:
        sched.run_once()
    assert [ev[-1].reason for ev in events] == ["length", "length", "length", "context"]
    steps = step.steps
    for i, (rows, horizon) in enumerate(steps):
        if not rows:
            continue
        later = [set(r) for r, _ in steps[i + 1:]] + [set()]  # nothing runs after the last step
        assert all(set(rows) <= later[k] for k in range(horizon))
        assert not set(rows) <= later[horizon]

"""Prefix reuse (tinyllm/prefix.py): blocks named by chain hashes, matched from a prompt's
first token, copied into a sequence's cache; reference counts and least-recently-used
eviction within a byte budget; and the scheduler with a shared system prompt, which must
give the tokens of cold runs while computing the shared prompt once."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from conftest import load_tiny, make_hf_model
from tinyllm.config import Config
from tinyllm.generate import StopRules
from tinyllm.kv_cache import KVCache
from tinyllm.prefix import BLOCK, PrefixCache, block_bytes, block_hashes
from tinyllm.sampler import SamplingParams
from tinyllm.scheduler import Failed, Finished, Piece, Request, Scheduler
from tinyllm.step import ReadableBatch, ReadableStep, paged_pool

# ---- blocks, matching, eviction: a small config and caches filled with known numbers -------------

CFG = Config(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=100, max_seq_len=512,
             rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, source="test")


def filled_cache(ids, capacity=256) -> KVCache:
    """A cache holding len(ids) positions whose K/V are a function of (layer, the ids up to the
    position): what a model writes, as far as prefix reuse can tell."""
    cache = KVCache(CFG, capacity, np.float32)
    for p in range(len(ids)):
        value = float(hash(tuple(ids[:p + 1])) % 1000)
        for layer in range(CFG.n_layers):
            cache.k[layer][0, :, p] = value + layer
            cache.v[layer][0, :, p] = -value - layer
    cache.advance(len(ids))
    return cache


def tokens(n, start=10):
    return [start + i % 80 for i in range(n)]


def children(prefix: PrefixCache, block) -> int:
    return sum(b.parent is block for b in prefix.blocks.values())


def assert_no_pins(prefix: PrefixCache):
    """Every reference a block holds is a child's: no sequence left a block pinned."""
    for b in prefix.blocks.values():
        assert b.refs == children(prefix, b)


def test_chain_hashes_name_a_block_by_everything_before_it():
    a = tokens(100)
    b = a[:40] + [99] + a[41:]  # differs in block 1 only
    ha, hb = block_hashes(a), block_hashes(b)
    assert len(ha) == 100 // BLOCK  # a partial block has no hash
    assert ha[0] == hb[0] and ha[1] != hb[1]
    assert ha[2] != hb[2]  # block 2's tokens are equal, but it follows another prefix
    assert block_hashes(a[:64]) == ha[:2] and block_hashes(a[:31]) == []


def test_store_then_match_and_load_copies_the_prefix():
    prefix = PrefixCache(CFG, np, np.float32, budget_bytes=1 << 20)
    a = tokens(100)
    assert prefix.store(a, filled_cache(a)) == 3 and len(prefix) == 3
    assert prefix.bytes == 3 * prefix.block_bytes
    assert prefix.store(a, filled_cache(a)) == 0  # already held
    want = filled_cache(a + [7, 8])
    for ids, n in ((a + [7, 8], 96), (a, 96), (a[:64], 63), (a[:33], 32), (a[:32], 31), (a[:40] + [99] + a[41:], 32),
                   ([5] + a, 0), (a[:1], 0)):
        cache = KVCache(CFG, 256, np.float32)
        assert prefix.reuse(ids, cache) == n
        assert cache.length == n
        for layer in range(CFG.n_layers):
            np.testing.assert_array_equal(cache.k[layer][0, :, :n], want.k[layer][0, :, :n])
            np.testing.assert_array_equal(cache.v[layer][0, :, :n], want.v[layer][0, :, :n])
            assert not cache.k[layer][0, :, n:].any()
    assert_no_pins(prefix)
    assert prefix.lookups == 8 and prefix.hit_tokens == 96 + 96 + 63 + 32 + 31 + 32


def test_store_extends_a_held_chain_and_keeps_only_what_the_cache_holds():
    prefix = PrefixCache(CFG, np, np.float32, budget_bytes=1 << 20)
    a = tokens(200)
    assert prefix.store(a[:70], filled_cache(a[:70])) == 2
    cache = filled_cache(a)
    cache.trim(200 - 130)  # only 130 positions are written
    assert prefix.store(a, cache) == 2  # blocks 2 and 3, chained after the two held
    n, blocks = prefix.match(a)
    assert n == 128 and [b.parent for b in blocks] == [None] + blocks[:-1]
    prefix.release(blocks)
    assert_no_pins(prefix)


def test_eviction_takes_least_recently_used_leaves_and_spares_pinned_blocks():
    prefix = PrefixCache(CFG, np, np.float32, budget_bytes=0)
    prefix.budget = 4 * prefix.block_bytes
    a, b, c = tokens(64), tokens(64, start=20), tokens(64, start=30)
    prefix.store(a, filled_cache(a))
    prefix.store(b, filled_cache(b))
    assert len(prefix) == 4 and prefix.evicted == 0
    prefix.reuse(a + [1], KVCache(CFG, 256, np.float32))  # a is used again: b is the least recent
    prefix.store(c, filled_cache(c))
    assert prefix.evicted == 2 and prefix.bytes <= prefix.budget
    # b's leaf went first, then b's first block (a leaf once its child had gone)
    assert prefix.match(b + [1]) == (0, [])
    n, held = prefix.match(a + [1])
    assert n == 64
    prefix.release(held)
    assert_no_pins(prefix)
    # pinned blocks (matched, not yet loaded) are not evicted: a store that needs them stops
    a_n, a_blocks = prefix.match(a + [1])
    c_n, c_blocks = prefix.match(c + [1])
    assert a_n == c_n == 64
    d = tokens(64, start=40)
    assert prefix.store(d, filled_cache(d)) == 0 and len(prefix) == 4
    prefix.release(a_blocks)
    assert prefix.store(d, filled_cache(d)) == 2  # a's two blocks (a leaf, then its parent) make room
    assert prefix.match(a + [1]) == (0, [])
    prefix.release(c_blocks)
    assert_no_pins(prefix)


def test_bytes_stay_within_the_budget_over_many_distinct_prompts():
    prefix = PrefixCache(CFG, np, np.float32, budget_bytes=0)
    prefix.budget = 10 * prefix.block_bytes + prefix.block_bytes // 2
    rng = np.random.default_rng(0)
    for _ in range(60):
        ids = [int(t) for t in rng.integers(0, 100, int(rng.integers(20, 150)))]
        cache = KVCache(CFG, 256, np.float32)
        prefix.reuse(ids, cache)
        prefix.store(ids, filled_cache(ids))
        assert prefix.bytes == sum(b.nbytes for b in prefix.blocks.values()) <= prefix.budget
        assert_no_pins(prefix)
    assert prefix.evicted > 0 and len(prefix) == 10
    prefix.clear()
    assert len(prefix) == 0 and prefix.bytes == 0
    small = PrefixCache(CFG, np, np.float32, budget_bytes=prefix.block_bytes - 1)  # not one block fits
    assert small.store(tokens(100), filled_cache(tokens(100))) == 0 and small.bytes == 0


def test_a_chain_is_held_only_if_it_fits_beside_the_pinned_blocks():
    prefix = PrefixCache(CFG, np, np.float32, budget_bytes=0)
    prefix.budget = 3 * prefix.block_bytes
    a, b = tokens(64), tokens(96, start=20)
    prefix.store(a, filled_cache(a))
    keys = block_hashes(b)
    assert prefix.can_hold(keys) and not prefix.can_hold(keys + block_hashes(tokens(32, start=30)))
    n, pinned = prefix.match(a + [1])  # a's two blocks cannot be evicted until they are loaded
    assert n == 64 and prefix.can_hold(keys[:1]) and not prefix.can_hold(keys[:2])
    assert prefix.can_hold(block_hashes(a + tokens(32, start=30)))  # a's own chain: its blocks are counted once
    prefix.release(pinned)
    assert prefix.can_hold(keys) and not prefix.pinned
    assert not PrefixCache(CFG, np, np.float32, budget_bytes=prefix.block_bytes - 1).can_hold(keys[:1])


def traced(f) -> tuple[int, int]:
    """Run f -> (the most bytes it had allocated at once, the bytes still allocated after it),
    counting NumPy's arrays (NumPy reports its allocations to tracemalloc)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        f()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        if started:
            tracemalloc.stop()
    return peak - before, after - before


def test_store_and_load_copy_a_block_at_a_time():
    """However long the prompt, storing and loading it take no temporary larger than a block:
    room is made before a block is allocated, and each block is copied straight between the
    cache's layers and its own array. (Wider than CFG, so that a block outweighs the Python
    objects a prompt's ids and hashes take.)"""
    wide = Config(dim=64, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=64, vocab_size=100, max_seq_len=2048,
                  rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, source="test")
    ids = tokens(40 * BLOCK)
    cache = KVCache(wide, len(ids), np.float32)
    rng = np.random.default_rng(0)
    for a in cache.k + cache.v:
        a[...] = rng.standard_normal(a.shape)
    cache.advance(len(ids))
    one = PrefixCache(wide, np, np.float32, budget_bytes=0)
    block = one.budget = one.block_bytes  # room for the first block alone
    peak, kept = traced(lambda: one.store(ids, cache))
    assert len(one) == 1 and kept >= block and peak <= 1.25 * block
    prefix = PrefixCache(wide, np, np.float32, budget_bytes=1 << 30)
    peak, kept = traced(lambda: prefix.store(ids, cache))
    assert len(prefix) == 40 and kept >= 40 * block and peak - kept <= block // 4
    into = KVCache(wide, len(ids), np.float32)
    n, blocks = prefix.match(ids)
    peak, _ = traced(lambda: prefix.load(blocks, into, n))
    assert n == len(ids) - 1 and peak <= block // 4
    for got, want in zip(into.k + into.v, cache.k + cache.v):
        np.testing.assert_array_equal(got[0, :, :n], want[0, :, :n])
        assert not got[0, :, n:].any()
    assert_no_pins(prefix)


def test_a_block_in_the_cache_dtype_and_layout():
    prefix = PrefixCache(CFG, np, np.float16, budget_bytes=1 << 20)
    cache = KVCache(CFG, 64, np.float16)
    cache.k[1][0, 1, 5, 3] = 2.5
    cache.v[0][0, 0, 31, 0] = -1.5
    cache.advance(40)
    prefix.store(list(range(40)), cache)
    (b,) = prefix.blocks.values()
    assert b.kv.dtype == np.float16 and b.kv.shape == (2 * CFG.n_layers, CFG.n_kv_heads, BLOCK, CFG.head_dim)
    assert b.kv[1, 1, 5, 3] == 2.5 and b.kv[CFG.n_layers + 0, 0, 31, 0] == -1.5
    assert b.nbytes == prefix.block_bytes


# ---- the scheduler with a tiny random model ----------------------------------------------------------

class IdsTokenizer:
    """Just enough of a tokenizer for the scheduler: ids become their decimal text."""
    bos_id, eos_ids, tk = 1, (), None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


class CountingBatch(ReadableBatch):
    """The readable batched step, counting the prompt rows that run through the model."""

    def __init__(self, model, capacity):
        super().__init__(model, capacity)
        self.prompt_rows = 0

    def step(self, tokens, caches, samplers, histories, n_decode=None, horizon=None):
        self.prompt_rows += len(caches) - (len(caches) if n_decode is None else n_decode)
        return super().step(tokens, caches, samplers, histories, n_decode)


class CountingStep(ReadableStep):
    def batch(self, max_batch, capacity, kv_bytes=None):
        self.counting = CountingBatch(self.model, capacity)
        return self.counting


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_model(seed=5).save_pretrained(path, safe_serialization=True)
    return load_tiny(path)


SYSTEM = [1] + [int(t) for t in np.random.default_rng(1).integers(3, 128, 75)]  # 76 tokens: 2 blocks + 12
QUESTIONS = [[int(t) for t in np.random.default_rng(10 + i).integers(3, 128, 3 + 2 * i)] for i in range(5)]
PARAMS = [SamplingParams(logprobs=2), SamplingParams(temperature=0.9, top_p=0.9, seed=4), SamplingParams(logprobs=2),
          SamplingParams(repetition_penalty=1.3), SamplingParams(temperature=1.0, top_k=10, seed=5)]


def run(step, prompts, params, prefix=None, budget=10, observer=None, max_batch=8):
    """Submit every prompt at once and run the scheduler until each has ended -> (events, scheduler)."""
    sched = Scheduler(step, IdsTokenizer(), max_batch=max_batch, max_queue=len(prompts), max_context=160,
                      prefix_cache=prefix, observer=observer)
    events = [[] for _ in prompts]
    for ids, p, ev in zip(prompts, params, events):
        sched.submit(Request(ids, p, StopRules(max_new_tokens=budget, eos_ids=()), emit=ev.append))
    for _ in range(20 * budget):
        if all(ev and isinstance(ev[-1], (Finished, Failed)) for ev in events):
            break
        sched.run_once()
    return events, sched


def logprobs(ev):
    return [p.logprob.logprob for p in ev if isinstance(p, Piece) and p.logprob is not None]


def test_a_shared_system_prompt_is_computed_once_and_changes_no_token(model):
    prompts = [SYSTEM + q for q in QUESTIONS]
    cold_step = CountingStep(model)
    cold, _ = run(cold_step, prompts, PARAMS)
    alone = [run(ReadableStep(model), [p], [s])[0][0] for p, s in zip(prompts, PARAMS)]
    warm_step = CountingStep(model)
    prefix = PrefixCache.for_model(model, 1 << 20)
    warm, sched = run(warm_step, prompts, PARAMS, prefix)
    for c, w, a in zip(cold, warm, alone):
        assert isinstance(w[-1], Finished) and w[-1].token_ids == c[-1].token_ids == a[-1].token_ids
        np.testing.assert_allclose(logprobs(w), logprobs(c), rtol=0, atol=1e-4)
    # the first request computes the system prompt; the others wait for it, then copy 64 of its tokens
    shared = 2 * BLOCK
    assert cold_step.counting.prompt_rows == sum(map(len, prompts))
    assert warm_step.counting.prompt_rows == sum(map(len, prompts)) - shared * (len(prompts) - 1)
    assert prefix.hit_tokens == shared * (len(prompts) - 1)
    assert prefix.miss_tokens == warm_step.counting.prompt_rows and prefix.lookups == len(prompts)
    assert len(prefix) == 2 and prefix.stored == 2  # the questions are shorter than a block
    assert_no_pins(prefix)
    assert not sched.running and not sched.waiting


def test_identical_prompts_and_a_later_chat_turn_reuse_all_but_their_last_block(model):
    """n choices of one prompt: each after the first copies every whole block; a next turn
    (the prompt, an answer, a new question) copies the first turn's blocks."""
    prompt = SYSTEM + QUESTIONS[4]  # 87 tokens: 2 whole blocks
    prefix = PrefixCache.for_model(model, 1 << 20)
    params = [SamplingParams(temperature=0.8, seed=s) for s in range(3)]
    warm, _ = run(CountingStep(model), [prompt] * 3, params, prefix)
    cold, _ = run(ReadableStep(model), [prompt] * 3, params)
    assert [e[-1].token_ids for e in warm] == [e[-1].token_ids for e in cold]
    assert prefix.hit_tokens == 2 * 64
    second = prompt + warm[0][-1].token_ids + QUESTIONS[1]  # 87 + 10 + 5 tokens: 3 whole blocks, 2 held
    step = CountingStep(model)
    again, _ = run(step, [second], [SamplingParams()], prefix)
    assert again[0][-1].token_ids == run(ReadableStep(model), [second], [SamplingParams()])[0][0][-1].token_ids
    assert prefix.hit_tokens == 2 * 64 + 64 and step.counting.prompt_rows == len(second) - 64
    assert_no_pins(prefix)


def test_a_tight_budget_evicts_and_still_gives_the_cold_tokens(model):
    rng = np.random.default_rng(3)
    prompts = [[1] + [int(t) for t in rng.integers(3, 128, int(n))] for n in rng.integers(40, 120, 12)]
    prefix = PrefixCache.for_model(model, 0)
    prefix.budget = 5 * prefix.block_bytes
    params = [SamplingParams()] * len(prompts)
    warm, _ = run(ReadableStep(model), prompts + prompts[:3], params * 2, prefix, budget=4, max_batch=3)
    cold, _ = run(ReadableStep(model), prompts + prompts[:3], params * 2, budget=4, max_batch=3)
    assert [e[-1].token_ids for e in warm] == [e[-1].token_ids for e in cold]
    assert prefix.evicted > 0 and prefix.bytes <= prefix.budget
    assert_no_pins(prefix)


class RowsBatch(ReadableBatch):
    """As the GPU's batched step holds its caches: paged, in blocks of one pool that sequences
    take as they grow and give back, and at most `max_rows` rows per step (a prompt is
    prefilled in chunks)."""

    max_rows = 6

    def __init__(self, model, max_batch, capacity):
        # room for 3 sequences of 160 positions in blocks of 16 (a prefix block spans two)
        super().__init__(model, capacity, paged_pool(model, max_batch, capacity, 30 * block_bytes(
            model.config, model.dtype, 16), block=16))


class RowsStep(ReadableStep):
    def batch(self, max_batch, capacity, kv_bytes=None):
        self.rows = RowsBatch(self.model, max_batch, capacity)
        return self.rows


def test_paged_caches_and_prompts_in_chunks(model):
    """Prefixes copied into paged caches (blocks of one pool, as on the GPU), prompts prefilled
    a few rows per step, blocks and rows reused by later requests: the cold tokens."""
    prompts = [SYSTEM + q for q in QUESTIONS] * 2
    params = PARAMS * 2
    prefix = PrefixCache.for_model(model, 1 << 20)
    step = RowsStep(model)
    warm, _ = run(step, prompts, params, prefix, max_batch=3)
    cold, _ = run(RowsStep(model), prompts, params, max_batch=3)
    for w, c in zip(warm, cold):
        assert w[-1].token_ids == c[-1].token_ids
    assert prefix.hit_tokens == 2 * BLOCK * (len(prompts) - 1)
    pool = step.rows.pool
    assert pool.free_rows == 3 and pool.free_blocks == pool.n_blocks
    assert_no_pins(prefix)


def test_a_failure_while_loading_a_prefix_fails_that_request_alone(model):
    """The third request's cache breaks as the prefix is copied into it (after the copy, as
    the position moves): that request fails, the others give their cold tokens, and the
    blocks it had matched are not left pinned."""
    def broken(n):
        raise RuntimeError("the copy broke")

    class VictimBatch(ReadableBatch):
        def new_cache(self, positions):
            cache = super().new_cache(positions)
            made.append(cache)
            if len(made) == 3:
                cache.advance = broken
            return cache

    class VictimStep(ReadableStep):
        def batch(self, max_batch, capacity, kv_bytes=None):
            return VictimBatch(self.model, capacity)

    made = []
    prefix = PrefixCache.for_model(model, 1 << 20)
    prompts = [SYSTEM + q for q in QUESTIONS]
    events, sched = run(VictimStep(model), prompts, PARAMS, prefix)
    cold, _ = run(ReadableStep(model), prompts, PARAMS)
    assert isinstance(events[2][-1], Failed) and "the copy broke" in events[2][-1].message
    assert not any(isinstance(e, Piece) for e in events[2])
    for i in (0, 1, 3, 4):
        assert events[i][-1].token_ids == cold[i][-1].token_ids
    assert_no_pins(prefix)
    assert not sched.running


class FailingNumPy:
    """NumPy, except that the allocations (`empty`) numbered in `failing` raise MemoryError."""

    def __init__(self, failing):
        self.failing, self.calls = set(failing), 0

    def __getattr__(self, name):
        return getattr(np, name)

    def empty(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.failing:
            raise MemoryError("no room on the device")
        return np.empty(*args, **kwargs)


def test_a_failure_while_storing_skips_the_block_and_a_cancel_ends_that_request_alone(model):
    """The first prompt's second block cannot be allocated: it is not stored, and the request
    whose prompt it is goes on with its cold tokens. The next request copies the first block
    and computes (and stores) the second; the last two wait for it and copy both."""
    prompts = [SYSTEM + q for q in QUESTIONS[:4]]
    prefix = PrefixCache(model.config, FailingNumPy({2}), model.dtype, 1 << 20)
    params = [SamplingParams()] * 4
    sched = Scheduler(ReadableStep(model), IdsTokenizer(), max_batch=4, max_queue=4, max_context=160,
                      prefix_cache=prefix)
    events = [[] for _ in prompts]
    requests = [Request(ids, p, StopRules(max_new_tokens=8, eos_ids=()), emit=ev.append)
                for ids, p, ev in zip(prompts, params, events)]
    for r in requests:
        sched.submit(r)
    sched.run_once()  # the first prompt is prefilled; its first block is stored, its second fails
    assert prefix.stored == 1 and prefix.store_failures == 1 and len(sched.running) == 1
    sched.run_once()  # the second joins with the first block; the others wait for its second
    assert prefix.stored == 2 and [len(e) for e in events] == [2, 1, 0, 0]
    sched.run_once()  # they join with both
    sched.cancel(requests[2])
    for _ in range(20):
        sched.run_once()
    cold, _ = run(ReadableStep(model), prompts, params, budget=8)
    assert events[2][-1].reason == "cancelled"
    for i in (0, 1, 3):
        assert not any(isinstance(e, Failed) for e in events[i])
        assert events[i][-1].token_ids == cold[i][-1].token_ids
    assert prefix.hit_tokens == BLOCK + 2 * 2 * BLOCK
    assert prefix.stored == 2 and prefix.store_failures == 1 and prefix.bytes == 2 * prefix.block_bytes
    assert_no_pins(prefix)
    assert not prefix.pinned
    assert not sched.running and not sched.waiting


def test_a_budget_too_small_for_a_block_holds_no_request_back(model):
    """Waiting for a block that the cache cannot keep would be waiting for nothing: the
    requests take the steps they take without a cache, and give its tokens."""
    prompts = [SYSTEM + q for q in QUESTIONS]
    cold, cold_sched = run(ReadableStep(model), prompts, PARAMS)
    for budget in (1, PrefixCache.for_model(model, 0).block_bytes - 1):
        prefix = PrefixCache.for_model(model, budget)
        warm, sched = run(ReadableStep(model), prompts, PARAMS, prefix)
        assert sched.steps <= cold_sched.steps
        assert [e[-1].token_ids for e in warm] == [e[-1].token_ids for e in cold]
        assert len(prefix) == 0 and prefix.hit_tokens == 0


def test_metrics_report_the_prefix_cache(model):
    pytest.importorskip("prometheus_client")
    from tinyllm.server.metrics import Metrics

    class Holder:  # Metrics reads the scheduler's gauges when scraped
        prefix, queue_depth, batch_size, rows = None, 0, 0, None

    holder = Holder()
    holder.prefix = PrefixCache.for_model(model, 1 << 20)
    metrics = Metrics(holder)
    prompts = [SYSTEM + q for q in QUESTIONS[:3]]
    run(ReadableStep(model), prompts, PARAMS[:3], holder.prefix, observer=metrics)
    text = metrics.text().decode()

    def value(name):
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        return float(line.split()[1])

    assert value("tinyllm_prefix_cache_hit_tokens_total") == 2 * 64
    assert value("tinyllm_prefix_cache_miss_tokens_total") == sum(map(len, prompts)) - 2 * 64
    assert value("tinyllm_prefix_cache_blocks") == 2
    assert value("tinyllm_prefix_cache_bytes") == 2 * holder.prefix.block_bytes
    assert value("tinyllm_prefix_cache_budget_bytes") == 1 << 20
    assert value("tinyllm_prefix_cache_stored_blocks_total") == 2
    assert value("tinyllm_prefix_cache_evicted_blocks_total") == 0
    assert value("tinyllm_prefix_cache_store_failures_total") == 0
    holder.prefix = None
    assert "tinyllm_prefix_cache_blocks 0.0" in Metrics(holder).text().decode()


def test_the_server_flag():
    pytest.importorskip("uvicorn")
    from tinyllm.cli import UsageError
    from tinyllm.server.main import check_args, parse_args

    assert parse_args(["-m", "x"]).prefix_cache_mb == 256
    assert parse_args(["-m", "x", "--prefix-cache-mb", "0"]).prefix_cache_mb == 0
    with pytest.raises(UsageError, match=r"^--prefix-cache-mb: must be >= 0, got -1.0$"):
        check_args(parse_args(["-m", "x", "--prefix-cache-mb", "-1"]))


def test_the_server_refuses_a_budget_under_one_block():
    pytest.importorskip("uvicorn")
    from tinyllm.cli import UsageError
    from tinyllm.server.main import check_prefix_cache_mb

    class Model:  # CFG in float32: a block is 2 * 2 layers * 2 heads * 32 positions * 8 * 4 bytes = 8 KiB
        config, dtype = CFG, np.float32

    with pytest.raises(UsageError, match=r"^--prefix-cache-mb: 0\.005 holds no block of this model's keys and "
                                         r"values; give at least 0\.008 \(one block of 32 tokens\), or 0 for off$"):
        check_prefix_cache_mb(0.005, Model)
    for mb in (0, 0.008, 8 / 1024, 256):
        check_prefix_cache_mb(mb, Model)


def test_load_into_a_row_of_a_batched_cache_writes_that_row_alone():
    prefix = PrefixCache(CFG, np, np.float32, budget_bytes=1 << 20)
    a = tokens(70)
    want = filled_cache(a)
    assert prefix.store(a, want) == 2
    pool = KVCache(CFG, 128, np.float32, batch=3)
    row = pool.row(1)
    assert prefix.reuse(a, row) == 64
    for layer in range(CFG.n_layers):
        for arrays, wanted in ((pool.k, want.k), (pool.v, want.v)):
            np.testing.assert_array_equal(arrays[layer][1, :, :64], wanted[layer][0, :, :64])
            assert not arrays[layer][1, :, 64:].any() and not arrays[layer][[0, 2]].any()

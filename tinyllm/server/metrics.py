"""Prometheus metrics: what a server reports about itself at `GET /metrics`.

Counters only go up (requests by endpoint and status, generations by finish reason,
tokens); histograms count observations into buckets (time to first token, time between
tokens, sequences per decode step, a step's host and model seconds); gauges are read when scraped (queue depth, running
sequences). The scheduler thread reports through the `Observer` interface, the HTTP side
counts requests; prometheus_client is thread-safe, so both write without a lock.

Prefix reuse (tinyllm/prefix.py): each prompt's tokens copied from the prefix cache
(`tinyllm_prefix_cache_hit_tokens_total`) and those computed
(`tinyllm_prefix_cache_miss_tokens_total`), counted per request like the other counters;
the cache's own state (blocks, bytes, budget, blocks stored and evicted) is read from it
when scraped.
"""
from __future__ import annotations

import threading

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from ..scheduler import Finished, Observer


class Metrics(Observer):
    """The server's metrics, in a registry of their own (several servers may share a process)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tinyllm_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finishes = Counter("tinyllm_request_finish", "Generations ended, by finish reason "
                                "(eos, stop, length, context, cancelled)", ["reason"], registry=r)
        self.prompt_tokens = Counter("tinyllm_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("tinyllm_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("tinyllm_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.tpot = StepHistogram("tinyllm_time_per_output_token_seconds", "Between two tokens of one request",
                                  buckets=(.005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56, 5))
        r.register(self.tpot)
        self.batch = Histogram("tinyllm_batch_size", "Sequences in each decode step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        step_buckets = (.0005, .001, .002, .004, .008, .016, .032, .064, .128, .256, 1)
        self.step_host = Histogram("tinyllm_step_host_seconds", "Per scheduler round with a step: time on the "
                                   "host (admission, inputs, host sampling, detokenizing, events)",
                                   buckets=step_buckets, registry=r)
        self.step_model = Histogram("tinyllm_step_model_seconds", "Per scheduler round with a step: time in the "
                                    "model's forward passes (CPU) or waiting for the GPU's step (GPU)",
                                    buckets=step_buckets, registry=r)
        Gauge("tinyllm_queue_depth", "Requests waiting to join the batch",
              registry=r).set_function(lambda: scheduler.queue_depth)
        Gauge("tinyllm_running_requests", "Sequences in the running batch",
              registry=r).set_function(lambda: scheduler.batch_size)
        self.hit_tokens = Counter("tinyllm_prefix_cache_hit_tokens", "Prompt tokens whose keys and values were "
                                  "copied from the prefix cache", registry=r)
        self.miss_tokens = Counter("tinyllm_prefix_cache_miss_tokens", "Prompt tokens computed by the model "
                                   "(not found in the prefix cache)", registry=r)
        self.preemptions = Counter("tinyllm_preemptions", "Running requests taken out of the batch because the "
                                   "paged KV cache ran short of blocks (each rejoins and recomputes its tokens)",
                                   registry=r)
        r.register(PrefixCacheState(scheduler.prefix))
        r.register(KVCacheState(getattr(scheduler.rows, "pool", None)))

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    # Observer: called from the scheduler thread
    def first_token(self, seconds):
        self.ttft.observe(seconds)

    def token_gaps(self, seconds):
        self.tpot.observe_many(seconds)

    def step_time(self, host, model):
        self.step_host.observe(host)
        self.step_model.observe(model)

    def step(self, batch_size):
        self.batch.observe(batch_size)

    def prompt(self, reused, computed):
        self.hit_tokens.inc(reused)
        self.miss_tokens.inc(computed)

    def preempted(self):
        self.preemptions.inc()

    def finished(self, event: Finished):
        self.finishes.labels(event.reason).inc()
        self.prompt_tokens.inc(event.prompt_tokens)
        self.generated_tokens.inc(event.completion_tokens)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class PrefixCacheState:
    """The prefix cache's state, read when scraped (a custom collector: the values live in the
    PrefixCache, which the scheduler thread alone changes; reading a number is safe)."""

    def __init__(self, prefix):
        self.prefix = prefix  # None: no prefix cache, every value 0

    def collect(self):
        p = self.prefix
        yield GaugeMetricFamily("tinyllm_prefix_cache_blocks", "Blocks of prompt prefixes held",
                                value=len(p) if p else 0)
        yield GaugeMetricFamily("tinyllm_prefix_cache_bytes", "Bytes of keys and values the prefix cache holds",
                                value=p.bytes if p else 0)
        yield GaugeMetricFamily("tinyllm_prefix_cache_budget_bytes", "The most bytes the prefix cache may hold "
                                "(--prefix-cache-mb)", value=p.budget if p else 0)
        yield CounterMetricFamily("tinyllm_prefix_cache_stored_blocks", "Blocks stored in the prefix cache",
                                  value=p.stored if p else 0)
        yield CounterMetricFamily("tinyllm_prefix_cache_evicted_blocks", "Blocks evicted from the prefix cache "
                                  "for room (least recently used first)", value=p.evicted if p else 0)
        yield CounterMetricFamily("tinyllm_prefix_cache_store_failures", "Blocks that could not be stored in the prefix "
                                  "cache (allocating or copying one failed: out of memory)",
                                  value=p.store_failures if p else 0)


class KVCacheState:
    """The paged KV cache's blocks, read when scraped (0 where the caches are not paged)."""

    def __init__(self, pool):
        self.pool = pool

    def collect(self):
        p = self.pool
        yield GaugeMetricFamily("tinyllm_kv_cache_blocks", "Blocks of the paged KV cache (--kv-cache-mb)",
                                value=p.n_blocks if p else 0)
        yield GaugeMetricFamily("tinyllm_kv_cache_free_blocks", "Blocks of the paged KV cache no request holds",
                                value=p.free_blocks if p else 0)
        yield GaugeMetricFamily("tinyllm_kv_cache_block_positions", "Positions per block of the paged KV cache",
                                value=p.block if p else 0)


class StepHistogram:
    """A histogram fed a decode step's values at once: the time between tokens is one value
    per sequence per step, and a Histogram.observe per value (a scan of the buckets and two
    locks each) is a noticeable share of the scheduler thread's time per step at tens of
    sequences. Here a step's values take one searchsorted and one lock. Scraped, it reports
    what prometheus_client's Histogram would for the same values: cumulative `le` buckets
    (a value equal to a bound counts in it), +Inf, the count and the sum."""

    def __init__(self, name: str, documentation: str, buckets):
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(sorted(buckets), dtype=np.float64)
        self.counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)  # the last: above every bound
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe_many(self, values) -> None:
        v = np.asarray(values, dtype=np.float64)
        add = np.bincount(np.searchsorted(self.bounds, v, side="left"), minlength=len(self.counts))
        with self.lock:
            self.counts += add
            self.sum += float(v.sum())

    def collect(self):
        with self.lock:
            cumulative, total = np.cumsum(self.counts), self.sum
        buckets = [(floatToGoString(b), float(c)) for b, c in zip(self.bounds, cumulative)]
        buckets.append(("+Inf", float(cumulative[-1])))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)

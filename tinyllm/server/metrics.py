"""Prometheus metrics: what a server reports about itself at `GET /metrics`.

Counters only go up (requests by endpoint and status, generations by finish reason,
tokens); histograms count observations into buckets (time to first token, time between
tokens, sequences per decode step); gauges are read when scraped (queue depth, running
sequences). The scheduler thread reports through the `Observer` interface, the HTTP side
counts requests; prometheus_client is thread-safe, so both write without a lock.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.tpot = Histogram("tinyllm_time_per_output_token_seconds", "Between two tokens of one request",
                              buckets=(.005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56, 5), registry=r)
        self.batch = Histogram("tinyllm_batch_size", "Sequences in each decode step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        Gauge("tinyllm_queue_depth", "Requests waiting to join the batch",
              registry=r).set_function(lambda: scheduler.queue_depth)
        Gauge("tinyllm_running_requests", "Sequences in the running batch",
              registry=r).set_function(lambda: scheduler.batch_size)

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    # Observer: called from the scheduler thread
    def first_token(self, seconds):
        self.ttft.observe(seconds)

    def token_gap(self, seconds):
        self.tpot.observe(seconds)

    def step(self, batch_size):
        self.batch.observe(batch_size)

    def finished(self, event: Finished):
        self.finishes.labels(event.reason).inc()
        self.prompt_tokens.inc(event.prompt_tokens)
        self.generated_tokens.inc(event.completion_tokens)

    def text(self) -> bytes:
        return generate_latest(self.registry)

"""One request never touches another: a failure tied to one sequence (NaN logits in its row,
its client's callback raising) ends that request alone, with an error that names the cause,
and every other request in the batch finishes with exactly the tokens it has alone."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import load_tiny, make_hf_model
from tinyllm.generate import StopRules
from tinyllm.sampler import SamplingParams
from tinyllm.scheduler import Failed, Finished, Piece, Request, Scheduler
from tinyllm.step import ReadableBatch, ReadableStep, sample_rows


class IdsTokenizer:
    """Just enough of a tokenizer for the scheduler: ids become their decimal text."""
    bos_id, eos_ids, tk = 1, (), None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


class PoisonedBatch(ReadableBatch):
    """The readable batched step, except that the row of the `poison`-th cache handed out
    gets NaN logits from the batch's `after`-th step on (as a numerical blow-up would)."""

    def __init__(self, model, capacity, poison, after):
        super().__init__(model, capacity)
        self.poison, self.after, self.steps, self.made = poison, after, 0, []

    def new_cache(self, positions):
        self.made.append(super().new_cache(positions))
        return self.made[-1]

    def step(self, tokens, caches, samplers, histories, n_decode=None, horizon=None):
        """The decode rows as ReadableBatch runs them, but poisoned; the prompts' rows as it does."""
        self.steps += 1
        n = len(caches) if n_decode is None else n_decode
        out = []
        if n:
            logits = np.array(self.model.decode_batch(tokens[:n], caches[:n]))  # [B, V]
            for i, cache in enumerate(caches[:n]):
                if self.steps >= self.after and cache is self.made[self.poison]:
                    logits[i] = np.nan
            out = sample_rows(logits, samplers[:n], histories[:n])
        return out + super().step(tokens[n:], caches[n:], samplers[n:], histories[n:], n_decode=0)


class PoisonStep(ReadableStep):
    def __init__(self, model, poison, after):
        super().__init__(model)
        self.poison, self.after, self.batches = poison, after, []

    def batch(self, max_batch, capacity, kv_bytes=None):
        self.batches.append(PoisonedBatch(self.model, capacity, self.poison, self.after))
        return self.batches[-1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_model(seed=3).save_pretrained(path, safe_serialization=True)
    return load_tiny(path)


PROMPTS = [[1, 5, 9, 13], [1, 7, 7], [1, 20, 30, 40, 50, 60], [1, 3]]
PARAMS = [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.9, seed=4), SamplingParams(repetition_penalty=1.3),
          SamplingParams(temperature=1.0, top_k=10, seed=5)]


def run(step, indices, emit_wrappers=None, budget=12):
    sched = Scheduler(step, IdsTokenizer(), max_batch=len(PROMPTS), max_queue=0, max_context=64)
    events = {i: [] for i in indices}
    requests = {}
    for i in indices:
        emit = events[i].append
        if emit_wrappers and i in emit_wrappers:
            emit = emit_wrappers[i](emit)
        requests[i] = Request(PROMPTS[i], PARAMS[i], StopRules(max_new_tokens=budget, eos_ids=()), emit=emit)
        sched.submit(requests[i])
    for _ in range(4 * budget):
        if all(ev and isinstance(ev[-1], (Finished, Failed)) for ev in events.values()):
            break
        sched.run_once()
    return events, sched


def alone(model, i):
    events, _ = run(ReadableStep(model), [i])
    return events[i][-1].token_ids


def test_nan_logits_in_one_row_end_that_request_alone(model):
    step = PoisonStep(model, poison=2, after=3)  # the third request's row, from the third step on
    # (step 1 prefills every prompt and gives each its first token, step 2 the second token)
    events, sched = run(step, range(4))
    failed = events[2][-1]
    assert isinstance(failed, Failed) and "logits" in failed.message and "NaN" in failed.message
    assert sum(isinstance(e, Piece) for e in events[2]) == 2  # the prefill's token and one decode step
    for i in (0, 1, 3):
        assert isinstance(events[i][-1], Finished)
        assert events[i][-1].token_ids == alone(model, i)
    assert not sched.running


def test_a_failing_client_callback_ends_only_its_request(model):
    def explode_after(n):
        def wrap(emit):
            count = {"pieces": 0}

            def emitting(event):
                if isinstance(event, Piece):
                    count["pieces"] += 1
                    if count["pieces"] > n:
                        raise RuntimeError("the client's connection broke")
                emit(event)
            return emitting
        return wrap

    events, sched = run(ReadableStep(model), range(4), emit_wrappers={1: explode_after(4)})
    assert sum(isinstance(e, Piece) for e in events[1]) == 4
    assert not any(isinstance(e, Finished) for e in events[1])
    for i in (0, 2, 3):
        assert isinstance(events[i][-1], Finished)
        assert events[i][-1].token_ids == alone(model, i)
    assert not sched.running


def test_a_bad_prompt_fails_alone_at_admission(model):
    """A request whose prompt does not fit fails with a one-line error; the others run."""
    sched = Scheduler(ReadableStep(model), IdsTokenizer(), max_batch=4, max_queue=0, max_context=8)
    events = {0: [], 1: []}
    sched.submit(Request(list(range(1, 20)), SamplingParams(), StopRules(max_new_tokens=3, eos_ids=()),
                         emit=events[0].append))
    sched.submit(Request([1, 2], SamplingParams(), StopRules(max_new_tokens=3, eos_ids=()), emit=events[1].append))
    for _ in range(6):
        sched.run_once()
    assert isinstance(events[0][-1], Failed) and "context overflow" in events[0][-1].message
    assert isinstance(events[1][-1], Finished) and len(events[1][-1].token_ids) == 3


def test_a_failure_as_a_request_joins_leaves_nothing_of_it_running(model):
    """The observer fails for the second request to join (after its cache was taken): that
    request fails, its cache goes back, and the batch it did not join runs on unharmed."""
    from tinyllm.scheduler import Observer

    class FailingObserver(Observer):
        def __init__(self):
            self.joined = 0

        def prompt(self, reused, computed):
            self.joined += 1
            if self.joined == 2:
                raise RuntimeError("the metrics broke")

    sched = Scheduler(ReadableStep(model), IdsTokenizer(), max_batch=4, max_queue=0, max_context=64,
                      observer=FailingObserver())
    events = {i: [] for i in range(4)}
    for i in range(4):
        sched.submit(Request(PROMPTS[i], PARAMS[i], StopRules(max_new_tokens=12, eos_ids=()), emit=events[i].append))
    for _ in range(48):
        if all(ev and isinstance(ev[-1], (Finished, Failed)) for ev in events.values()):
            break
        sched.run_once()
    assert isinstance(events[1][-1], Failed) and "the metrics broke" in events[1][-1].message
    for i in (0, 2, 3):
        assert isinstance(events[i][-1], Finished) and events[i][-1].token_ids == alone(model, i)
    assert not sched.running

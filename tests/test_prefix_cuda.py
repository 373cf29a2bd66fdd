"""Prefix reuse on the GPU's fast path: requests sharing a ~500-token prefix give, bit for
bit, the tokens (and log-probabilities) they give without the prefix cache, together or alone.

On the fast path every prompt row is computed by kernels whose result for a row depends only
on its token, its position and the cache below it (not on the other rows of the step, nor on
how the prompt was cut into steps), so keys and values copied from an earlier request equal
those the request would compute itself, and everything after them follows bit for bit.

Marked `gpu`: skipped, saying why, where CuPy or a GPU is missing."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_gpu import gpu_reason

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.gpu_models

pytestmark = pytest.mark.gpu


if gpu_reason():
    pytest.skip(gpu_reason(), allow_module_level=True)

import cupy as cp  # noqa: E402

from benchmarks.gpu_models import random_model  # noqa: E402
from tinyllm.cuda import CudaDecoder, CudaStep  # noqa: E402
from tinyllm.generate import StopRules  # noqa: E402
from tinyllm.prefix import BLOCK, PrefixCache  # noqa: E402
from tinyllm.sampler import SamplingParams  # noqa: E402
from tinyllm.scheduler import Failed, Finished, Piece, Request, Scheduler  # noqa: E402


class _IdsTokenizer:
    """Just enough of a tokenizer for the scheduler: ids become their decimal text."""
    bos_id, eos_ids, tk = 1, (), None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


@pytest.fixture(scope="module", params=["tinyllama-1.1b", "smollm2-135m"])
def cuda_step(request):
    model = random_model(request.param, "cuda", seed=2)
    step = CudaStep(model, decoder=CudaDecoder(model))
    yield step
    step.batch_decoder = None
    del step, model
    cp.get_default_memory_pool().free_all_blocks()


MAX_BATCH = 16
PREFIX = 500
SUFFIXES = (1, 7, 40, 3, 19, 64)
PARAMS = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=3), SamplingParams(logprobs=3),
          SamplingParams(repetition_penalty=1.3), SamplingParams(temperature=1.0, top_k=20, seed=4),
          SamplingParams(min_p=0.05, temperature=0.7, seed=5)]
BUDGETS = [24, 10, 17, 24, 5, 20]


def test_a_shared_500_token_prefix_gives_bit_identical_tokens(cuda_step):
    v = cuda_step.model.config.vocab_size
    rng = np.random.default_rng(21)
    shared = [int(t) for t in rng.integers(2, v, PREFIX)]
    prompts = [shared + [int(t) for t in rng.integers(2, v, n)] for n in SUFFIXES]

    def run(indices, prefix=None):
        """The requests at once through a scheduler on the fast path -> {i: (token ids, logprobs)}."""
        sched = Scheduler(cuda_step, _IdsTokenizer(), max_batch=MAX_BATCH, max_queue=len(prompts), max_context=1024,
                          prefix_cache=prefix)
        events = {i: [] for i in indices}
        for i in indices:
            sched.submit(Request(prompts[i], PARAMS[i], StopRules(max_new_tokens=BUDGETS[i], eos_ids=()),
                                 emit=events[i].append))
        for _ in range(2000):
            if all(ev and isinstance(ev[-1], (Finished, Failed)) for ev in events.values()):
                break
            sched.run_once()
        for i, ev in events.items():
            assert isinstance(ev[-1], Finished), (i, ev[-1])
        assert not sched.running and not sched.waiting
        return {i: (ev[-1].token_ids, [p.logprob.logprob for p in ev if isinstance(p, Piece) and p.logprob])
                for i, ev in events.items()}

    everyone = range(len(prompts))
    cold = run(everyone)
    alone = {i: run([i])[i] for i in everyone}
    prefix = PrefixCache.for_model(cuda_step.model, 256 << 20)
    warm = run(everyone, prefix)
    reused = PREFIX // BLOCK * BLOCK  # the shared prefix's whole blocks
    # the first request computes the prefix, the others wait for it and copy it
    assert prefix.hit_tokens == reused * (len(prompts) - 1)
    assert prefix.miss_tokens == sum(map(len, prompts)) - prefix.hit_tokens
    warm_alone = {i: run([i], prefix)[i] for i in everyone}
    # each request alone with the cache warm: its own whole blocks were stored by the run before
    assert prefix.hit_tokens == reused * (len(prompts) - 1) + sum(min(len(p) // BLOCK * BLOCK, len(p) - 1) for p in prompts)
    assert [len(cold[i][0]) for i in everyone] == BUDGETS
    assert cold[2][1] and len(cold[2][1]) == BUDGETS[2]
    for i in everyone:
        assert warm[i] == cold[i] == alone[i] == warm_alone[i], i
    assert all(b.refs == sum(c.parent is b for c in prefix.blocks.values()) for b in prefix.blocks.values())
    batch = cuda_step.batch_decoder
    assert batch.free_rows == batch.max_batch
    assert prefix.blocks and all(isinstance(b.kv, cp.ndarray) and b.kv.dtype == np.float16
                                 for b in prefix.blocks.values())

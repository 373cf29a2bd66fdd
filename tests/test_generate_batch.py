"""LLM.generate_batch: several prompts decoded together give, prompt by prompt, what each gives alone."""
import pytest

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time, a baker had a", "1, 2, 3, 4,"]


def test_batch_equals_each_prompt_alone(tiny_llm):
    batch = tiny_llm.generate_batch(PROMPTS, max_new_tokens=12)
    assert len(batch) == len(PROMPTS)
    for prompt, got in zip(PROMPTS, batch):
        alone = tiny_llm.generate(prompt, max_new_tokens=12)
        assert got.token_ids == alone.token_ids
        assert got.text == alone.text and got.finish_reason == alone.finish_reason


def test_batch_with_stop_strings_and_seeded_sampling(tiny_llm):
    kwargs = dict(max_new_tokens=16, stop=["\n"], temperature=0.8, top_p=0.9, seed=3)
    batch = tiny_llm.generate_batch(PROMPTS[:2], **kwargs)
    for prompt, got in zip(PROMPTS[:2], batch):
        alone = tiny_llm.generate(prompt, **kwargs)
        assert got.token_ids == alone.token_ids and got.text == alone.text
        assert "\n" not in got.text


def test_more_than_sixteen_sequences_per_gpu_step_is_a_one_line_error(tiny_llm):
    """The GPU's batched step takes up to 16 sequences: a bigger --max-batch is refused by name
    (a stand-in for the CUDA decoder: the check comes before anything touches the GPU)."""
    from tinyllm.errors import ConfigError
    from tinyllm.scheduler import Scheduler
    from tinyllm.step import ReadableStep

    class StandIn(ReadableStep):
        name, max_batch = "the GPU fast path", 16

    with pytest.raises(ConfigError, match=r"^--max-batch: .* up to 16 sequences per step for this model, got 17$"):
        Scheduler(StandIn(tiny_llm.model), tiny_llm.tokenizer, max_batch=17)

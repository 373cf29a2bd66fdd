"""Loading a model: checkpoint files -> Config, Weights on a device, Tokenizer."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import Device, get_device
from .errors import ConfigError
from .loaders import Checkpoint, assemble_weights, read_checkpoint
from .model import Model
from .step import DecodeStep, ReadableStep
from .tokenizer import Tokenizer

DTYPES = {"float32": np.float32, "fp32": np.float32, "float16": np.float16, "fp16": np.float16,
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
QUANTIZED = ("auto", "keep", "dequantize")
FAST_DTYPES = ("float16", "bfloat16")  # the dtypes the CUDA fast path computes in


def bfloat16():
    """NumPy's (and CuPy's) bfloat16 dtype, from the ml_dtypes package: NumPy itself has none."""
    try:
        import ml_dtypes
    except ImportError:
        raise ConfigError("--dtype bfloat16 needs the ml_dtypes package (pip install ml_dtypes)") from None
    return np.dtype(ml_dtypes.bfloat16)


def resolve_dtype(dtype: str | None, device: Device, stored: str | None = None):
    """auto: float32 on the CPU (NumPy has no fast float16 matmul); on the GPU bfloat16 when
    the checkpoint stores all its matrices in it (`stored`, Checkpoint.stored_dtype: Llama-3's
    safetensors, a BF16 GGUF; fp32's range, so no value overflows as it can in fp16; with
    ml_dtypes installed), else float16 (a block-quantized GGUF too: its blocks are kept in
    float16). bfloat16 runs on a GPU only: NumPy has no bfloat16 arithmetic of its own."""
    if dtype is None or dtype == "auto":
        if not device.is_cuda:
            return np.float32
        if stored == "bfloat16":
            try:
                return bfloat16()
            except ConfigError:  # no ml_dtypes: float16, as without the checkpoint's hint
                pass
        return np.float16
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: expected one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    if DTYPES[dtype] == "bfloat16":
        if not device.is_cuda:
            raise ConfigError(f"--dtype {dtype}: bfloat16 runs on a GPU only (NumPy has no bfloat16 arithmetic); "
                              "on the CPU use float32")
        return bfloat16()
    return DTYPES[dtype]


def keeps_quantized(quantized: str, device: Device, dtype, fast_path: bool) -> bool:
    """Whether a GGUF's block-quantized linear weights stay in their blocks (tinyllm.quant)
    rather than being expanded to `dtype` at load. auto keeps them where fused kernels
    multiply the blocks themselves: on a GPU, with the fast path, in float16. Elsewhere the
    readable path would expand every matrix again at every step."""
    if quantized not in QUANTIZED:
        raise ConfigError(f"--quantized: expected one of {', '.join(QUANTIZED)}; got {quantized!r}")
    if quantized == "auto":
        return device.is_cuda and fast_path and np.dtype(dtype) == np.float16
    if quantized == "keep" and device.is_cuda and np.dtype(dtype).name == "bfloat16":
        raise ConfigError("--quantized keep: the kernels that multiply quantized blocks compute in float16; "
                          "use --dtype float16, or --quantized dequantize to expand them to bfloat16")
    return quantized == "keep"


@dataclass
class LLM:
    """A loaded model with its tokenizer and its decode step: what `tinyllm.load` returns.

    `model` computes with the readable operations; `step` (step.py) is what generation and
    the scheduler run: the readable step, or the GPU's fast one, chosen once at load."""

    model: Model
    tokenizer: Tokenizer
    path: Path
    load_seconds: float
    step: DecodeStep | None = None

    def __post_init__(self):
        if self.step is None:
            self.step = ReadableStep(self.model)

    @property
    def config(self):
        return self.model.config

    # ---- generation: see generate.py, sampler.py, chat.py --------------------------------------
    def prompt_ids(self, prompt, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of a prompt: text, a list of ids, or (chat=True) text or a list of messages
        rendered with the checkpoint's chat template."""
        from .chat import build_messages, chat_prompt_ids

        if chat:
            messages = build_messages(prompt, system) if isinstance(prompt, str) else list(prompt)
            if system and not isinstance(prompt, str):
                messages = [{"role": "system", "content": system}] + messages
            return chat_prompt_ids(self.tokenizer, messages)
        if system:
            raise ConfigError("system: a system prompt needs the chat template (chat=True)")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(i) for i in prompt]

    def stream(self, prompt, *, chat: bool = False, system: str | None = None, max_new_tokens: int = 256,
               stop=(), eos_ids=None, context=None, **sampling):
        """A Generation: iterate it for tokens with their text; `.text` and `.stats` afterwards.

        `sampling`: temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
        frequency_penalty, seed (see sampler.SamplingParams); temperature 0 (default) is greedy."""
        from .generate import Generation, StopRules
        from .sampler import Sampler, SamplingParams

        sampler = Sampler(SamplingParams(**sampling))
        rules = StopRules(max_new_tokens, stop, eos_ids)
        return Generation(self.step, self.tokenizer, self.prompt_ids(prompt, chat, system),
                          sampler=sampler, rules=rules, context=context)

    def generate(self, prompt, **kwargs):
        """Generate to the end: a Completion with .text, .token_ids, .finish_reason, .stats.
        Plain text completion; pass chat=True (or use `chat`) for the chat template."""
        return self.stream(prompt, **kwargs).run()

    def chat(self, messages, **kwargs):
        """One chat answer for a user message (str) or a list of {'role', 'content'} messages."""
        return self.stream(messages, chat=True, **kwargs).run()

    def generate_batch(self, prompts, *, chat: bool = False, system: str | None = None, max_new_tokens: int = 256,
                       stop=(), eos_ids=None, **sampling):
        """Generate for several prompts at once (continuous batching, see scheduler.py): one
        decode step serves every unfinished prompt. Returns one Completion per prompt, in order.
        On the CPU each equals what `generate` gives for that prompt alone. On a GPU with the
        fast path each is the same whatever else is in the batch, but the batched kernels round
        differently from the single-sequence ones `generate` uses, so a near-tie may differ."""
        from .generate import Completion, Stats, StopRules
        from .sampler import SamplingParams
        from .scheduler import Failed, Finished, Piece, Request, Scheduler

        params, rules = SamplingParams(**sampling), StopRules(max_new_tokens, stop, eos_ids)
        prompts = list(prompts)
        events = [[] for _ in prompts]
        batch = max(1, len(prompts))
        if self.step.max_batch is not None:  # e.g. the GPU's batched step: the rest wait their turn
            batch = min(batch, self.step.max_batch)
        ids = [self.prompt_ids(prompt, chat, system) for prompt in prompts]
        longest = max((len(i) for i in ids), default=1) + max(max_new_tokens, 1)  # the GPU's cache rows
        scheduler = Scheduler(self.step, self.tokenizer, max_batch=batch, max_queue=max(0, len(prompts) - batch),
                              max_context=longest)
        try:
            for i, prompt_ids in enumerate(ids):
                scheduler.submit(Request(prompt_ids, params, rules, emit=events[i].append))
            while any(not ev or not isinstance(ev[-1], Finished) for ev in events):
                failed = next((ev[-1] for ev in events if ev and isinstance(ev[-1], Failed)), None)
                if failed is not None:
                    raise RuntimeError(failed.message)
                scheduler.run_once()
        finally:
            scheduler.close()  # after an error or an interrupt: the other prompts end too
        results = []
        for ev in events:
            end = ev[-1]
            stats = Stats(prompt_tokens=end.prompt_tokens, new_tokens=end.completion_tokens, finish_reason=end.reason)
            text = "".join(e.text for e in ev if isinstance(e, Piece))
            results.append(Completion(text, end.token_ids, end.reason, stats))
        return results

    def chat_session(self, system: str | None = None, max_context: int | None = None, *,
                     max_new_tokens: int = 256, stop=(), eos_ids=None, **sampling):
        """A multi-turn ChatSession that keeps its KV cache between turns."""
        from .chat import ChatSession
        from .generate import StopRules
        from .sampler import Sampler, SamplingParams

        return ChatSession(self, system, max_context, Sampler(SamplingParams(**sampling)),
                           StopRules(max_new_tokens, stop, eos_ids))


def load_tokenizer(ckpt: Checkpoint) -> Tokenizer:
    c = ckpt.config
    if ckpt.format == "gguf":
        return Tokenizer.from_gguf_fields(ckpt.gguf_fields, str(ckpt.path))
    return Tokenizer.from_dir(ckpt.directory, bos_id=c.bos_token_id, eos_ids=c.eos_token_ids,
                              vocab_size=c.vocab_size)


# Shares of a load's time by phase, for `progress` (measured on the default GGUF model:
# parsing its metadata ~40 %, dequantizing ~45 %, assembling ~15 %; a safetensors file is
# memory-mapped, so converting and copying it is nearly all the work).
_GGUF_OPENED, _GGUF_READ = 0.40, 0.85
_ASSEMBLED = {"gguf": (_GGUF_READ, 0.98), "safetensors": (0.05, 0.95)}  # (start, end) of assembling


def load(path: str | Path | None = None, device: str | Device = "cpu", dtype: str | None = None,
         fast_path: bool = True, progress=None, quantized: str = "auto") -> LLM:
    """Load a checkpoint (None: the embedded default model) onto a device.

    dtype None or "auto": resolve_dtype's choice, from the device and the checkpoint's own type.
    The decode step is chosen here, once: on a GPU in float16 or bfloat16, `fast_path` gives the
    CUDA step (tinyllm/cuda: fused kernels, a decode step captured into a CUDA graph, warmed
    up here so the first request has no cold start); otherwise, or with `fast_path=False`,
    the readable step (the model's forward pass and the host sampler).
    `quantized` ("auto", "keep", "dequantize"): whether a GGUF's block-quantized linear
    weights stay in their blocks on the device; `keeps_quantized` decides auto.
    `progress(fraction)`, if given, is called as loading advances (0 to 1, an estimate:
    each phase is given its usual share of the time)."""
    start = time.perf_counter()
    device = get_device(device)
    requested, dtype = dtype, resolve_dtype(dtype, device)  # a bad flag fails before any reading
    keep = keeps_quantized(quantized, device, dtype, fast_path)
    report = progress or (lambda fraction: None)
    report(0.0)
    # only a GGUF reports while it is read: once per tensor dequantized, after the metadata
    ckpt = read_checkpoint(path, lambda f: report(_GGUF_OPENED + (_GGUF_READ - _GGUF_OPENED) * f), keep)
    if quantized == "keep" and ckpt.format != "gguf":
        raise ConfigError(f"--quantized keep: {ckpt.path} is a {ckpt.format} checkpoint, which holds no "
                          "block-quantized weights (keep applies to GGUF files; use auto or dequantize)")
    dtype = resolve_dtype(requested, device, ckpt.stored_dtype)  # auto follows a bf16 checkpoint on a GPU
    read, assembled = _ASSEMBLED[ckpt.format]
    report(read)
    tokenizer = load_tokenizer(ckpt)
    weights = assemble_weights(ckpt, dtype, device, lambda f: report(read + (assembled - read) * f))
    report(assembled)
    model = Model(ckpt.config, weights, device)
    step = ReadableStep(model)
    if fast_path and device.is_cuda and np.dtype(model.dtype).name in FAST_DTYPES:
        from .cuda import CudaStep

        step = CudaStep(model)
    if device.is_cuda:
        # CuPy compiles each elementwise kernel on first use: run a tiny prefill now so that
        # the first request does not pay for it (the fast path warms its decode step itself).
        # Through the chosen step: on block-quantized weights the readable forward pass would
        # expand every matrix into temporaries several times the blocks' size.
        step.prefill([0, 0], model.new_cache(8))
        device.synchronize()
    report(1.0)
    return LLM(model, tokenizer, ckpt.path, time.perf_counter() - start, step)

"""Block-quantized weights on the GPU: quant.cu's kernels against the readable expansion.

The reference for every kernel here is `QuantizedMatrix.dequantize` (tinyllm/quant.py),
which tests/test_quant.py holds bit-exact to the `gguf` package's dequantizer; where
`gguf` is importable it is checked here directly too. Weights come as GGUF block bytes
(random, with sane float16 scales) or from a real file (tests/data/tiny-q4_k_m.gguf, made
by llama.cpp's quantizer; the default model, Q4_1).

Tolerances: the kernels rebuild a weight in fp16 arithmetic, the readable path in fp32 then
rounds once to fp16; for Q8_0 and Q4_0 both round d * q once (bit-identical), for the others
a scale product is rounded to fp16 first (relative 2^-12 on one weight's scale). The GEMV
then accumulates in fp32 in its own order: relative error ~1e-3, as gemv's.

All tests are marked `gpu` and skip, saying why, where CuPy or a GPU is missing.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_gpu import gemv_cases, gpu_reason

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

pytestmark = pytest.mark.gpu


if gpu_reason():
    pytest.skip(gpu_reason(), allow_module_level=True)

import cupy as cp  # noqa: E402

from tinyllm.cuda import CudaDecoder  # noqa: E402
from tinyllm.cuda import kernels as K  # noqa: E402
from tinyllm.model import Model, Ops  # noqa: E402
from tinyllm.quant import BLOCKS, QuantizedMatrix  # noqa: E402

KINDS = ["q8_0", "q4_0", "q4_1", "q4_k", "q6_k"]
GGUF_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k": "Q4_K", "q6_k": "Q6_K"}
rng = np.random.default_rng(0)
np_ops = Ops(np)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def random_blocks(kind: str, n: int, k: int, seed: int = 0, std: float = 1.0) -> np.ndarray:
    """GGUF block bytes [N, K/block * bytes] of random quants, with float16 scales chosen so a
    row's weights have a standard deviation of about std/sqrt(K)."""
    per_block, nbytes = BLOCKS[kind]
    r = np.random.default_rng(seed)
    raw = r.integers(0, 256, (n, k // per_block, nbytes), dtype=np.uint8)
    target = std / math.sqrt(k)

    def put(offset, values):
        raw[:, :, offset:offset + 2] = np.asarray(values, np.float16).reshape(n, -1, 1).view(np.uint8)

    jitter = r.uniform(0.5, 1.5, (n, k // per_block))
    if kind == "q8_0":
        put(0, target / 73 * jitter)
    elif kind == "q4_0":
        put(0, target / 4.6 * jitter)
    elif kind == "q4_1":
        put(0, target / 4.6 * jitter)
        put(2, -7.5 * target / 4.6 * jitter)
    elif kind == "q4_k":
        put(0, target / (4.6 * 32) * jitter)
        put(2, 7.5 * target / (4.6 * 32) * jitter)
    else:  # q6_k: d at the end of the block
        put(208, target / (18 * 64) * jitter)
    return raw.reshape(n, -1)


def matrix(kind, n, k, seed=0, std=1.0) -> QuantizedMatrix:
    return QuantizedMatrix.from_gguf(random_blocks(kind, n, k, seed, std), kind, n, k).to(cp)


def fits(kind, k) -> bool:
    return k % (256 if kind in ("q4_k", "q6_k") else 32) == 0


# (D, H, K, E, F, V) per shape, as tests/test_cuda.py (vocabularies cut: the shapes of the GEMMs count)
SHAPES = {
    "tinyllama": (2048, 32, 4, 64, 5632, 4096),
    "smollm2": (576, 9, 3, 64, 1536, 4096),
    "llama3-8b": (4096, 32, 8, 128, 14336, 4096),
}
CASES = gemv_cases()  # name: (N, K, epilogue, norm)


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_kernel(kind):
    """The kernel's fp16 weights against the readable expansion (and gguf's, where installed)."""
    n, k = 96, 2048
    raw = random_blocks(kind, n, k, seed=1)
    w = QuantizedMatrix.from_gguf(raw, kind, n, k).to(cp)
    out = K.dequantize_q(w).get().astype(np.float32)
    ref = w.dequantize(np.float32).get()
    if importlib.util.find_spec("gguf") is not None:
        import gguf

        ref_gguf = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, GGUF_TYPES[kind]))
        np.testing.assert_array_equal(ref, np.asarray(ref_gguf, np.float32).reshape(n, k))
    if kind in ("q8_0", "q4_0"):  # d * q rounded once to fp16 by both
        np.testing.assert_array_equal(out, ref.astype(np.float16).astype(np.float32))
    else:  # a scale product rounded to fp16 first: within a few fp16 ulps of the row's largest weights
        err = np.abs(out - ref)
        bound = 2e-3 * np.abs(ref).max(axis=1, keepdims=True)
        assert (err <= bound).all(), f"worst {float((err / bound).max())} of the bound"


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 5, 20])
def test_gemv_q_kernel(shape, case, kind, rows):
    n, k, epi, norm = CASES[case](*SHAPES[shape])
    if not fits(kind, k):
        pytest.skip(f"{kind} needs rows of whole {256 if 'k' in kind[1:] else 32}-weight blocks, K={k}")
    w = matrix(kind, 2 * n if epi == K.EPI_SWIGLU else n, k, seed=2)
    x = (rng.standard_normal((rows, k)) * 2).astype(np.float16)
    nw = (1 + 0.1 * rng.standard_normal(k)).astype(np.float16)
    res = rng.standard_normal((rows, n)).astype(np.float16)
    out = cp.full((rows, 1, n), np.nan, dtype=np.float16)
    K.gemv_q(w, cp.asarray(x)[:, None], out, epilogue=epi, norm_w=cp.asarray(nw) if norm else None, eps=1e-5,
             residual=cp.asarray(res)[:, None] if epi == K.EPI_RESIDUAL else None)
    out = out.get()[:, 0]
    dense = w.dequantize(np.float32).get().astype(np.float64)          # [N, K]: the readable expansion
    h = np_ops.rms_norm(x[:, None], nw, 1e-5)[:, 0] if norm else x     # [B, K]
    y = h.astype(np.float64) @ dense.T
    ref = (np_ops.add(res, y.astype(np.float16)) if epi == K.EPI_RESIDUAL else
           np_ops.swiglu(y.astype(np.float16)) if epi == K.EPI_SWIGLU else y)
    assert np.isfinite(out).all(), "some outputs were not written"
    worst = max(rel_err(o, r) for o, r in zip(out, ref))
    assert worst < 3e-3, worst


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [100, 32001])
def test_gemv_q_rows_past_the_last_tile(kind, n):
    """N not a multiple of the block's 16 rows (a vocabulary of 32001): the last tile's rows
    past N are computed and dropped, every row below N is written and right."""
    k = 2048
    w = matrix(kind, n, k, seed=4)
    x = (rng.standard_normal((9, k)) * 2).astype(np.float16)
    out = cp.full((9, 1, n), np.nan, dtype=np.float16)
    K.gemv_q(w, cp.asarray(x)[:, None], out)
    out = out.get()[:, 0]
    ref = x.astype(np.float64) @ w.dequantize(np.float32).get().astype(np.float64).T
    assert np.isfinite(out).all(), "some outputs were not written"
    assert max(rel_err(o, r) for o, r in zip(out, ref)) < 3e-3


@pytest.mark.parametrize("kind", KINDS)
def test_gemv_q_rows_independent(kind):
    """A token's result, bit for bit, whatever the tokens beside it and however many."""
    n, k = 320, 2048
    w = matrix(kind, n, k, seed=3)
    x = cp.asarray((rng.standard_normal((64, 1, k)) * 2).astype(np.float16))
    res = cp.asarray(rng.standard_normal((64, 1, n)).astype(np.float16))
    nw = cp.asarray((1 + 0.1 * rng.standard_normal(k)).astype(np.float16))
    alone = cp.empty((64, 1, n), dtype=np.float16)
    for i in range(64):
        K.gemv_q(w, x[i:i + 1], alone[i:i + 1], norm_w=nw, eps=1e-5)
    for b in (2, 7, 8, 9, 33, 64):
        out = cp.empty((b, 1, n), dtype=np.float16)
        K.gemv_q(w, x[:b], out, norm_w=nw, eps=1e-5)
        np.testing.assert_array_equal(out.get(), alone[:b].get())
    out = cp.empty((64, 1, n), dtype=np.float16)
    K.gemv_q(w, x, out, epilogue=K.EPI_RESIDUAL, residual=res)
    one = cp.empty((1, 1, n), dtype=np.float16)
    K.gemv_q(w, x[40:41], one, epilogue=K.EPI_RESIDUAL, residual=res[40:41])
    np.testing.assert_array_equal(out[40].get(), one[0].get())


@pytest.mark.parametrize("kind, k", [("q4_0", 4096), ("q4_1", 4096), ("q4_k", 4096), ("q8_0", 4096), ("q4_0", 14336)])
def test_gemv_qs_bits_independent_of_the_grid(kind, k, monkeypatch):
    """gemv_qs's blocks loop over the 16-row tiles (the grid: as many blocks as fit at once):
    a token's bits must not depend on how many blocks share the tiles, here 1, 7 and 200
    against the default grid, for one token and for three."""
    assert K.q_kernel(kind, k) == "gemv_qs"
    n = 8003
    w = matrix(kind, n, k, seed=5)
    x = cp.asarray((rng.standard_normal((3, 1, k)) * 2).astype(np.float16))
    nw = cp.asarray((1 + 0.1 * rng.standard_normal(k)).astype(np.float16))
    refs = {}
    for b in (1, 3):
        refs[b] = cp.empty((b, 1, n), dtype=np.float16)
        K.gemv_q(w, x[:b], refs[b], norm_w=nw, eps=1e-5)
    np.testing.assert_array_equal(refs[3][0].get(), refs[1][0].get())
    for blocks in (1, 7, 200):
        monkeypatch.setattr(K, "qs_blocks", lambda name, tiles, shared, blocks=blocks: min(tiles, blocks))
        for b in (1, 3):
            out = cp.empty((b, 1, n), dtype=np.float16)
            K.gemv_q(w, x[:b], out, norm_w=nw, eps=1e-5)
            np.testing.assert_array_equal(out.get(), refs[b].get(), err_msg=f"{blocks} blocks, {b} tokens")


def quantized_model(kind: str, name="tinyllama-1.1b", n_layers=2, seed=0) -> Model:
    """A random-weight model of a real shape whose linear weights are `kind` blocks."""
    from benchmarks.gpu_models import random_model

    model = random_model(name, "cuda", seed=seed, n_layers=n_layers)
    w = model.weights
    for i, layer in enumerate(w.layers):
        for field in ("wqkv", "wo", "w_gate_up", "w_down"):
            n, k = getattr(layer, field).shape
            setattr(layer, field, matrix(kind, n, k, seed=seed * 1000 + 10 * i + len(field)))
    n, k = w.output.shape
    w.output = matrix(kind, n, k, seed=seed + 99, std=3.0)  # logits a few units apart: clear winners
    return model


@pytest.mark.parametrize("kind", ["q4_k", "q6_k", "q8_0", "q4_1"])
def test_quantized_model_decode(kind):
    """Graph-captured fast decode of a quantized model against the readable forward pass
    (which expands each matrix before it multiplies), teacher-forced along the fast tokens."""
    model = quantized_model(kind)
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, 12)
    decoder = CudaDecoder(model)
    fc = decoder.new_cache(64)
    first = int(cp.argmax(decoder.eager.forward(ids[None], fc)[0, -1]))
    fast = [first] + list(decoder.decode(fc, first, 15))
    # the readable model on the same GPU, teacher-forced along the fast path's tokens
    cache = model.new_cache(64)
    logits = model.forward(ids[None], cache)[0, -1].get()
    clear = 0
    for i, token in enumerate(fast):
        top2 = np.sort(logits)[-2:]
        if top2[1] - top2[0] > 0.05:  # a clear winner must be the fast path's choice
            clear += 1
            assert token == int(np.argmax(logits)), f"step {i}"
        if i + 1 < len(fast):
            logits = model.forward(np.asarray([[token]]), cache)[0, -1].get()
    assert clear >= 8
    # the last step's logits through the fast eager path, against the readable ones
    fc.trim(1)
    out = decoder.eager.forward(np.asarray([[fast[-2]]]), fc)[0, -1].get()
    cache.trim(1)
    ref = model.forward(np.asarray([[fast[-2]]]), cache)[0, -1].get()
    assert rel_err(out, ref) < 3e-2


@pytest.mark.parametrize("kind", ["q4_k", "q4_0"])
def test_quantized_row_bit_identical_alone_and_in_a_batch(kind):
    """Batch invariance with quantized weights: one sequence decoded alone and as one row of
    9 (other rows at other positions, other tokens) gives the same logits, bit for bit."""
    from tinyllm.cuda.batch import BatchDecoder

    model = quantized_model(kind, seed=1)
    decoder = CudaDecoder(model)
    batch = BatchDecoder(decoder, max_batch=16, capacity=512)
    v = model.config.vocab_size
    prompt = np.random.default_rng(20).integers(0, v, 37)

    def prefill(cache, ids):
        decoder.eager.forward(np.asarray([ids]), cache)

    alone = batch.new_cache()
    prefill(alone, prompt)
    feed = np.random.default_rng(21).integers(0, v, 10)
    want = []
    for t in feed:
        batch.step([int(t)], [alone], queue_next=False)
        want.append(batch.logits(1)[0].copy())
    batch.release(alone)
    caches = [batch.new_cache() for _ in range(9)]
    for i, cache in enumerate(caches):
        prefill(cache, prompt if i == 4 else np.random.default_rng(30 + i).integers(0, v, 3 + 17 * i))
    others = np.random.default_rng(22).integers(0, v, (len(feed), 9))
    worst = 0.0
    for step, t in enumerate(feed):
        row = [int(x) for x in others[step]]
        row[4] = int(t)
        batch.step(row, caches, queue_next=False)
        worst = max(worst, float(cp.abs(batch.logits(9)[4] - want[step]).max()))
    for cache in caches:
        batch.release(cache)
    assert worst == 0.0


def test_tiny_kquant_file_keep_vs_dequantize():
    """A real llama.cpp Q4_K_M file (Q4_K, and Q6_K for the LM head and some v/down): kept
    quantized on the GPU, run by the fused kernels, against the same file expanded at load
    and run by the readable forward pass: logits close, clear winners the same."""
    from tinyllm.backend import get_device
    from tinyllm.loaders import assemble_weights, read_checkpoint

    path = Path(__file__).parent / "data" / "tiny-q4_k_m.gguf"
    dev = get_device("cuda")
    kept, dense = (Model(c.config, assemble_weights(c, np.float16, dev), dev)
                   for c in (read_checkpoint(path, keep_quantized=keep) for keep in (True, False)))
    kinds = {m.kind for layer in kept.weights.layers for m in vars(layer).values() if isinstance(m, QuantizedMatrix)}
    assert kinds | {kept.weights.output.kind} >= {"q4_k", "q6_k"}
    decoder = CudaDecoder(kept)
    ids = np.arange(3, 40)[None]
    fc, rc = decoder.new_cache(96), dense.new_cache(96)
    fast = decoder.eager.forward(ids, fc, last_only=False)[0].get()   # the prompt: dequantize_q + cuBLAS
    ref = dense.forward(ids, rc, last_only=False)[0].get()
    assert rel_err(fast, ref) < 3e-2
    tokens = [int(np.argmax(fast[-1]))] + list(decoder.decode(fc, int(np.argmax(fast[-1])), 12))
    logits, clear = ref[-1], 0
    for i, token in enumerate(tokens):
        top2 = np.sort(logits)[-2:]
        if top2[1] - top2[0] > 0.05:
            clear += 1
            assert token == int(np.argmax(logits)), f"step {i}"
        logits = dense.forward(np.asarray([[token]]), rc)[0, -1].get()
    assert clear >= 6

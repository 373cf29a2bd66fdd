"""bfloat16 on the GPU: the kernels' bf16 instantiations and a bf16 model, against torch in
bf16 and against the readable path (model.py's operations on CuPy arrays of ml_dtypes'
bfloat16, matmuls on cuBLAS).

bf16 keeps fp32's exponent range with an 8-bit significand: unit roundoff 3.9e-3, eight
times fp16's. A GEMV with fp32 accumulation rounds once at its output (relative error
~2e-3 in L2, more where an epilogue rounds again); a whole model compounds that over its
layers. The tolerances below are test_cuda.py's scaled by that factor. Every expected value
comes from torch, transformers or NumPy in float32/float64, never from tinyllm's CUDA code.
The fast path's own invariants hold exactly as in fp16: graph replay equals eager, and a
sequence's bits do not depend on its batch.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_gpu import gemv_cases, gpu_reason

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.gpu_models

pytestmark = pytest.mark.gpu

if gpu_reason():
    pytest.skip(gpu_reason(), allow_module_level=True)
ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes (pip install ml_dtypes)")

import cupy as cp  # noqa: E402

from benchmarks.gpu_models import as_torch, host_copy, random_model, shape_config, to_transformers  # noqa: E402
from tinyllm.cuda import CudaDecoder  # noqa: E402
from tinyllm.cuda import kernels as K  # noqa: E402
from tinyllm.model import Model, Ops  # noqa: E402
from tinyllm.rope import rope_tables  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
cp_ops = Ops(cp)
rng = np.random.default_rng(0)


def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here: the torch comparisons need a CUDA build of torch")
    return torch


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def randn(*shape, scale=1.0):
    """Random bf16 values on the GPU."""
    return cp.asarray((rng.standard_normal(shape) * scale).astype(np.float32).astype(BF16))


def f32(a) -> np.ndarray:
    """A CuPy or torch array's values as float32 on the host."""
    if hasattr(a, "detach"):
        return a.detach().float().cpu().numpy()
    return np.asarray(a.get() if hasattr(a, "get") else a).astype(np.float32)


# ---- kernels -------------------------------------------------------------------------------
KERNEL_SHAPES = {  # (D, H, K, E, F, V) as in test_cuda.py
    "tinyllama": (2048, 32, 4, 64, 5632, 32000),
    "llama3-8b": (4096, 32, 8, 128, 14336, 4096),
    "odd_rows": (576, 9, 3, 64, 1000, 1003),
}
GEMV_CASES = gemv_cases()


def _torch_gemv(w, x, nw, res, epi, norm, n):
    """The reference: torch in bf16 where the model rounds (norm output, GEMV output,
    epilogue), the products summed in fp32. x: [B, K] -> [B, n]"""
    torch = torch_cuda()
    wt, xt = as_torch(w), as_torch(x)
    if norm:
        xf = xt.float()
        xt = as_torch(nw) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    y = xt.float() @ wt.float().T
    if epi == K.EPI_RESIDUAL:
        return as_torch(res) + y.bfloat16()
    if epi == K.EPI_SWIGLU:
        return torch.nn.functional.silu(y[:, :n].bfloat16()) * y[:, n:].bfloat16()
    return y.bfloat16()


def _inputs(shape, case, rows):
    n, k, epi, norm = GEMV_CASES[case](*KERNEL_SHAPES[shape])
    w = randn(2 * n if epi == K.EPI_SWIGLU else n, k, scale=1 / math.sqrt(k))
    x = randn(rows, k, scale=2.0)
    nw = cp.asarray((1 + 0.1 * rng.standard_normal(k)).astype(np.float32).astype(BF16))
    res = randn(rows, n)
    return n, k, epi, norm, w, x, nw, res


@pytest.mark.parametrize("shape", list(KERNEL_SHAPES))
@pytest.mark.parametrize("case", list(GEMV_CASES))
@pytest.mark.parametrize("which", ["gemv", "gemv_stream"])
def test_gemv_kernel_bf16(shape, case, which):
    n, k, epi, norm, w, x, nw, res = _inputs(shape, case, 1)
    out = cp.full(n, np.nan, dtype=BF16)  # poisoned: every element must be written
    getattr(K, which)(w, x[0], out, epilogue=epi, norm_w=nw if norm else None, eps=1e-5,
                      residual=res[0] if epi == K.EPI_RESIDUAL else None)
    ref = _torch_gemv(w, x, nw, res, epi, norm, n)[0]
    assert out.dtype == BF16 and np.isfinite(f32(out)).all()
    assert rel_err(f32(out), f32(ref)) < 1.5e-2


@pytest.mark.parametrize("shape", list(KERNEL_SHAPES))
@pytest.mark.parametrize("case", list(GEMV_CASES))
@pytest.mark.parametrize("kernel", ["gemv_rows", "gemm_rows"])
def test_gemv_rows_kernel_bf16_and_a_token_alone_or_in_a_batch(shape, case, kernel):
    """The tensor-core kernels (bf16 mma) against torch for 37 tokens, and token 5's bits
    the same alone as among the 37."""
    n, k, epi, norm, w, x, nw, res = _inputs(shape, case, 37)
    if not K.gemv_rows_fits(n, k, 37):
        pytest.skip(f"K={k} is not a multiple of 64: the batched kernels do not apply (the readable op runs)")
    ws = cp.zeros(K.tile_workspace(n, k, epi, 64) + 1, dtype=cp.float32)
    counters = cp.zeros(K.row_tiles(n), dtype=cp.int32)

    def run(xs, rs):
        out = cp.full((xs.shape[0], n), np.nan, dtype=BF16)
        K.gemv_rows(w, xs, out, epilogue=epi, norm_w=nw if norm else None, eps=1e-5,
                    residual=rs if epi == K.EPI_RESIDUAL else None, workspace=ws, counters=counters,
                    kernel_name=kernel)
        return out

    out = run(x, res)
    ref = _torch_gemv(w, x, nw, res, epi, norm, n)
    assert np.isfinite(f32(out)).all()
    assert rel_err(f32(out), f32(ref)) < 1.5e-2
    alone = run(cp.ascontiguousarray(x[5:6]), cp.ascontiguousarray(res[5:6]))
    assert (alone[0].view(cp.uint16) == out[5].view(cp.uint16)).all()


def test_prompt_kernels_bf16_against_the_readable_ops_and_torch():
    """rms_norm_rows, swiglu_rows and rope_rows (a prompt's element-wise kernels) against the
    readable ops on the same bf16 arrays, and against torch."""
    torch = torch_cuda()
    x, w = randn(5, 2048, scale=3.0), randn(2048, scale=0.1) + cp.asarray(1.0, dtype=BF16)
    out = cp.empty_like(x)
    K.rms_norm_rows(x, w, 1e-5, out)
    readable = cp_ops.rms_norm(x, w, 1e-5)
    xf = as_torch(x).float()
    ref = as_torch(w) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert rel_err(f32(out), f32(readable)) < 4e-3 and rel_err(f32(out), f32(ref)) < 4e-3

    gate_up = randn(5, 2 * 1000, scale=2.0)
    out = cp.empty((5, 1000), dtype=BF16)
    K.swiglu_rows(gate_up, out)
    gt = as_torch(gate_up)
    ref = torch.nn.functional.silu(gt[:, :1000]) * gt[:, 1000:]
    assert rel_err(f32(out), f32(cp_ops.swiglu(gate_up))) < 4e-3 and rel_err(f32(out), f32(ref)) < 8e-3

    t, heads, e = 7, 6, 64
    cos, sin = rope_tables(shape_config("tinyllama-1.1b"), 64, cp)  # head_dim 64
    qk = randn(1, t, heads, e, scale=2.0)
    out = cp.empty_like(qk)
    K.rope_rows(qk, cp.ascontiguousarray(cos[3:3 + t]), cp.ascontiguousarray(sin[3:3 + t]), out)
    readable = cp_ops.rope(qk, cos[3:3 + t], sin[3:3 + t])
    q32, c32, s32 = f32(qk).astype(np.float64), f32(cos[3:3 + t])[None, :, None], f32(sin[3:3 + t])[None, :, None]
    ref = np.concatenate([q32[..., :32] * c32 - q32[..., 32:] * s32, q32[..., 32:] * c32 + q32[..., :32] * s32], -1)
    assert rel_err(f32(out), f32(readable)) < 4e-3 and rel_err(f32(out), ref) < 4e-3


@pytest.mark.parametrize("shape", ["tinyllama", "llama3-8b"])
@pytest.mark.parametrize("length", [1, 300, 2048])
def test_decode_attention_kernel_bf16(shape, length):
    """One token's attention over a bf16 cache (RoPE and the cache write fused in) against
    torch's scaled_dot_product_attention on the same rotated values in fp32."""
    torch = torch_cuda()
    d, h, kv, e, f, v = KERNEL_SHAPES[shape]
    n_rep, capacity, pos = h // kv, 2048, length - 1
    k_cache = cp.zeros((kv, capacity, e), dtype=BF16)
    v_cache = cp.zeros((kv, capacity, e), dtype=BF16)
    k_cache[:, :pos] = randn(kv, pos, e)
    v_cache[:, :pos] = randn(kv, pos, e)
    qkv = randn(h + 2 * kv, e, scale=2.0)
    cos, sin = rope_tables(shape_config("tinyllama-1.1b", dim=h * e, n_heads=h, n_kv_heads=kv), 4096, cp)
    out = cp.full(h * e, np.nan, dtype=BF16)
    scale = 1 / math.sqrt(e)
    positions, slots = cp.full(1, pos, dtype=cp.int32), cp.zeros(1, dtype=cp.int32)
    K.decode_attention(qkv[:h], qkv[h:h + kv], qkv[h + kv:], cos, sin, positions, k_cache, v_cache, scale, True,
                       K.attention_scratch(kv, n_rep, e, capacity), out, n_rep, pdl=False, slots=slots)
    rotated = cp_ops.rope(qkv[None, None, :h + kv], cos[pos:pos + 1], sin[pos:pos + 1])[0, 0]
    assert (k_cache[:, pos].view(cp.uint16) == rotated[h:].view(cp.uint16)).all()  # the new key, as rope_rows rounds it
    assert (v_cache[:, pos].view(cp.uint16) == qkv[h + kv:].view(cp.uint16)).all()
    # torch, rounding the scores to bf16 where the kernel does (as a bf16 matmul would)
    qt = as_torch(rotated[:h]).float().reshape(kv, n_rep, e)                # [K, R, E]
    kt, vt = as_torch(k_cache[:, :pos + 1]).float(), as_torch(v_cache[:, :pos + 1]).float()  # [K, S, E]
    scores = (qt @ kt.transpose(1, 2)).bfloat16().float() * scale          # [K, R, S]
    ref = (torch.softmax(scores, -1) @ vt).reshape(-1)
    assert np.isfinite(f32(out)).all()
    assert rel_err(f32(out), f32(ref)) < 1e-2


# ---- a whole model -----------------------------------------------------------------------------
PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889, 450, 338, 263, 1243]


@pytest.fixture(scope="module", params=["tinyllama-1.1b", "smollm2-135m"])
def bf16_pair(request):
    """(readable CuPy bf16 model, its CudaDecoder) sharing one set of random bf16 weights."""
    model = random_model(request.param, "cuda", seed=1, dtype=BF16)
    readable = Model(model.config, model.weights, model.device)
    decoder = CudaDecoder(model)
    yield readable, decoder
    del decoder, readable
    cp.get_default_memory_pool().free_all_blocks()


def test_readable_bf16_against_transformers_bf16(bf16_pair):
    """The readable path in bf16 against transformers in bf16 (same weights) and against
    NumPy in float32: prompt, then four decode steps."""
    torch = torch_cuda()
    readable, _ = bf16_pair
    steps = [PROMPT] + [[t] for t in (29871, 13, 2, 5000)]
    cache = readable.new_cache(64)
    gpu = [readable.forward(np.array([ids]), cache)[0, -1].get() for ids in steps]
    assert cache.k[0].dtype == BF16 and gpu[0].dtype == np.float32
    hf = to_transformers(readable, dtype=torch.bfloat16)
    all_ids = sum(steps, [])
    with torch.no_grad():
        hf_logits = hf(torch.tensor([all_ids], device="cuda")).logits[0].float().cpu().numpy()
    del hf
    torch.cuda.empty_cache()
    ref_model = Model(readable.config, host_copy(readable.weights), "cpu")
    ref_cache = ref_model.new_cache(64)
    ref = [ref_model.forward(np.array([ids]), ref_cache)[0, -1] for ids in steps]
    hf_at = [hf_logits[len(sum(steps[:i + 1], [])) - 1] for i in range(len(steps))]
    e_hf, e_np = max(rel_err(g, r) for g, r in zip(gpu, hf_at)), max(rel_err(g, r) for g, r in zip(gpu, ref))
    print(f"bf16 readable: rel err vs transformers bf16 {e_hf:.3g}, vs NumPy fp32 {e_np:.3g}")
    assert e_hf < 1e-1 and e_np < 1e-1


def test_readable_bf16_computes_in_bf16(bf16_pair):
    """CuPy lifts a bf16 array combined with a Python float to fp32; the readable ops cast such
    results back, so every matmul of the readable bf16 model takes bf16 inputs (none drifts to
    fp32, which would also convert the weights at every call)."""
    readable, _ = bf16_pair
    seen = []

    class Recording(Ops):
        def linear(self, x, w):
            seen.append(np.dtype(x.dtype).name)
            return super().linear(x, w)

        def add(self, x, y):
            seen.append(np.dtype(x.dtype).name + "+" + np.dtype(y.dtype).name)
            return super().add(x, y)

    model = readable.with_ops(Recording(cp))
    cache = model.new_cache(32)
    model.forward(np.array([PROMPT]), cache)
    model.forward(np.array([[13]]), cache)
    assert seen and set(seen) <= {"bfloat16", "bfloat16+bfloat16"}, sorted(set(seen))


def test_fast_bf16_against_readable_bf16(bf16_pair):
    """Teacher-forced 64 steps: the captured bf16 decode step against the readable bf16 ops,
    and replaying the graph gives the same bits as the fused ops run eagerly."""
    readable, decoder = bf16_pair
    fast = decoder.eager
    tokens = np.random.default_rng(4).integers(0, readable.config.vocab_size, 64)
    r_cache, f_cache, e_cache = readable.new_cache(512), fast.new_cache(512), fast.new_cache(512)
    ids = np.array([PROMPT])
    readable.forward(ids, r_cache), fast.forward(ids, f_cache), fast.forward(ids, e_cache)
    errs, agree, clear, worst = [], 0, 0, 0.0
    for t in tokens:
        ref = readable.forward(np.array([[t]]), r_cache)[0, -1].get()
        replay = decoder.step_logits(f_cache, int(t))
        eager = fast.forward(np.array([[t]]), e_cache)[0, -1]
        worst = max(worst, float(cp.abs(eager - replay).max()))
        out = replay.get()
        errs.append(rel_err(out, ref))
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > 0.2:  # a clear winner: the fast path must pick it too
            clear += 1
            agree += int(np.argmax(out) == np.argmax(ref))
    print(f"bf16 fast vs readable: max rel err {max(errs):.3g}, argmax agree {agree}/{clear}")
    assert f_cache.k[0].dtype == BF16
    assert worst == 0.0
    assert max(errs) < 5e-2
    assert agree == clear and clear > 0


def test_bf16_batch_rows_are_bit_identical_alone_and_in_a_batch(bf16_pair):
    """Batch invariance in bf16: a sequence decoded alone (B = 1 graph) and as row 3 of 6
    gives bit-identical logits at every step."""
    from tinyllm.cuda.batch import BatchDecoder

    readable, decoder = bf16_pair
    batch = BatchDecoder(decoder, max_batch=8, capacity=512)
    fast = decoder.eager
    ids = np.random.default_rng(8).integers(0, readable.config.vocab_size, 200)
    alone = [batch.new_cache()]
    fast.forward(np.array([ids[:40]]), alone[0])
    grouped = [batch.new_cache() for _ in range(6)]
    for cache, n in zip(grouped, [5, 60, 33, 40, 200, 90]):
        fast.forward(np.array([ids[:n]]), cache)
    worst = 0.0
    try:
        for t in np.random.default_rng(10).integers(0, readable.config.vocab_size, 16):
            batch.step([int(t)], alone, queue_next=False)
            a = batch.logits(1)[0].copy()
            batch.step([int(t)] * 6, grouped, queue_next=False)
            worst = max(worst, float(cp.abs(batch.logits(6)[3] - a).max()))
    finally:
        for cache in alone + grouped:
            batch.release(cache)
    assert worst == 0.0


def test_bf16_holds_activations_that_overflow_fp16():
    """The reason for bf16: a model whose residual stream passes fp16's largest value (65504)
    stays finite in bf16 and agrees with transformers in bf16 and NumPy in float32."""
    torch = torch_cuda()
    model = random_model("smollm2-135m", "cuda", seed=2, dtype=BF16, n_layers=4)
    model.weights.tok_embeddings *= cp.asarray(3e5, dtype=BF16)  # embeddings (and the residual) ~3e5
    assert not np.isfinite(f32(model.weights.tok_embeddings).astype(np.float16)).all()  # fp16 cannot hold them
    decoder = CudaDecoder(model)
    cache = decoder.eager.new_cache(64)
    decoder.eager.forward(np.array([PROMPT]), cache)
    fast = [decoder.step_logits(cache, t).get() for t in (29871, 13, 2)]
    hf = to_transformers(model, dtype=torch.bfloat16)
    with torch.no_grad():
        hf_logits = hf(torch.tensor([PROMPT + [29871, 13, 2]], device="cuda")).logits[0].float().cpu().numpy()
    del hf
    ref_model = Model(model.config, host_copy(model.weights), "cpu")
    ref = ref_model.forward(np.array([PROMPT + [29871, 13, 2]]), ref_model.new_cache(64), last_only=False)[0]
    for i, out in enumerate(fast):
        at = len(PROMPT) + i
        print(f"bf16 overflow model: rel err vs transformers {rel_err(out, hf_logits[at]):.3g}, "
              f"vs NumPy {rel_err(out, ref[at]):.3g}")
        assert np.isfinite(out).all()
        assert rel_err(out, hf_logits[at]) < 1e-1 and rel_err(out, ref[at]) < 1e-1


def test_load_bf16_checkpoint_takes_the_fast_path(tmp_path):
    """tinyllm.load(..., dtype="bfloat16") on a bf16 safetensors checkpoint (and with dtype
    auto): the CUDA step, bf16 weights, and greedy ids equal to transformers' in bf16 while
    its logits are clear."""
    torch = torch_cuda()
    import tinyllm
    from helpers_models import tiny_checkpoint_dir
    from tinyllm.cuda import CudaStep

    hf, _ = tiny_checkpoint_dir(tmp_path, eos=False, hidden_size=256, intermediate_size=512,
                                num_attention_heads=4, num_key_value_heads=2)
    hf = hf.to(torch.bfloat16)
    hf.save_pretrained(tmp_path)  # the checkpoint's tensors in BF16, as Llama-3's are
    llm = tinyllm.load(tmp_path, device="cuda", dtype="bfloat16")
    assert isinstance(llm.step, CudaStep) and llm.model.dtype == BF16
    auto = tinyllm.load(tmp_path, device="cuda")  # dtype auto follows the checkpoint's bf16
    assert isinstance(auto.step, CudaStep) and auto.model.dtype == BF16
    del auto
    prompt = [1, 5, 9, 17, 33, 2, 40]
    cache = llm.model.new_cache(64)
    first = int(np.argmax(np.asarray(llm.step.prefill(prompt, cache)).reshape(-1)))
    ids = [first] + list(llm.step.decoder.decode(cache, first, 23))
    hf = hf.cuda()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=24, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    ref_ids = out.sequences[0, len(prompt):].tolist()
    margins = [float(torch.topk(s[0].float(), 2).values.diff().abs()) for s in out.logits]
    same = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), len(ref_ids))
    # ids may part only where transformers' own top two logits are within bf16's rounding
    assert same == len(ref_ids) or margins[same] < 0.05 * max(1.0, abs(float(out.logits[same][0].max()))), \
        (same, ids, ref_ids)

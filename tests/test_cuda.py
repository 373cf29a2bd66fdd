"""The GPU: the readable CuPy path and the fused fast path, against NumPy and torch.

Layers, as everywhere in tinyllm: each fused kernel against its readable twin (NumPy)
and against torch on the same inputs, at TinyLlama-1.1B and SmolLM2-135M shapes and at
odd sizes; then whole random-weight models of both shapes (CuPy against NumPy and
against transformers on the GPU; graph replay against eager; fast against readable);
then device sampling and the device errors. Every expected value comes from NumPy
(float64 where it matters), torch or transformers, never from tinyllm's CUDA code.

All tests are marked `gpu` and skip, saying why, where CuPy or a GPU is missing.
benchmarks/gpu_check.py runs this file on the GPU machine and prints a table; tests
report their measured errors through the `record` fixture for that table.

Tolerances: fp16 storage has a unit roundoff of 4.9e-4. A GEMV with fp32 accumulation
rounds once at the output: relative error ~1e-3. A whole model in fp16 compounds
that over its layers: logits within ~3e-2 (relative, L2) of an fp32 reference.
"""
from __future__ import annotations

import collections
import itertools
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_gpu import gemv_cases, gpu_reason

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.gpu_models

pytestmark = pytest.mark.gpu


if gpu_reason():
    pytest.skip(gpu_reason(), allow_module_level=True)

import cupy as cp  # noqa: E402

from benchmarks.gpu_models import host_copy, random_model, shape_config, to_transformers  # noqa: E402
from tinyllm.backend import get_device  # noqa: E402
from tinyllm.cuda import CudaDecoder, CudaStep  # noqa: E402
from tinyllm.cuda import kernels as K  # noqa: E402
from tinyllm.errors import DeviceError  # noqa: E402
from tinyllm.kv_cache import KVCache  # noqa: E402
from tinyllm.model import Model, Ops  # noqa: E402
from tinyllm.rope import rope_tables  # noqa: E402
from tinyllm.sampler import Sampler, SamplingParams, draw  # noqa: E402

np_ops = Ops(np)


@pytest.fixture
def record(request):
    """record(metric=value, ...): measured errors for benchmarks/gpu_check.py's table."""
    path = os.environ.get("TINYLLM_GPU_REPORT")

    def write(**values):
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"test": request.node.name, **{k: float(v) for k, v in values.items()}}) + "\n")
    return write


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here: the torch comparisons need a CUDA build of torch")
    return torch


def as_torch(a):
    return torch_cuda().from_dlpack(a)


rng = np.random.default_rng(0)


def randn(*shape, scale=1.0, dtype=np.float16):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ---- kernels -------------------------------------------------------------------------------

# (D, H, K, E, F, V) per shape; "odd" has sizes that are not multiples of any block
KERNEL_SHAPES = {
    "tinyllama": (2048, 32, 4, 64, 5632, 32000),
    "smollm2": (576, 9, 3, 64, 1536, 49152),
    "odd": (264, 6, 2, 64, 1000, 1003),
    "llama3-8b": (4096, 32, 8, 128, 14336, 4096),  # (the vocabulary cut: the GEMMs' shapes are what count)
    "odd_rows": (576, 9, 3, 64, 1000, 1003),  # N not a multiple of 64: the batched kernels' last row tile in part
}


@pytest.mark.parametrize("t, pos, s", [(5, 7, 12), (64, 0, 64), (3, 300, 303), (512, 0, 512)])
def test_causal_softmax_kernel(t, pos, s, record):
    """A prompt block's attention weights in one kernel: against the readable op (NumPy: scores
    to float32, the causal mask over the block's own columns, softmax, back to fp16), rows of
    R = 4 heads x t tokens for 2 KV heads; masked keys exactly 0."""
    scores = randn(1, 2, 4 * t, s, scale=4.0)
    mask = KVCache(shape_config("tinyllama-1.1b", max_seq_len=1024), 1024, np.float32, np).mask(t)
    ref = np_ops.attention_weights(scores.copy(), mask, pos, np.float16)
    x = cp.asarray(scores)
    K.causal_softmax_rows(x, t, pos)
    out = x.get()
    err = np.abs(out.astype(np.float32) - ref.astype(np.float32)).max()
    record(max_abs_err=float(err))
    assert err <= 2e-3
    rows = np.arange(4 * t) % t
    assert all((out[0, :, r, pos + i + 1:] == 0).all() for r, i in enumerate(rows))


@pytest.mark.parametrize("shape", list(KERNEL_SHAPES))
def test_rms_norm_kernel(shape, record):
    d = KERNEL_SHAPES[shape][0]
    x, w = randn(3, d, scale=3.0), (1 + 0.1 * rng.standard_normal(d)).astype(np.float16)
    out = cp.empty((3, d), np.float16)
    K.rms_norm_rows(cp.asarray(x), cp.asarray(w), 1e-5, out)
    out = out.get()
    ref_np = np_ops.rms_norm(x, w, 1e-5)  # the readable op: same fp16 roundings
    torch = torch_cuda()
    xt = torch.from_numpy(x).cuda().float()
    ref_t = (torch.from_numpy(w).cuda() * (xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-5)).half()).cpu().numpy()
    ulp = np.abs(out.astype(np.float32) - ref_np.astype(np.float32)).max()
    record(err_numpy=ulp, rel_err_torch=rel_err(out, ref_t))
    assert ulp <= 2e-3 * np.abs(ref_np.astype(np.float32)).max()
    assert rel_err(out, ref_t) < 1e-3


GEMV_CASES = gemv_cases()  # name: (N, K, epilogue, norm)


def readable_gemv(w, x, epi, nw=None, res=None):
    """A step GEMV by the readable NumPy ops (fp16 roundings where model.py has them), its
    matmul in float64; nw: the RMSNorm weights folded in, or None."""
    h = np_ops.rms_norm(x[None, None], nw, 1e-5)[0, 0] if nw is not None else x
    y = w.astype(np.float64) @ h.astype(np.float64)
    if epi == K.EPI_RESIDUAL:
        return np_ops.add(res, y.astype(np.float16))
    if epi == K.EPI_SWIGLU:
        return np_ops.swiglu(y.astype(np.float16))
    return y


@pytest.mark.parametrize("shape", list(KERNEL_SHAPES))
@pytest.mark.parametrize("case", list(GEMV_CASES))
@pytest.mark.parametrize("which", ["gemv", "gemv_stream"])
def test_gemv_kernel(shape, case, which, record):
    n, k, epi, norm = GEMV_CASES[case](*KERNEL_SHAPES[shape])
    if k % 8:
        pytest.skip(f"K={k} is not a multiple of 8: the GEMV kernel does not apply (the readable op runs)")
    rows = 2 * n if epi == K.EPI_SWIGLU else n
    w = randn(rows, k, scale=1 / math.sqrt(k))
    x = randn(k, scale=2.0)
    nw = (1 + 0.1 * rng.standard_normal(k)).astype(np.float16)
    res = randn(n)
    out = cp.full(n, np.nan, dtype=np.float16)  # poisoned: every element must be written
    getattr(K, which)(cp.asarray(w), cp.asarray(x), out, epilogue=epi, norm_w=cp.asarray(nw) if norm else None,
                      eps=1e-5, residual=cp.asarray(res) if epi == K.EPI_RESIDUAL else None)
    out = out.get()
    # reference 1: the readable NumPy ops
    ref = readable_gemv(w, x, epi, nw if norm else None, res)
    # reference 2: torch on the GPU (cuBLAS fp16 matmul, torch's SiLU), on the readable norm's output
    h = np_ops.rms_norm(x[None, None], nw, 1e-5)[0, 0] if norm else x
    torch = torch_cuda()
    wt, ht = torch.from_numpy(w).cuda(), torch.from_numpy(np.ascontiguousarray(h)).cuda()
    yt = (wt @ ht)
    if epi == K.EPI_RESIDUAL:
        ref_t = torch.from_numpy(res).cuda() + yt
    elif epi == K.EPI_SWIGLU:
        ref_t = torch.nn.functional.silu(yt[:n]) * yt[n:]
    else:
        ref_t = yt
    ref_t = ref_t.float().cpu().numpy()
    assert np.isfinite(out).all(), "some outputs were not written"
    e_np, e_t = rel_err(out, ref), rel_err(out, ref_t)
    record(rel_err_numpy=e_np, rel_err_torch=e_t)
    assert e_np < 2e-3 and e_t < 3e-3


@pytest.mark.parametrize("k, epi", [(6152, K.EPI_STORE), (6152, K.EPI_RESIDUAL), (3080, K.EPI_SWIGLU),
                                    (16384, K.EPI_SWIGLU)])
def test_gemv_rows_split_over_warps(k, epi):
    """Rows too long for one warp's registers are split over S warps (GemvSplit), also when S
    does not divide the row (its last part is shorter): every weight counts."""
    assert K.gemv_split(k, epi) > 1
    n = 24
    w = randn(2 * n if epi == K.EPI_SWIGLU else n, k, scale=1 / math.sqrt(k))
    x, res = randn(k, scale=2.0), randn(n)
    w[:, -8:] = 0.5  # the last 16-byte vector of each row: a part that skipped it would miss its share
    out = cp.full(n, np.nan, dtype=np.float16)
    K.gemv(cp.asarray(w), cp.asarray(x), out, epilogue=epi, residual=cp.asarray(res) if epi == K.EPI_RESIDUAL else None)
    assert rel_err(out.get(), readable_gemv(w, x, epi, res=res)) < 2e-3


def test_embedding_kernel_gives_zeros_for_an_id_outside_the_table():
    """The sampling kernel leaves V where logits name no token, and a step queued behind it reads
    that id before the host refuses it: the lookup must not read past the table."""
    table = cp.asarray(randn(50, 24))
    ids = cp.asarray(np.array([3, 50, -1, 49], dtype=np.int64))
    out = cp.full((4, 24), np.nan, dtype=np.float16)
    K.embedding(table, ids, out)
    got, t = out.get(), table.get()
    np.testing.assert_array_equal(got[0], t[3])
    np.testing.assert_array_equal(got[3], t[49])
    assert (got[1] == 0).all() and (got[2] == 0).all()


@pytest.mark.parametrize("k, epi, norm", [(2048, K.EPI_SWIGLU, True), (5632, K.EPI_RESIDUAL, False),
                                          (14336, K.EPI_RESIDUAL, False), (1000, K.EPI_STORE, True)])
def test_gemv_stream_bits_do_not_depend_on_its_grid(k, epi, norm):
    """gemv_stream: a warp takes rows g, g + G, ... of a grid of any width, each row in 4 KB
    pieces through a ring of `slots`; a row's bits must not depend on either (one warp sums
    it, in gemv's order). K = 5632 and 1000 end in a shorter piece, 14336 has seven; one
    block (8 warps) for 3 * 8 + 5 rows makes every warp take several rows and wrap its ring."""
    n = 29
    w = randn(2 * n if epi == K.EPI_SWIGLU else n, k, scale=1 / math.sqrt(k))
    w[:, -8:] = 0.5  # the last 16-byte vector of each row (in the last, shorter piece)
    x, res = randn(k, scale=2.0), randn(n)
    nw = (1 + 0.1 * rng.standard_normal(k)).astype(np.float16)
    args = dict(epilogue=epi, norm_w=cp.asarray(nw) if norm else None, eps=1e-5,
                residual=cp.asarray(res) if epi == K.EPI_RESIDUAL else None)
    wd, xd = cp.asarray(w), cp.asarray(x)
    outs = []
    for slots, blocks in [(2, None), (1, 1), (3, 1), (2, 2), (4, 3)]:
        out = cp.full(n, np.nan, dtype=np.float16)
        K.gemv_stream(wd, xd, out, slots=slots, blocks=blocks, **args)
        outs.append(out.get())
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    ref = readable_gemv(w, x, epi, nw if norm else None, res)
    assert np.isfinite(outs[0]).all() and rel_err(outs[0], ref) < 2e-3


@pytest.mark.parametrize("k,norm,epi", [(576, True, 0), (2048, True, 0), (2048, True, 2), (3072, True, 0),
                                        (4096, True, 0), (4096, False, 1), (14336, False, 1)])
def test_gemv_blocks_per_sm_agrees_with_the_driver(k, norm, epi):
    """kernels.gemv_blocks_per_sm (which LM heads stream) against the driver's occupancy
    calculator for the compiled kernel at gemv's launch shape."""
    from cuda.bindings import driver

    fn = K.kernel(K.gemv_name(np.float16, k, norm, epi))
    handle = fn.kernel.ptr if hasattr(fn, "kernel") else fn.ptr
    err, blocks = driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(driver.CUfunction(handle), 32 * K.GEMV_WARPS, 0)
    assert err == driver.CUresult.CUDA_SUCCESS
    assert K.gemv_blocks_per_sm(np.dtype(np.float16), k, norm, epi) == blocks


def test_the_big_matrices_stream():
    """With streaming on, a decode step's matrices of STREAM_MIN_BYTES or more take gemv_stream
    (the LM head only where few of gemv's blocks fit on an SM), the others gemv
    (FastOps._streams); the captured step launches both, and the first tokens are those of the
    step with every GEMV on gemv."""
    model = random_model("tinyllama-1.1b", n_layers=2)  # gate|up (46 MB) streams; wo (8 MB), the LM head do not
    layer, head = model.weights.layers[0], model.weights.output
    launched = collections.Counter()
    originals = {name: getattr(K, name) for name in ("gemv", "gemv_stream")}

    def counting(name):
        def run(*a, **kw):
            launched[name] += 1
            return originals[name](*a, **kw)
        return run

    ids = np.arange(1, 9)[None]
    firsts = []
    was = K._stream["enabled"]
    try:
        for name in originals:
            setattr(K, name, counting(name))
        for stream in (True, False):
            K.set_gemv_stream(stream)
            decoder = CudaDecoder(model)
            if stream:
                ops = decoder.graph_ops
                assert ops._streams(layer.w_gate_up.shape[0], layer.w_gate_up.nbytes)
                assert not ops._streams(layer.wo.shape[0], layer.wo.nbytes)
                # the LM head left out: at K = 2048 more of gemv's blocks fit on an SM than the rule's
                head_gemv = (head.shape[1], True, K.EPI_STORE)
                assert K.gemv_blocks_per_sm(head.dtype, *head_gemv) > K.STREAM_HEAD_BLOCKS
                assert K.streams(head.nbytes) and not ops._streams(head.shape[0], head.nbytes, head_gemv)
            cache = decoder.new_cache(32)
            first = int(cp.argmax(decoder.eager.forward(ids, cache)[0, -1]))
            firsts.append([first] + list(decoder.decode(cache, first, 8)))
            if stream:
                assert launched["gemv_stream"] >= 2 and launched["gemv"] >= 2 * 3 + 1
                launched.clear()
        assert launched["gemv_stream"] == 0
    finally:
        K.set_gemv_stream(was)
        for name, fn in originals.items():
            setattr(K, name, fn)
    assert firsts[0] == firsts[1]


def _attention_inputs(shape, length, capacity):
    d, h, kv, e, f, v = KERNEL_SHAPES[shape]
    c = shape_config("tinyllama-1.1b", dim=h * e, n_heads=h, n_kv_heads=kv, max_seq_len=4096)
    cache = KVCache(c, capacity, np.float16, np)
    pos = length - 1  # the new token's position: `length` keys after its write
    cache.k[0][:, :, :pos] = randn(1, kv, pos, e)
    cache.v[0][:, :, :pos] = randn(1, kv, pos, e)
    qkv = randn(1, 1, h + 2 * kv, e, scale=2.0)
    return c, cache, pos, qkv


@pytest.mark.parametrize("shape", ["tinyllama", "smollm2"])
@pytest.mark.parametrize("length", [1, 127, 129, 255, 256, 257, 300, 1000, 2048])
def test_decode_attention_kernel(shape, length, record):
    capacity = 2048
    c, cache, pos, qkv = _attention_inputs(shape, length, capacity)
    h, kv, e = c.n_heads, c.n_kv_heads, c.head_dim
    cos, sin = rope_tables(c, c.max_seq_len)
    scale = 1 / math.sqrt(e)
    # reference 1: the readable NumPy ops: rope in fp16 (as the model), then the cache
    # write and GQA attention in float32 (NumPy has no fp32-accumulating fp16 matmul)
    ref_cache = KVCache(c, capacity, np.float32, np)
    ref_cache.k[0][:], ref_cache.v[0][:] = cache.k[0], cache.v[0]
    qk = np_ops.rope(qkv[:, :, :h + kv], cos[pos:pos + 1], sin[pos:pos + 1]).astype(np.float32)
    v_new = qkv[:, :, h + kv:].astype(np.float32)
    ref = np_ops.attention(qk[:, :, :h], qk[:, :, h:], v_new, ref_cache, 0, pos, scale)[0, 0]
    # the kernel
    gk, gv = cp.asarray(cache.k[0]), cp.asarray(cache.v[0])
    gqkv = cp.asarray(qkv)
    out = cp.full(h * e, np.nan, dtype=np.float16)
    K.decode_attention(gqkv[:, :, :h], gqkv[:, :, h:h + kv], gqkv[:, :, h + kv:], cp.asarray(cos), cp.asarray(sin),
                       cp.asarray([pos], dtype=np.int32), gk, gv, scale, True,
                       K.attention_scratch(kv, c.n_rep, e, capacity), out, c.n_rep, slots=cp.zeros(1, np.int32))
    out = out.get()
    assert np.isfinite(out).all(), "some outputs were not written"
    # the cache write: rotated k and raw v at `pos`, nothing else touched
    np.testing.assert_array_equal(gk.get()[0, :, pos].astype(np.float32), ref_cache.k[0][0, :, pos])
    np.testing.assert_array_equal(gv.get()[0, :, pos].astype(np.float32), ref_cache.v[0][0, :, pos])
    np.testing.assert_array_equal(gk.get()[0, :, :pos], cache.k[0][0, :, :pos])
    # reference 2: torch's scaled_dot_product_attention (GQA) on the same rotated q/k
    torch = torch_cuda()
    qt = torch.from_numpy(np.ascontiguousarray(qk[0, 0, :h])).cuda().float()[None, :, None]        # [1, H, 1, E]
    kt = torch.from_numpy(ref_cache.k[0][:, :, :pos + 1]).cuda().float()                               # [1, K, S, E]
    vt = torch.from_numpy(ref_cache.v[0][:, :, :pos + 1]).cuda().float()
    ref_t = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True).reshape(-1).cpu().numpy()
    e_np, e_t = rel_err(out, ref), rel_err(out, ref_t)
    record(rel_err_numpy=e_np, rel_err_torch=e_t)
    assert e_np < 3e-3 and e_t < 3e-3


# ---- B tokens at once: the batched kernels -----------------------------------------------------

@pytest.mark.parametrize("shape", ["tinyllama", "smollm2", "llama3-8b", "odd_rows"])
@pytest.mark.parametrize("case", list(GEMV_CASES))
@pytest.mark.parametrize("rows", [1, 5, 8, 16, 33, 64])
@pytest.mark.parametrize("kernel", ["gemv_rows", "gemm_rows"])
def test_gemv_rows_kernel(shape, case, rows, kernel, record):
    """Both tensor-core GEMMs over B tokens (whichever rows_kernel would pick for the shape)
    against float64 NumPy and torch, every epilogue."""
    n, k, epi, norm = GEMV_CASES[case](*KERNEL_SHAPES[shape])
    if not K.gemv_rows_fits(n, k, rows):
        pytest.skip(f"K={k}: not whole 64-wide tiles, or {rows} rows of it exceed shared memory: "
                    "gemv_rows does not apply (the readable op runs)")
    w = randn(2 * n if epi == K.EPI_SWIGLU else n, k, scale=1 / math.sqrt(k))
    x = randn(rows, k, scale=2.0)
    nw = (1 + 0.1 * rng.standard_normal(k)).astype(np.float16)
    res = randn(rows, n)
    out = _gemv_rows(w, x, epi, nw if norm else None, res, kernel)
    h = np_ops.rms_norm(x[:, None], nw, 1e-5)[:, 0] if norm else x                 # [B, K]
    y = h.astype(np.float64) @ w.astype(np.float64).T                               # [B, N or 2N]
    ref = (np_ops.add(res, y.astype(np.float16)) if epi == K.EPI_RESIDUAL else
           np_ops.swiglu(y.astype(np.float16)) if epi == K.EPI_SWIGLU else y)
    torch = torch_cuda()
    yt = torch.from_numpy(np.ascontiguousarray(h)).cuda() @ torch.from_numpy(w).cuda().T
    ref_t = (torch.from_numpy(res).cuda() + yt if epi == K.EPI_RESIDUAL else
             torch.nn.functional.silu(yt[:, :n]) * yt[:, n:] if epi == K.EPI_SWIGLU else yt).float().cpu().numpy()
    assert np.isfinite(out).all(), "some outputs were not written"
    e_np = max(rel_err(o, r) for o, r in zip(out, ref))  # the worst token
    e_t = max(rel_err(o, r) for o, r in zip(out, ref_t))
    record(rel_err_numpy=e_np, rel_err_torch=e_t)
    assert e_np < 2e-3 and e_t < 3e-3


def _gemv_rows(w, x, epi, nw=None, res=None, kernel=None):
    """A batched kernel (rows_kernel's choice, or `kernel`) on host arrays, with a poisoned
    output and workspace; its counters must be zeros again after the launch (the next
    launch relies on it)."""
    n = w.shape[0] // 2 if epi == K.EPI_SWIGLU else w.shape[0]
    rows, k = x.shape
    out = cp.full((rows, n), np.nan, dtype=np.float16)
    workspace = cp.full(max(K.tile_workspace(n, k, epi, rows), 1), np.nan, dtype=cp.float32)
    counters = cp.zeros(K.row_tiles(n), dtype=cp.int32)
    K.gemv_rows(cp.asarray(w), cp.asarray(x), out, epilogue=epi, norm_w=cp.asarray(nw) if nw is not None else None,
                eps=1e-5, residual=cp.asarray(res) if epi == K.EPI_RESIDUAL else None,
                workspace=workspace, counters=counters, kernel_name=kernel)
    assert not counters.any(), "gemv_rows left its counters set"
    return out.get()


@pytest.mark.parametrize("shape", ["tinyllama", "llama3-8b", "odd_rows"])
@pytest.mark.parametrize("case", list(GEMV_CASES))
@pytest.mark.parametrize("kernel", ["gemv_rows", "gemm_rows"])
def test_gemv_rows_token_alone_or_in_any_batch(shape, case, kernel):
    """A token's outputs are bit-identical whatever the other tokens of the launch and however
    many there are (gemm_rows's K split comes from the matrix alone), also where K is split
    over blocks."""
    n, k, epi, norm = GEMV_CASES[case](*KERNEL_SHAPES[shape])
    if not K.gemv_rows_fits(n, k):
        pytest.skip(f"K={k}: not whole 64-wide tiles: the batched kernels do not apply (the readable op runs)")
    w = randn(2 * n if epi == K.EPI_SWIGLU else n, k, scale=1 / math.sqrt(k))
    x = randn(64, k, scale=2.0)
    nw = (1 + 0.1 * rng.standard_normal(k)).astype(np.float16) if norm else None
    res = randn(64, n)
    full = _gemv_rows(w, x, epi, nw, res, kernel)
    for b in (1, 3, 8, 9, 24, 48):
        part = _gemv_rows(w, x[-b:], epi, nw, res[-b:], kernel)
        np.testing.assert_array_equal(part, full[-b:], err_msg=f"the last {b} tokens alone")
    others = randn(63, k, scale=5.0)
    mixed = _gemv_rows(w, np.concatenate([x[:1], others]), epi, nw, np.concatenate([res[:1], randn(63, n)]), kernel)
    np.testing.assert_array_equal(mixed[0], full[0])


@pytest.mark.parametrize("shape", ["tinyllama", "smollm2", "llama3-8b"])
def test_decode_attention_rows_kernel(shape, monkeypatch, record):
    """Five sequences in one launch, each at its own length and in its own row of a batched
    cache (rows out of order, one row unused): each equals the one-sequence NumPy reference,
    with the batch's heads per block (rows_heads) and with one sequence's (heads_per_block),
    on a grid with a block per chunk of the cache and on one block wide (each block looping
    over its sequence's chunks), and all give the same bits."""
    lengths, slots, capacity = [1, 129, 300, 1000, 2048], [3, 0, 5, 1, 2], 2048
    d, h, kv, e, f, v = KERNEL_SHAPES[shape]
    c = shape_config("tinyllama-1.1b", dim=h * e, n_heads=h, n_kv_heads=kv, max_seq_len=4096)
    cos, sin = rope_tables(c, c.max_seq_len)
    scale = 1 / math.sqrt(e)
    pool = KVCache(c, capacity, np.float16, np, batch=6)
    pool.k[0][:] = randn(*pool.k[0].shape)
    pool.v[0][:] = randn(*pool.v[0].shape)
    qkv = randn(len(lengths), 1, h + 2 * kv, e, scale=2.0)
    refs = []
    for b, (length, slot) in enumerate(zip(lengths, slots)):
        pos = length - 1
        ref_cache = KVCache(c, capacity, np.float32, np)
        ref_cache.k[0][:], ref_cache.v[0][:] = pool.k[0][slot:slot + 1], pool.v[0][slot:slot + 1]
        qk = np_ops.rope(qkv[b:b + 1, :, :h + kv], cos[pos:pos + 1], sin[pos:pos + 1]).astype(np.float32)
        refs.append((np_ops.attention(qk[:, :, :h], qk[:, :, h:], qkv[b:b + 1, :, h + kv:].astype(np.float32),
                                      ref_cache, 0, pos, scale)[0, 0], ref_cache))
    gqkv = cp.asarray(qkv)
    outs = {}
    n_chunks = -(-capacity // K.attention_chunk(e))
    for heads, per_sm in itertools.product(sorted({K.heads_per_block(c.n_rep), K.rows_heads(c.n_rep, e, K.MAX_ROWS)}),
                                           (K.ATTENTION_BLOCKS_PER_SM, 0)):
        monkeypatch.setattr(K, "ATTENTION_BLOCKS_PER_SM", per_sm)
        width = K.attention_x_blocks(n_chunks, kv * c.n_rep // heads * len(lengths))
        assert width == 1 or per_sm != 0
        gk, gv = cp.asarray(pool.k[0]), cp.asarray(pool.v[0])
        out = cp.full((len(lengths), h * e), np.nan, dtype=np.float16)
        scratch = K.attention_scratch(kv, c.n_rep, e, capacity, rows=len(lengths))
        K.decode_attention(gqkv[:, :, :h], gqkv[:, :, h:h + kv], gqkv[:, :, h + kv:], cp.asarray(cos), cp.asarray(sin),
                           cp.asarray([n - 1 for n in lengths], dtype=np.int32), gk, gv, scale, True,
                           scratch, out, c.n_rep, slots=cp.asarray(slots, dtype=np.int32), rows=len(lengths),
                           row_stride=(h + 2 * kv) * e, heads=heads)
        out, gk = out.get(), gk.get()
        assert not scratch[2].any(), "the arrival counters must be back at zero for the next launch"
        assert np.isfinite(out).all(), f"some outputs were not written ({heads} heads per block)"
        errs = [rel_err(o, r) for o, (r, _) in zip(out, refs)]
        for (length, slot), (_, ref_cache) in zip(zip(lengths, slots), refs):
            np.testing.assert_array_equal(gk[slot, :, length - 1].astype(np.float32), ref_cache.k[0][0, :, length - 1])
        np.testing.assert_array_equal(gk[4], pool.k[0][4])  # the unused row
        record(**{f"max_rel_err_numpy_{heads}_heads_{width}_wide": max(errs)})
        assert max(errs) < 3e-3, f"{heads} heads per block, {width} blocks wide"
        outs[heads, width] = out
    first, *others = outs.values()
    for other in others:
        np.testing.assert_array_equal(other, first)


@pytest.mark.parametrize("shape", ["tinyllama", "llama3-8b"])
def test_decode_attention_paged_gives_the_bits_of_rows(shape, monkeypatch):
    """The paged layout (kv_cache.py BlockPool): five sequences whose chunks sit in shuffled
    blocks of one pool, found through their block tables, give the bits of the same keys and
    values in rows of a batched cache, for both grids; the new key and value land in the block
    that holds their position, and no other block changes."""
    from tinyllm.kv_cache import BlockPool

    lengths, capacity = [1, 129, 300, 1000, 2048], 2048
    d, h, kv, e, f, v = KERNEL_SHAPES[shape]
    c = shape_config("tinyllama-1.1b", dim=h * e, n_heads=h, n_kv_heads=kv, max_seq_len=4096, n_layers=1)
    cos, sin = rope_tables(c, c.max_seq_len)
    chunk = K.attention_chunk(e)
    width = capacity // chunk
    rows = KVCache(c, capacity, np.float16, np, batch=len(lengths))
    rows.k[0][:] = randn(*rows.k[0].shape)
    rows.v[0][:] = randn(*rows.v[0].shape)
    pool = BlockPool(c, len(lengths) * width + 3, chunk, capacity, len(lengths), np.float16, np)
    order = np.random.default_rng(3).permutation(pool.n_blocks)  # block i of row b: order[b * width + i]
    pool.k[0][:] = randn(*pool.k[0].shape)  # blocks no row names hold noise
    for b in range(len(lengths)):
        for i in range(width):
            blk = order[b * width + i]
            pool.table[b, i] = blk
            pool.k[0][blk] = rows.k[0][b, :, i * chunk:(i + 1) * chunk]
            pool.v[0][blk] = rows.v[0][b, :, i * chunk:(i + 1) * chunk]
    before = pool.k[0].copy()
    qkv = cp.asarray(randn(len(lengths), 1, h + 2 * kv, e, scale=2.0))
    pos = cp.asarray([n - 1 for n in lengths], dtype=np.int32)
    args = (qkv[:, :, :h], qkv[:, :, h:h + kv], qkv[:, :, h + kv:], cp.asarray(cos), cp.asarray(sin), pos)
    for per_sm in (K.ATTENTION_BLOCKS_PER_SM, 0):  # a block per chunk, or one block looping over them
        monkeypatch.setattr(K, "ATTENTION_BLOCKS_PER_SM", per_sm)
        outs, caches = [], []
        for table in (None, cp.asarray(pool.table[:len(lengths)])):
            gk, gv = (cp.asarray(rows.k[0]), cp.asarray(rows.v[0])) if table is None else (
                cp.asarray(pool.k[0]), cp.asarray(pool.v[0]))
            out = cp.full((len(lengths), h * e), np.nan, dtype=np.float16)
            K.decode_attention(*args, gk, gv, 1 / math.sqrt(e), True,
                               K.attention_scratch(kv, c.n_rep, e, capacity, rows=len(lengths)), out, c.n_rep,
                               slots=cp.arange(len(lengths), dtype=cp.int32), rows=len(lengths),
                               row_stride=(h + 2 * kv) * e, table=table)
            outs.append(out.get())
            caches.append(gk.get())
        np.testing.assert_array_equal(outs[1], outs[0])
        assert np.isfinite(outs[0]).all()
        paged_k, rows_k = caches[1], caches[0]
        changed = set()
        for b, n in enumerate(lengths):
            blk, at = pool.table[b, (n - 1) // chunk], (n - 1) % chunk
            np.testing.assert_array_equal(paged_k[blk, :, at], rows_k[b, :, n - 1])
            changed.add(int(blk))
        untouched = [i for i in range(pool.n_blocks + 1) if i not in changed]
        np.testing.assert_array_equal(paged_k[untouched], before[untouched])


def _device_sample(logits, params: SamplingParams, u: float) -> int:
    lg = cp.asarray(logits, dtype=cp.float32)
    p = cp.asarray([params.temperature, params.top_k, params.top_p, params.min_p, u], dtype=cp.float32)
    token, hist, pos = cp.zeros(1, cp.int64), cp.zeros(2, cp.int64), cp.zeros(1, cp.int32)
    K.sample_token(lg, p, cp.empty(lg.size, cp.float32), token, hist, pos)
    assert int(pos.get()[0]) == 1 and int(hist.get()[1]) == int(token.get()[0])
    return int(token.get()[0])


@pytest.mark.parametrize("vocab", [32000, 1003])
def test_sample_kernel_greedy_is_argmax(vocab):
    for trial in range(5):
        logits = rng.standard_normal(vocab).astype(np.float32) * 3
        if trial == 0:  # a tie: numpy.argmax takes the first
            logits[[17, vocab - 2]] = logits.max() + 1
        assert _device_sample(logits, SamplingParams(), 0.0) == int(np.argmax(logits))


SAMPLING = {
    "temperature": SamplingParams(temperature=0.8),
    "top_k": SamplingParams(temperature=1.0, top_k=40),
    "top_p": SamplingParams(temperature=0.7, top_p=0.9),
    "min_p": SamplingParams(temperature=1.2, min_p=0.05),
    "all": SamplingParams(temperature=0.9, top_k=100, top_p=0.8, min_p=0.02),
}


@pytest.mark.parametrize("case", list(SAMPLING))
def test_sample_kernel_matches_host_sampler(case, record):
    """Same logits, same u: the device picks the token tinyllm.sampler's rule picks (the host
    works in float64, the device in float32: a draw landing within rounding of a boundary
    may differ, so 98% agreement is required, and the same distribution)."""
    params = SAMPLING[case]
    host = Sampler(params)
    u_rng = np.random.default_rng(5)
    agree, n = 0, 300
    for i in range(n):
        logits = (rng.standard_normal(4096) * 2.5).astype(np.float32)
        u = float(u_rng.random())
        want = draw(host.filtered_probs(logits), u)
        agree += _device_sample(logits, params, u) == want
    record(agreement=agree / n)
    assert agree / n >= 0.98


def test_sample_rows_kernel_matches_host_sampler_per_row(record):
    """B rows in one launch, each with its own rule and u: row b picks the token
    tinyllm.sampler picks for its logits (98% agreement, as above; greedy rows exactly), and
    every row's id lands in tokens[b] and chosen[b], its position advanced by one."""
    rules = [SamplingParams()] + list(SAMPLING.values()) + [SamplingParams()]  # greedy, the five, greedy
    b, v = len(rules), 4096
    u_rng = np.random.default_rng(6)
    agree = exact = 0
    trials = 60
    for _ in range(trials):
        logits = (rng.standard_normal((b, v)) * 2.5).astype(np.float32)
        us = u_rng.random(b)
        params = np.array([[p.temperature, p.top_k, p.top_p, p.min_p, u] for p, u in zip(rules, us)], np.float32)
        tokens, chosen = cp.zeros((b, 1), cp.int64), cp.zeros(b, cp.int64)
        pos = cp.asarray(np.arange(b, dtype=np.int32) * 7)
        K.sample_rows(cp.asarray(logits), cp.asarray(params), cp.empty((b, v), cp.float32), tokens, chosen, pos)
        got = chosen.get()
        assert (tokens.get()[:, 0] == got).all() and (pos.get() == np.arange(b) * 7 + 1).all()
        for row, (p, u) in enumerate(zip(rules, us)):
            want = int(np.argmax(logits[row])) if p.greedy else draw(Sampler(p).filtered_probs(logits[row]), float(u))
            if p.greedy:
                exact += int(got[row] == want)
            else:
                agree += int(got[row] == want)
    record(agreement=agree / (trials * 5))
    assert exact == 2 * trials
    assert agree / (trials * 5) >= 0.98


# ---- whole models ---------------------------------------------------------------------------

MODEL_SHAPES = ["tinyllama-1.1b", "smollm2-135m"]
PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889, 450, 338, 263, 1243]


@pytest.fixture(scope="module", params=MODEL_SHAPES)
def pair(request):
    """(readable CuPy model, fast model + decoder) sharing one set of random fp16 weights."""
    model = random_model(request.param, "cuda", seed=1)
    readable = Model(model.config, model.weights, model.device)
    decoder = CudaDecoder(model)
    fast = decoder.eager  # the same model computing with FastOps called from Python
    yield request.param, readable, fast, decoder
    del decoder, fast, readable
    cp.get_default_memory_pool().free_all_blocks()


def test_cupy_readable_path_against_numpy_and_transformers(pair, record):
    name, readable, fast, _ = pair
    c = readable.config
    steps = [PROMPT[:16]] + [[t] for t in (29871, 13, 2, 5000)]
    # the readable model on CuPy, fp16
    cache = readable.new_cache(64)
    gpu = [readable.forward(np.array([ids]), cache)[0, -1].get() for ids in steps]
    assert cache.k[0].dtype == np.float16 and gpu[0].dtype == np.float32
    # NumPy, float32, same weights
    ref_model = Model(c, host_copy(readable.weights), "cpu")
    ref_cache = ref_model.new_cache(64)
    ref = [ref_model.forward(np.array([ids]), ref_cache)[0, -1] for ids in steps]
    del ref_model
    # transformers on the GPU, fp16, full forward over the same tokens
    torch = torch_cuda()
    hf = to_transformers(readable)
    all_ids = sum(steps, [])
    with torch.no_grad():
        hf_logits = hf(torch.tensor([all_ids], device="cuda")).logits[0].float().cpu().numpy()
    del hf
    torch.cuda.empty_cache()
    hf_at = [hf_logits[len(sum(steps[:i + 1], [])) - 1] for i in range(len(steps))]
    e_np = max(rel_err(g, r) for g, r in zip(gpu, ref))
    e_hf = max(rel_err(g, r) for g, r in zip(gpu, hf_at))
    agree = np.mean([np.argmax(g) == np.argmax(r) for g, r in zip(gpu, ref)])
    record(rel_err_numpy=e_np, rel_err_transformers=e_hf, argmax_agree_numpy=agree)
    assert e_np < 3e-2 and e_hf < 3e-2


def _prefilled(model, n=16, capacity=512):
    cache = model.new_cache(capacity)
    logits = model.forward(np.array([PROMPT[:n]]), cache)
    return cache, logits


def test_graph_replay_equals_eager_fast_decode(pair, record):
    """128 steps: the captured graph gives bit-identical logits to the same ops run eagerly."""
    name, readable, fast, decoder = pair
    tokens = np.random.default_rng(3).integers(0, fast.config.vocab_size, 128)
    eager_cache, _ = _prefilled(fast)
    graph_cache, _ = _prefilled(fast)
    worst = 0.0
    for t in tokens:
        eager = fast.forward(np.array([[t]]), eager_cache)[0, -1]
        replay = decoder.step_logits(graph_cache, int(t))
        worst = max(worst, float(cp.abs(eager - replay).max()))
    record(max_abs_diff=worst, graph_nodes=decoder.captured(graph_cache).n_nodes)
    assert worst == 0.0
    assert graph_cache.length == eager_cache.length == 16 + 128


def test_replaying_one_step_is_deterministic(pair, record):
    """The same step replayed 100 times at the same position gives the same bits: a race
    between overlapping kernels (or a stale cache line) would show up here."""
    name, readable, fast, decoder = pair
    cache, _ = _prefilled(fast, n=16, capacity=512)
    cache.advance(300 - cache.length)  # a context that fills two attention chunks
    first = decoder.step_logits(cache, 42)
    worst = 0.0
    for _ in range(100):
        cache.trim(cache.length - 300)
        worst = max(worst, float(cp.abs(decoder.step_logits(cache, 42) - first).max()))
    record(max_abs_diff=worst)
    assert worst == 0.0


def test_graph_with_and_without_programmatic_launch_agree(pair, record):
    """Programmatic dependent launch only changes when kernels start, never what they compute."""
    name, readable, fast, decoder = pair
    tokens = np.random.default_rng(7).integers(0, fast.config.vocab_size, 24)
    results = []
    for pdl in (True, False):
        K.set_pdl(pdl)
        try:
            cache, _ = _prefilled(fast)
            results.append([decoder.step_logits(cache, int(t)) for t in tokens])
        finally:
            K.set_pdl(True)
    worst = max(float(cp.abs(a - b).max()) for a, b in zip(*results))
    record(max_abs_diff=worst, pdl_active=float(K.pdl_active()))
    assert worst == 0.0


def test_fast_path_against_readable_cupy(pair, record):
    """Teacher-forced 128 steps: fused kernels vs the readable ops (cuBLAS), same weights."""
    name, readable, fast, decoder = pair
    tokens = np.random.default_rng(4).integers(0, fast.config.vocab_size, 128)
    r_cache, r_logits = _prefilled(readable)
    f_cache, f_logits = _prefilled(fast)
    errs, agree, clear = [rel_err(f_logits[0, -1].get(), r_logits[0, -1].get())], 0, 0
    for t in tokens:
        ref = readable.forward(np.array([[t]]), r_cache)[0, -1].get()
        out = decoder.step_logits(f_cache, int(t)).get()
        errs.append(rel_err(out, ref))
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > 0.05:  # a clear winner: the fast path must pick it too
            clear += 1
            agree += int(np.argmax(out) == np.argmax(ref))
    record(max_rel_err=max(errs), argmax_agree_clear=agree / max(clear, 1))
    assert max(errs) < 1e-2
    assert agree == clear


def test_greedy_ids_fast_equal_readable(pair, record):
    """Free-running greedy decode, 128 tokens: graph-captured fast path vs readable CuPy."""
    name, readable, fast, decoder = pair
    r_cache, r_logits = _prefilled(readable)
    first = int(cp.argmax(r_logits[0, -1]))
    ids, margins, tok = [], [], first
    for _ in range(128):
        logits = readable.forward(np.array([[tok]]), r_cache)[0, -1]
        top2 = cp.sort(logits)[-2:].get()
        tok = int(cp.argmax(logits))
        ids.append(tok)
        margins.append(top2[1] - top2[0])
    f_cache, _ = _prefilled(fast)
    fast_ids = list(decoder.decode(f_cache, first, 128))
    same = next((i for i, (a, b) in enumerate(zip(ids, fast_ids)) if a != b), len(ids))
    record(identical_prefix=same)
    if same < len(ids):  # only a near-tie in the readable logits may explain a difference
        assert margins[same] < 2e-2, f"step {same}: {ids[same]} vs {fast_ids[same]}, margin {margins[same]:.4f}"
    assert f_cache.length == 16 + 128


def test_device_sampling_is_reproducible(pair):
    name, readable, fast, decoder = pair
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=1234)
    runs = []
    for seed in (1234, 1234, 99):
        cache, logits = _prefilled(fast)
        runs.append(list(decoder.decode(cache, 5, 64, Sampler(SamplingParams(**{**vars(params), "seed": seed})))))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert len(set(runs[0])) > 1


def test_stopping_early_leaves_the_cache_consistent(pair):
    name, readable, fast, decoder = pair
    cache, _ = _prefilled(fast)
    gen = decoder.decode(cache, 7, 50)
    got = [next(gen) for _ in range(10)]
    gen.close()
    assert cache.length == 16 + 10
    # continuing from there equals an uninterrupted run
    full_cache, _ = _prefilled(fast)
    full = list(decoder.decode(full_cache, 7, 20))
    rest = list(decoder.decode(cache, got[-1], 10))
    assert got + rest == full


def test_step_api_equals_pipelined_decode(pair):
    """decoder.step (one token per call, the next step queued ahead) gives decode()'s ids,
    also when the caller feeds a token of its own in between."""
    name, readable, fast, decoder = pair
    for params in (None, SamplingParams(temperature=0.9, top_p=0.9, seed=5)):
        cache, _ = _prefilled(fast)
        want = list(decoder.decode(cache, 9, 40, None if params is None else Sampler(params)))
        cache, _ = _prefilled(fast)
        sampler = None if params is None else Sampler(params)
        got, tok = [], 9
        for _ in range(40):
            tok = decoder.step(cache, tok, sampler)
            got.append(tok)
        assert got == want
        assert cache.length == 16 + 40
    # feeding something else than the device's choice: the queued step is simply superseded
    cache, _ = _prefilled(fast)
    a = decoder.step(cache, 9)
    b = decoder.step(cache, 123)
    ref_cache, _ = _prefilled(fast)
    assert list(decoder.decode(ref_cache, 9, 1)) == [a]
    assert list(decoder.decode(ref_cache, 123, 1)) == [b]


class _IdsTokenizer:
    """Just enough of a tokenizer for tinyllm.generate: ids become their decimal text."""
    bos_id, eos_ids, tk = 1, (), None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def test_generation_takes_the_fast_path(pair, record):
    """tinyllm.generate.Generation handed the CUDA step: decode steps are graph
    replays with the token chosen on the device (greedy: decode()'s ids; seeded: reproducible)."""
    import time

    from tinyllm.generate import Generation, StopRules

    name, readable, fast, decoder = pair
    calls = []
    step = decoder.step
    decoder.step = lambda *a, **k: calls.append(1) or step(*a, **k)
    cuda_step = CudaStep(decoder.model, decoder=decoder)
    try:
        rules = StopRules(max_new_tokens=64, eos_ids=())
        start = time.perf_counter()
        done = Generation(cuda_step, _IdsTokenizer(), PROMPT, rules=rules).run()
        elapsed = time.perf_counter() - start
        seeded = [Generation(cuda_step, _IdsTokenizer(), PROMPT, rules=rules,
                             sampler=Sampler(SamplingParams(temperature=0.8, top_k=40, seed=11))).run().token_ids
                  for _ in range(2)]
    finally:
        decoder.step = step
    assert len(calls) == 3 * 63  # every decode step went to the device
    cache, logits = _prefilled(fast)
    first = int(cp.argmax(logits[0, -1]))
    assert done.token_ids == [first] + list(decoder.decode(cache, first, 63))
    assert seeded[0] == seeded[1]
    record(decode_tok_s=done.stats.decode_tps, wall_s=elapsed)


def test_long_prompt_prefill(pair, record):
    """A 2000-token prompt prefills in chunks through cuBLAS and agrees with the fast decode."""
    name, readable, fast, decoder = pair
    ids = np.random.default_rng(6).integers(0, fast.config.vocab_size, 2001)
    cache = fast.new_cache(2048)
    fast.forward(ids[None, :2000], cache)
    ref = fast.forward(ids[None, 2000:], cache)[0, -1].get()  # eager one-token step at position 2000
    cache.trim(1)
    out = decoder.step_logits(cache, int(ids[2000])).get()
    record(rel_err=rel_err(out, ref))
    assert rel_err(out, ref) == 0.0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cublas_matmul_against_torch(dtype):
    """cublas.Handle.matmul, the prompt's attention products: scores q @ keys.T with keys a view
    of a longer cache (a transposed operand, batch strides of the cache), and weights @ values;
    against torch in fp32. Layouts it cannot take give None (the caller multiplies otherwise)."""
    from tinyllm.cuda import cublas

    torch = torch_cuda()
    blas = cublas.Handle()
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes", reason="bfloat16 arrays in CuPy need ml_dtypes")
    tdt = getattr(torch, dtype)
    q = torch.randn(2, 4, 24, 64, device="cuda", dtype=tdt)
    cache = torch.randn(2, 4, 100, 64, device="cuda", dtype=tdt)
    probs = torch.rand(2, 4, 24, 37, device="cuda", dtype=tdt)
    cq, ccache, cprobs = (cp.from_dlpack(t) for t in (q, cache, probs))
    keys = ccache[:, :, :37]
    scores = blas.matmul(cq, keys.transpose(0, 1, 3, 2))
    weighted = blas.matmul(cprobs, keys)
    ref_s = q.float() @ cache[:, :, :37].float().transpose(2, 3)
    ref_w = probs.float() @ cache[:, :, :37].float()
    for out, ref in ((scores, ref_s), (weighted, ref_w)):
        assert out.dtype == cq.dtype and out.shape == tuple(ref.shape)
        got = torch.from_dlpack(out).float()
        assert float((got - ref).norm() / ref.norm()) < (4e-3 if dtype == "float16" else 2e-2)
    assert blas.matmul(cq[:, :, :, ::2], keys.transpose(0, 1, 3, 2)[:, :, ::2]) is None  # rows not contiguous
    assert blas.matmul(cq, cq.transpose(0, 1, 3, 2).astype(cp.float32)) is None          # two types


def test_a_prompt_runs_its_matmuls_on_cublas(pair, monkeypatch, record):
    """The eager fast path's prefill (FastOps.linear and .matmul) calls cuBLAS through ctypes,
    and its logits agree with the readable CuPy model's prefill of the same prompt."""
    from tinyllm.cuda import cublas

    name, readable, fast, decoder = pair
    calls = collections.Counter()
    for method in ("gemm_nt", "matmul"):
        original = getattr(cublas.Handle, method)

        def counted(self, *args, _original=original, _name=method, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(cublas.Handle, method, counted)
    ids = np.random.default_rng(16).integers(0, fast.config.vocab_size, 300)
    out = fast.forward(ids[None], fast.new_cache(512))[0, -1].get()
    ref = readable.forward(ids[None], readable.new_cache(512))[0, -1].get()
    n = fast.config.n_layers
    assert calls["matmul"] == 2 * n and calls["gemm_nt"] >= 4 * n, calls
    record(rel_err=rel_err(out, ref))
    assert rel_err(out, ref) < 1e-2


def test_graphs_stay_right_when_the_rope_tables_grow():
    """A graph keeps the address of the RoPE tables it was captured with. A cache longer than
    the tables built at load makes them grow; the graph captured before must still give the
    eager step's bits, and so must one captured on the long cache, at a position only the
    grown tables cover."""
    from tinyllm.rope import INITIAL_POSITIONS

    model = random_model("smollm2-135m", "cuda", seed=2, n_layers=2, vocab_size=512,
                         max_seq_len=4 * INITIAL_POSITIONS)
    decoder = CudaDecoder(model)
    fast = decoder.eager
    short, _ = _prefilled(fast, n=16, capacity=64)
    first = decoder.step_logits(short, 7)
    short.trim(1)
    long = fast.new_cache(INITIAL_POSITIONS + 300)  # the tables grow here
    assert model.cos.shape[0] >= INITIAL_POSITIONS + 300
    assert float(cp.abs(decoder.step_logits(short, 7) - first).max()) == 0.0
    fast.forward(np.array([PROMPT[:16]]), long)
    long.advance(INITIAL_POSITIONS + 200 - long.length)  # a position past the first tables
    eager_cache = long.view()
    eager = fast.forward(np.array([[7]]), eager_cache)[0, -1]
    assert float(cp.abs(decoder.step_logits(long, 7) - eager).max()) == 0.0


# ---- B sequences at once: the batched fast path ---------------------------------------------------

@pytest.fixture(scope="module")
def batch(pair):
    from tinyllm.cuda.batch import BatchDecoder

    name, readable, fast, decoder = pair
    b = BatchDecoder(decoder, max_batch=8, capacity=1024)
    yield b
    del b


def _rows_prefilled(model, caches, lengths):
    """Prefill prompts of these lengths into the caches; returns the logits of each prompt."""
    ids = np.random.default_rng(8).integers(0, model.config.vocab_size, max(lengths))
    return [model.forward(np.array([ids[:n]]), cache)[0, -1] for n, cache in zip(lengths, caches)]


def test_batched_fast_path_against_readable_decode_batch(pair, batch, record):
    """Eight sequences of different lengths, 48 teacher-forced steps: each replayed batched
    graph's logits (the default GEMMs: cuBLAS through ctypes, captured, at a fixed M of 64
    rows) against the readable decode_batch (CuPy's matmuls, one attention per sequence);
    the ids chosen on the device are the argmax of those logits."""
    assert batch.ops.gemm == "cublas"
    _against_readable(pair, batch, record)


def test_kernels_batched_step_against_readable_decode_batch(pair, record):
    """The same with the step's GEMMs on tinyllm's own kernels (gemm="kernels": gemv_rows,
    gemm_rows)."""
    from tinyllm.cuda.batch import BatchDecoder

    name, readable, fast, decoder = pair
    b = BatchDecoder(decoder, max_batch=8, capacity=1024, gemm="kernels")
    try:
        _against_readable(pair, b, record)
    finally:
        del b
        cp.get_default_memory_pool().free_all_blocks()


def _against_readable(pair, batch, record):
    name, readable, fast, decoder = pair
    lengths = [16, 3, 250, 17, 1, 129, 40, 300]
    caches = [batch.new_cache() for _ in lengths]
    r_caches = [readable.new_cache(1024) for _ in lengths]
    _rows_prefilled(fast, caches, lengths)
    _rows_prefilled(readable, r_caches, lengths)
    tokens = np.random.default_rng(9).integers(0, fast.config.vocab_size, (48, len(lengths)))
    errs, agree, clear = [], 0, 0
    try:
        for step in tokens:
            chosen = batch.step(step, caches, queue_next=False)  # (nothing queued after: logits stay)
            logits = batch.logits(len(caches)).get()                # [B, V], what the graph computed
            ref = readable.decode_batch(step, r_caches).get()       # [B, V]
            assert chosen == [int(np.argmax(row)) for row in logits]
            for out, r in zip(logits, ref):
                errs.append(rel_err(out, r))
                top2 = np.sort(r)[-2:]
                if top2[1] - top2[0] > 0.05:
                    clear += 1
                    agree += int(np.argmax(out) == np.argmax(r))
        assert [c.length for c in caches] == [n + 48 for n in lengths]
    finally:
        for cache in caches:
            batch.release(cache)
    record(max_rel_err=max(errs), argmax_agree_clear=agree / max(clear, 1))
    assert max(errs) < 1e-2
    assert agree == clear


def test_a_sequence_gives_the_same_bits_alone_and_in_any_batch(pair, batch, record):
    """Row independence: one sequence decoded alone (B=1 graph) and as row 5 of 7 (B=7
    graph, other rows at other positions) gives bit-identical logits at every step."""
    name, readable, fast, decoder = pair
    alone = [batch.new_cache()]
    _rows_prefilled(fast, alone, [40])
    others = [batch.new_cache() for _ in range(6)]
    _rows_prefilled(fast, others, [5, 60, 33, 1, 200, 90])
    grouped = others[:5] + [None] + others[5:]
    try:
        grouped[5] = batch.new_cache()
        _rows_prefilled(fast, [grouped[5]], [40])
        worst = 0.0
        for t in np.random.default_rng(10).integers(0, fast.config.vocab_size, 32):
            batch.step([int(t)], alone, queue_next=False)
            a = batch.logits(1)[0].copy()
            batch.step([int(t)] * 7, grouped, queue_next=False)
            worst = max(worst, float(cp.abs(batch.logits(7)[5] - a).max()))
    finally:
        for cache in alone + grouped:
            if cache is not None:
                batch.release(cache)
    record(max_abs_diff=worst)
    assert worst == 0.0
    assert batch.free_rows == batch.max_batch


@pytest.mark.parametrize("gemm,most", [("kernels", 64), ("cublas", 128)])
def test_a_row_is_bit_identical_in_every_bucket(pair, gemm, most, record):
    """Batch invariance up to 64 sequences on our kernels and 128 on cuBLAS: one sequence
    decoded alone and as one row among B - 1 others (every bucket's graph, padded rows
    included, K staged in chunks when 64 tokens do not fit at once; with cuBLAS, every GEMM
    in calls of 64 rows, two of them past 64) gives the same logits, bit for bit."""
    from tinyllm.cuda.batch import BatchDecoder, max_batch_for

    name, readable, fast, decoder = pair
    assert max_batch_for(fast.config, gemm) == most
    big = BatchDecoder(decoder, max_batch=most, capacity=512, gemm=gemm)
    try:
        alone = [big.new_cache()]
        _rows_prefilled(fast, alone, [37])
        ids = np.random.default_rng(14).integers(0, fast.config.vocab_size, 8)
        want = []
        for t in ids:
            big.step([int(t)], alone, queue_next=False)
            want.append(big.logits(1)[0].copy())
        big.release(alone[0])
        worst, sizes = 0.0, [b for b in (2, 5, 13, 33, 64, 65, 100, 128) if b <= most]
        for b in sizes:
            caches = [big.new_cache() for _ in range(b)]
            lengths = [int(n) for n in np.random.default_rng(b).integers(1, 200, b)]
            mine = b // 2
            lengths[mine] = 37
            _rows_prefilled(fast, caches, lengths)
            others = np.random.default_rng(100 + b).integers(0, fast.config.vocab_size, (len(ids), b))
            for step, t in enumerate(ids):
                feed = [int(x) for x in others[step]]
                feed[mine] = int(t)
                big.step(feed, caches, queue_next=False)
                worst = max(worst, float(cp.abs(big.logits(b)[mine] - want[step]).max()))
            for cache in caches:
                big.release(cache)
        record(max_abs_diff=worst, buckets=len(big.buckets))
        assert worst == 0.0
        assert big.free_rows == big.max_batch
    finally:
        del big
        cp.get_default_memory_pool().free_all_blocks()


def test_a_prompt_gives_the_same_bits_in_steps_of_any_rows(pair, batch, record):
    """Chunked prefill on cuBLAS: a 150-token prompt fed through batched steps in chunks of
    128 + 22 rows (two 64-row GEMM calls, then one), of ~37, or of 100 + 50 beside seven
    other sequences' decode rows gives the same logits, bit for bit, at its last prompt row
    and at the four decode steps after it; the last prompt row's logits match the readable
    model's forward pass of the same prompt."""
    name, readable, fast, decoder = pair
    assert batch.ops.gemm == "cublas" and batch.max_rows == 128
    v = fast.config.vocab_size
    rng = np.random.default_rng(15)
    prompt = [int(t) for t in rng.integers(0, v, 150)]
    after = [int(t) for t in rng.integers(0, v, 4)]

    def run(chunks, neighbours):
        cache = batch.new_cache()
        others = [batch.new_cache() for _ in range(neighbours)]
        if others:
            _rows_prefilled(fast, others, [int(n) for n in rng.integers(1, 300, neighbours)])
        try:
            start, out = 0, []
            for n in chunks:
                feed = [int(t) for t in rng.integers(0, v, neighbours)] + prompt[start:start + n]
                batch.step(feed, others + [cache] * n, queue_next=False)
                start += n
            out.append(batch.logits(len(feed))[len(feed) - 1].copy())
            for t in after:
                batch.step([t], [cache], queue_next=False)
                out.append(batch.logits(1)[0].copy())
            assert cache.length == len(prompt) + len(after)
            return out
        finally:
            for c in others + [cache]:
                batch.release(c)

    two_tiles = run([128, 22], 0)
    worst = 0.0
    for chunks, neighbours in (([37, 37, 37, 39], 0), ([100, 50], 7)):
        for a, b in zip(two_tiles, run(chunks, neighbours)):
            worst = max(worst, float(cp.abs(a - b).max()))
    ref = readable.forward(np.array([prompt]), readable.new_cache(256))[0, -1]
    err = rel_err(two_tiles[0].get(), ref.get())
    record(max_abs_diff=worst, rel_err_vs_readable=err)
    assert worst == 0.0
    assert err < 1e-2
    assert batch.free_rows == batch.max_batch


def test_a_step_queued_through_the_driver_gives_what_cupy_queues(pair, batch, monkeypatch):
    """The batched step queues its copies, graph and event through libcuda while keeping
    Python's lock (driver.py); through CuPy's calls instead (no driver) the same steps, each
    queued ahead of the one before, choose the same ids."""
    from tinyllm.cuda import batch as batch_module
    from tinyllm.cuda.driver import driver

    name, readable, fast, decoder = pair
    assert driver() is not None  # this thread has a CUDA context: the driver path is taken

    def run():
        caches = [batch.new_cache() for _ in range(6)]
        _rows_prefilled(fast, caches, [3, 40, 17, 99, 1, 64])
        tokens, out = [int(t) for t in np.random.default_rng(16).integers(0, fast.config.vocab_size, 6)], []
        try:
            for _ in range(12):
                tokens = batch.step(tokens, caches)  # greedy: the queued step is taken every time
                out.append(tokens)
        finally:
            for cache in caches:
                batch.release(cache)
        return out

    through_driver = run()
    monkeypatch.setattr(batch_module, "driver", lambda: None)
    assert run() == through_driver


def test_steps_queued_two_deep_give_the_tokens_of_steps_never_queued(pair, batch):
    """With two steps queued behind the one waited for, rows that keep going take the queued
    steps, and when a row leaves (its sequence ended) both queued steps are superseded and
    their uniform numbers drawn again: greedy and seeded rows get exactly the ids of steps
    run one at a time with nothing queued."""
    name, readable, fast, decoder = pair
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=3),
              SamplingParams(temperature=1.0, top_k=20, seed=4), SamplingParams(min_p=0.05, temperature=0.7, seed=5)]

    def run(queue: bool):
        caches = [batch.new_cache() for _ in params]
        _rows_prefilled(fast, caches, [5, 33, 70, 12])
        samplers = [Sampler(p) for p in params]
        tokens, out, depths = [3, 1, 4, 1], [], []
        live = list(range(len(params)))
        try:
            for step in range(14):
                if step in (6, 10):  # a row leaves: the queued steps no longer match
                    gone = live.pop(1)
                    batch.release(caches[gone])
                    tokens = tokens[:1] + tokens[2:]
                tokens = batch.step(tokens, [caches[i] for i in live], [samplers[i] for i in live], queue_next=queue)
                depths.append(len(batch._ahead))
                out.append(list(zip(live, tokens)))
        finally:
            for i in live:
                batch.release(caches[i])
        return out, depths

    queued, depths = run(True)
    alone, none = run(False)
    assert queued == alone
    assert max(depths) == batch.depth == 2 and set(none) == {0}

def test_scheduler_on_the_gpu_batch_equals_alone(pair, batch, record):
    """The server's scheduler on the fast path: 8 requests at once (greedy, seeded sampling,
    a repetition penalty sampled on the host) each give exactly the tokens they give alone.
    They end at different steps, so the batch changes and steps queued ahead get superseded."""
    from tinyllm.generate import StopRules
    from tinyllm.scheduler import Finished, Request, Scheduler

    name, readable, fast, decoder = pair
    cuda_step = CudaStep(decoder.model, decoder=decoder)
    cuda_step.batch_decoder = batch
    rng = np.random.default_rng(11)
    prompts = [list(rng.integers(2, fast.config.vocab_size, n)) for n in (5, 16, 40, 7, 120, 3, 64, 30)]
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=3), SamplingParams(),
              SamplingParams(repetition_penalty=1.3), SamplingParams(temperature=1.0, top_k=20, seed=4),
              SamplingParams(), SamplingParams(min_p=0.05, temperature=0.7, seed=5), SamplingParams()]
    budgets = [24, 10, 17, 24, 5, 24, 13, 20]

    def run(indices):
        sched = Scheduler(cuda_step, _IdsTokenizer(), max_batch=8, max_queue=0, max_context=1024)
        assert sched.rows.decoder is batch
        events = {i: [] for i in indices}
        for i in indices:
            sched.submit(Request(prompts[i], params[i], StopRules(max_new_tokens=budgets[i], eos_ids=()),
                                 emit=events[i].append))
        while not all(ev and isinstance(ev[-1], Finished) for ev in events.values()):
            sched.run_once()
        return {i: ev[-1].token_ids for i, ev in events.items()}

    together = run(range(8))
    alone = {i: run([i])[i] for i in range(8)}
    record(requests=8, tokens=sum(len(t) for t in together.values()))
    assert [len(together[i]) for i in range(8)] == budgets
    assert together == alone
    assert batch.free_rows == batch.max_batch


def test_scheduler_on_the_gpu_preempts_in_a_short_pool_and_gives_the_tokens_alone(pair, batch, record):
    """A paged cache of 6 blocks for 4 requests that reach 2 blocks each: the newest are
    preempted as the others grow, rejoin when blocks are free and compute their ids again in
    prompt rows, and each request gives exactly the tokens it gives alone in a pool that never
    runs short (greedy, seeded sampling, a penalty sampled on the host); every block goes back."""
    from tinyllm.generate import StopRules
    from tinyllm.prefix import block_bytes
    from tinyllm.scheduler import Finished, Request, Scheduler

    name, readable, fast, decoder = pair
    c = fast.config
    cuda_step = CudaStep(decoder.model, decoder=decoder)
    cuda_step.batch_decoder = batch
    rng = np.random.default_rng(17)
    chunk = K.attention_chunk(c.head_dim)
    prompts = [list(rng.integers(2, c.vocab_size, n)) for n in (chunk - 60, chunk + 40, chunk - 10, chunk + 140)]
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=3),
              SamplingParams(repetition_penalty=1.3), SamplingParams(temperature=1.0, top_k=20, seed=4)]

    def run(indices, kv_bytes=None):
        sched = Scheduler(cuda_step, _IdsTokenizer(), max_batch=8, max_queue=4, max_context=4 * chunk,
                          kv_cache_bytes=kv_bytes)
        events = {i: [] for i in indices}
        for i in indices:
            sched.submit(Request(prompts[i], params[i], StopRules(max_new_tokens=90, eos_ids=()),
                                 emit=events[i].append))
        while not all(ev and isinstance(ev[-1], Finished) for ev in events.values()):
            sched.run_once()
        pool = sched.rows.pool
        assert pool.free_blocks == pool.n_blocks and pool.free_rows == pool.rows
        return {i: ev[-1].token_ids for i, ev in events.items()}, sched

    alone = {i: run([i])[0][i] for i in range(4)}
    try:
        together, sched = run(range(4), 6 * block_bytes(c, fast.dtype, chunk))
        assert sched.rows.pool.n_blocks == 6
    finally:
        cuda_step.batch_decoder = None
        cp.get_default_memory_pool().free_all_blocks()
    record(preemptions=sched.preemptions)
    assert sched.preemptions > 0
    assert together == alone


def test_scheduler_on_the_gpu_one_failing_request_ends_alone(pair, batch):
    """On the fast path too, a request whose handling fails (its client callback raises
    mid-stream) ends alone; the others give exactly the tokens they give alone, and every
    row of the batched cache goes back."""
    from tinyllm.generate import StopRules
    from tinyllm.scheduler import Failed, Finished, Piece, Request, Scheduler

    name, readable, fast, decoder = pair
    cuda_step = CudaStep(decoder.model, decoder=decoder)
    cuda_step.batch_decoder = batch
    rng = np.random.default_rng(12)
    prompts = [list(rng.integers(2, fast.config.vocab_size, n)) for n in (9, 33, 4, 60)]
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=3), SamplingParams(),
              SamplingParams(repetition_penalty=1.3)]

    def run(indices, poisoned=None):
        sched = Scheduler(cuda_step, _IdsTokenizer(), max_batch=8, max_queue=0, max_context=1024)
        events = {i: [] for i in indices}
        for i in indices:
            emit = events[i].append
            if i == poisoned:
                def emit(event, sink=emit, seen=[0]):
                    seen[0] += isinstance(event, Piece)
                    if seen[0] > 5:
                        raise RuntimeError("the client's connection broke")
                    sink(event)
            sched.submit(Request(prompts[i], params[i], StopRules(max_new_tokens=20, eos_ids=()), emit=emit))
        for _ in range(100):
            if all(ev and isinstance(ev[-1], (Finished, Failed)) for ev in events.values()) or not (
                    sched.running or sched.waiting):
                break
            sched.run_once()
        return events

    together = run(range(4), poisoned=1)
    assert sum(isinstance(e, Piece) for e in together[1]) == 5
    assert not any(isinstance(e, Finished) for e in together[1])
    for i in (0, 2, 3):
        assert together[i][-1].token_ids == run([i])[i][-1].token_ids
    assert batch.free_rows == batch.max_batch


def test_generate_batch_on_the_gpu_remakes_and_frees_its_rows(pair):
    """LLM.generate_batch on the fast path: a bigger batch remakes the batched decoder (same
    row capacity: the attention scratch must outlive the old decoder's graphs) and gives the
    same tokens for the same prompts; a batch that fails gives every row back."""
    from tinyllm.engine import LLM

    name, readable, fast, decoder = pair
    v = fast.config.vocab_size
    rng = np.random.default_rng(13)
    prompts = [list(rng.integers(2, v, n)) for n in (5, 9, 3, 7, 9)]
    llm = LLM(decoder.model, _IdsTokenizer(), Path("random"), 0.0, CudaStep(decoder.model, decoder=decoder))
    try:
        two = llm.generate_batch(prompts[:2], max_new_tokens=8, eos_ids=())
        first = llm.step.batch_decoder
        five = llm.generate_batch(prompts, max_new_tokens=8, eos_ids=())
        assert llm.step.batch_decoder is not first and llm.step.batch_decoder.capacity == first.capacity
        assert [r.token_ids for r in five[:2]] == [r.token_ids for r in two]
        assert all(len(r.token_ids) == 8 for r in five)
        too_long = list(rng.integers(2, v, fast.config.max_seq_len + 1))
        with pytest.raises(RuntimeError, match="context"):
            llm.generate_batch([prompts[0], too_long, prompts[1]], max_new_tokens=8, eos_ids=())
        assert llm.step.batch_decoder.free_rows == llm.step.batch_decoder.max_batch
    finally:
        llm.step.batch_decoder = None


# ---- errors -----------------------------------------------------------------------------------

def test_missing_gpu_index_is_a_one_line_error():
    n = cp.cuda.runtime.getDeviceCount()
    with pytest.raises(DeviceError, match=rf"GPU {n} does not exist"):
        get_device(f"cuda:{n}")


def test_decoder_refuses_cpu_and_float32_models():
    from benchmarks.gpu_models import random_weights

    cpu_model = random_model("smollm2-135m", "cpu", n_layers=1, vocab_size=256)
    with pytest.raises(DeviceError, match="on a GPU"):
        CudaDecoder(cpu_model)
    c = shape_config("smollm2-135m", n_layers=1, vocab_size=256)
    with pytest.raises(DeviceError, match="float16 or bfloat16 weights, got float32"):
        CudaDecoder(Model(c, random_weights(c, cp, np.float32), "cuda"))


def test_model_too_big_for_the_gpu_says_how_much(monkeypatch):
    import tinyllm.loaders as loaders

    c = shape_config("smollm2-135m", n_layers=1, vocab_size=256)
    tensors = {k: np.zeros(v, np.float32) for k, v in loaders.expected_shapes(c).items()}
    ckpt = loaders.Checkpoint(Path("model.safetensors"), "safetensors", c, tensors)
    need = sum(a.size for a in tensors.values()) * 2 / 2**30
    monkeypatch.setattr(loaders, "_gpu_free_bytes", lambda device: 2**20)
    with pytest.raises(DeviceError, match=rf"needs {need:.2f} GiB in float16, 0.00 GiB free on cuda:0"):
        loaders.assemble_weights(ckpt, np.float16, get_device("cuda"))

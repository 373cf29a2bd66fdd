"""The pieces of one attention block, timed apart, by sequence length.

    python -m benchmarks.components                       # NumPy; CuPy too when a GPU is there
    python -m benchmarks.components --seq-lens 1 8 32 128 512 --device cpu

Each operation is tinyllm's own readable one (`tinyllm.model.Ops`) at the default
model's shapes (read from its GGUF header; the weights are random, which does not
change the time), for T new tokens of a prompt starting at position 0:

    rope            rotate q and k                    [1, T, H+K, E]
    qkv_projection  x @ wqkv.T                        [1, T, D] -> [1, T, (H+2K) E]
    attention_scores q @ k^T * scale, GQA by reshape  [1, K, R*T, E] @ [1, K, E, T]
    mask_cached     the causal mask sliced from the cache's prebuilt table
    mask_rebuilt    the causal mask built from scratch (np.triu of a -inf matrix), as a
                    model that keeps no table does on every call
    attention       the whole Ops.attention: cache write, scores, mask, softmax, @ V

Times are medians of --repeats calls after a warm-up, in microseconds; on the GPU
the device is synchronised before each clock read.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np

from .common import best_of, fmt, header_markdown, machine_info, markdown_table, publish

COMPONENTS = ("rope", "qkv_projection", "attention_scores", "mask_cached", "mask_rebuilt", "attention")


def model_config(path):
    """The Config of a checkpoint without loading its weights."""
    from tinyllm.config import Config
    from tinyllm.loaders import default_model_path

    path = default_model_path() if path is None else Path(path)
    if path.suffix == ".gguf":
        from tinyllm.loaders.gguf import field_values, open_gguf

        reader = open_gguf(path)
        has_output = any(t.name == "output.weight" for t in reader.tensors)
        return Config.from_gguf_fields(field_values(reader), str(path), has_output_tensor=has_output)
    return Config.from_hf((path if path.is_dir() else path.parent) / "config.json")


def bench_device(config, device_name: str, seq_lens, repeats: int) -> dict:
    from tinyllm.backend import get_device
    from tinyllm.kv_cache import KVCache
    from tinyllm.model import Ops
    from tinyllm.rope import rope_tables

    device = get_device(device_name)
    xp = device.xp
    ops = Ops(xp)
    c = config
    h, k, e, d = c.n_heads, c.n_kv_heads, c.head_dim, c.dim
    rng = np.random.default_rng(0)
    dtype = np.float16 if device.is_cuda else np.float32  # each device's compute dtype

    def rand(*shape):
        return xp.asarray(rng.standard_normal(shape, dtype=np.float32).astype(dtype))

    wqkv = rand((h + 2 * k) * e, d)
    cos, sin = rope_tables(c, max(seq_lens), xp)
    scale = 1.0 / float(np.sqrt(e))
    cache = KVCache(c, max(seq_lens), dtype, xp)
    out = {}
    for t in seq_lens:
        x = rand(1, t, d)
        qkv = ops.linear(x, wqkv).reshape(1, t, h + 2 * k, e)
        qk = ops.rope(qkv[:, :, :h + k], cos[:t], sin[:t])
        q, kk, v = qk[:, :, :h], qk[:, :, h:], qkv[:, :, h + k:]
        qg = q.transpose(0, 2, 1, 3).reshape(1, k, (h // k) * t, e)  # [1, K, R*T, E]
        keys = kk.transpose(0, 2, 1, 3)  # [1, K, T, E]

        def rebuilt_mask():
            return xp.asarray(np.triu(np.full((t, t), -np.inf, dtype=np.float32), k=1))

        cases = {
            "rope": lambda: ops.rope(qkv[:, :, :h + k], cos[:t], sin[:t]),
            "qkv_projection": lambda: ops.linear(x, wqkv),
            "attention_scores": lambda: (qg @ keys.transpose(0, 1, 3, 2)).astype(xp.float32) * scale,
            "mask_cached": lambda: cache.mask(t),
            "mask_rebuilt": rebuilt_mask,
            "attention": lambda: ops.attention(q, kk, v, cache, 0, 0, scale),
        }
        sync = device.synchronize if device.is_cuda else None
        out[str(t)] = {name: best_of(fn, repeats=repeats, warmup=2, sync=sync) for name, fn in cases.items()}
    return {"device": device.name, "dtype": np.dtype(dtype).name, "by_seq_len": out}


def cuda_available() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def to_markdown(result: dict) -> str:
    md = ["# Components of attention, by sequence length\n", header_markdown(result["machine"]),
          f"Shapes of {result['settings']['model_name']}: D={result['settings']['dim']}, "
          f"H={result['settings']['n_heads']}, K={result['settings']['n_kv_heads']}, "
          f"E={result['settings']['head_dim']}; T new tokens from position 0. "
          f"Median of {result['settings']['repeats']} calls, microseconds.\n"]
    for dev in result["devices"]:
        lens = list(dev["by_seq_len"])
        rows = [[name] + [fmt(dev["by_seq_len"][t][name]["median"] * 1e6) for t in lens] for name in COMPONENTS]
        md += [f"## {dev['device']} ({dev['dtype']})\n", markdown_table(["µs"] + [f"T={t}" for t in lens], rows), ""]
    return "\n".join(md)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.components", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint whose shapes are used (default: the embedded SmolLM2-135M)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="'all': the CPU, and the GPU when CuPy sees one")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    config = model_config(args.model)
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else \
        ["cpu"] + (["cuda"] if cuda_available() else [])
    result = {
        "benchmark": "components",
        "machine": machine_info(),
        "settings": {"model_name": Path(config.source).name, "dim": config.dim, "n_heads": config.n_heads,
                     "n_kv_heads": config.n_kv_heads, "head_dim": config.head_dim, "seq_lens": args.seq_lens,
                     "repeats": args.repeats},
        "devices": [bench_device(config, d, args.seq_lens, args.repeats) for d in devices],
    }
    publish(args.out, "components", result, to_markdown)


if __name__ == "__main__":
    main()

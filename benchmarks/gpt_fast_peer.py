"""gpt-fast as a peer of tinyllm's batch-1 GPU decode: the same random weights, the same
prompt, decoded by gpt-fast's own compiled step.

    python benchmarks/fetch_gpt_fast.py /path/to/gpt-fast      # once: its files into .gptfast/
    python benchmarks/gpt_fast_peer.py --shape llama-3-8b --modes fp16 int8 int4
    python benchmarks/gpt_fast_peer.py --cpu-check             # no GPU needed: the weight copy

benchmarks/gpu_decode.py --gpt-fast runs it in the same process after tinyllm's figures.

The model. pytorch-labs/gpt-fast's `Transformer` (model.py, imported from the ignored
folder .gptfast/) is built with a ModelArgs of the tinyllm shape and given tinyllm's random
weights (benchmarks/gpu_models.py). Both store linear weights (out, in) and stack q|k|v
rows alike; tinyllm's gate|up rows become gpt-fast's w1 (gate) and w3 (up), w_down its w2.
gpt-fast always has an output matrix of its own, so a tied embedding is copied into it
(a step reads the same bytes). RoPE differs: tinyllm rotates channel i with i + E/2 (the
Hugging Face layout), gpt-fast rotates 2i with 2i + 1. The rows of every q and k head are
permuted (row i to 2i, row i + E/2 to 2i + 1), so gpt-fast computes the same function:
an attention score is a dot product, unchanged when q and k are permuted alike.
`compare_logits` checks this: the prefill logits of every prompt position against
tinyllm's readable model (fp16 on the GPU; float32 in --cpu-check, where the greedy
tokens of gpt-fast's own prefill and decode loop must also be tinyllm's). On the GPU the
first greedy tokens are compared with tinyllm's fast path and the result reported.

Modes.
- fp16: the model in fp16, as tinyllm.
- int8: its WeightOnlyInt8QuantHandler (int8 weights, a scale per output row), in fp16.
- int4: its WeightOnlyInt4QuantHandler, group size 128, inner_k_tiles 8. Its kernel,
  aten._weight_int4pack_mm, takes bf16 activations only, so this mode runs the whole
  model in bf16 (gpt-fast's own default precision). Since torch 2.5,
  aten._convert_weight_to_int4pack takes the 4-bit values packed two per byte ([N, K/2]
  uint8) where the fetched quantize.py passes one per int32 ([N, K]). For the length of
  the quantization, the imported module's `prepare_int4_weight_and_scales_and_zeros` is
  replaced by `_prepare_int4` below, which packs the pairs first (on older torch it
  passes the int32 values through unchanged). The copied files are left as fetched:
  their SHA-256 is checked against .gptfast/SOURCE.json and any edit is reported.
Each mode runs in its own try/except: a failing mode is reported as an error string.

Timing, as gpt-fast's generate.py runs it: `decode_one_token` compiled with
torch.compile(mode="reduce-overhead", fullgraph=True), its inductor settings (set when
generate.py is imported; applied only while the peer runs, so that other peers in the same
process compile as they would alone), setup_caches(1, prompt + new tokens + 1), its eager
`prefill` of the 16-token prompt, then its own `decode_n_tokens` loop for 256 tokens. The
clock runs from after the prefill (synchronised) to after the last token (synchronised):
decode only, as tinyllm's figure (generate.py's own figure includes the prefill). One run
of warm-up (compilation, CUDA graph recording), then `repeats` runs; the median.
Greedy: gpt-fast always samples; top_k=1 at temperature 1 makes its sampler return the
arg max (a temperature near 0 would overflow fp16 logits). Equal maximal logits are then
broken at random, where tinyllm takes the first.

Bytes: `weight_bytes` (every parameter and buffer but the embedding table and the KV
cache), `kv_bytes` (the whole cache: gpt-fast's decode attends over its padded length)
and `bytes_per_step` (both, plus one embedding row), from which bandwidth follows; also
gpt-fast's own `_get_model_size`, which counts the KV cache and not the embedding.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import io
import json
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import leading_matches  # noqa: E402
from benchmarks.fetch_gpt_fast import DEFAULT_DEST as GPT_FAST_DIR  # noqa: E402
from benchmarks.fetch_gpt_fast import FILES, sha256  # noqa: E402
from benchmarks.gpu_models import ALL_SHAPES, as_torch, prompt_ids, random_weights  # noqa: E402
from tinyllm.backend import to_numpy  # noqa: E402
from tinyllm.config import Config, RopeScaling  # noqa: E402
from tinyllm.model import Model  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 16, 256  # as benchmarks/gpu_decode.py
MODES = ("fp16", "int8", "int4")
INT4_GROUP_SIZE = 128
GREEDY = {"temperature": 1.0, "top_k": 1}
# What gpt-fast's generate.py sets when imported: (config module, dotted name).
INDUCTOR_SETTINGS = (("torch._inductor.config", "coordinate_descent_tuning"),
                     ("torch._inductor.config", "triton.unique_kernel_names"),
                     ("torch._inductor.config", "fx_graph_cache"),
                     ("torch._functorch.config", "enable_autograd_cache"))
_MISSING = object()


# ---- loading gpt-fast's files -------------------------------------------------------------

def _read_settings() -> dict:
    values = {}
    for module, name in INDUCTOR_SETTINGS:
        obj = importlib.import_module(module)
        try:
            values[(module, name)] = functools.reduce(getattr, name.split("."), obj)
        except AttributeError:
            values[(module, name)] = _MISSING
    return values


def _write_settings(values: dict) -> None:
    for (module, name), value in values.items():
        if value is _MISSING:
            continue
        *parents, leaf = name.split(".")
        setattr(functools.reduce(getattr, parents, importlib.import_module(module)), leaf, value)


def _source_record(folder: Path) -> dict:
    """Which gpt-fast the copies came from, and which of them differ from what was fetched."""
    path = folder / "SOURCE.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    hashes = record.get("sha256", {})
    edited = [name for name in FILES if name in hashes and hashes[name] != sha256((folder / name).read_bytes())]
    return {"commit": record.get("commit"), "source": record.get("source"),
            "hashes_recorded": bool(hashes), "edited_since_fetch": edited}


_loaded: types.SimpleNamespace | None = None


def load_gpt_fast(folder: Path = GPT_FAST_DIR) -> types.SimpleNamespace:
    """gpt-fast's `model`, `generate` and `quantize` modules, imported from `folder`.

    They import one another by those top-level names, so the folder is on sys.path while
    they load (and only then). generate.py and quantize.py import gpt-fast's `tokenizer`
    (sentencepiece, tiktoken), which a benchmark fed with token ids never calls: a
    stand-in module takes its place."""
    global _loaded
    if _loaded is not None:
        return _loaded
    folder = Path(folder).resolve()
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}; copy gpt-fast's files there with "
                                "`python benchmarks/fetch_gpt_fast.py /path/to/gpt-fast`")
    for name in ("model", "generate", "quantize"):
        other = sys.modules.get(name)
        if other is not None and Path(getattr(other, "__file__", "") or "").parent != folder:
            raise ImportError(f"a module named {name!r} is already imported (from {getattr(other, '__file__', '?')}); "
                              f"gpt-fast's {name}.py cannot be imported beside it")
    stand_in = types.ModuleType("tokenizer")

    def get_tokenizer(*args, **kwargs):
        raise RuntimeError("gpt-fast's tokenizer is not copied: the benchmark feeds token ids")

    stand_in.get_tokenizer = get_tokenizer
    sys.modules.setdefault("tokenizer", stand_in)
    saved_path, saved_settings = list(sys.path), _read_settings()
    sys.path.insert(0, str(folder))
    try:
        import generate as gf_generate
        import model as gf_model
        import quantize as gf_quantize
    finally:
        sys.path[:] = saved_path  # generate.py also appends a folder of its own
        gpt_fast_settings = _read_settings()
        _write_settings(saved_settings)
    _loaded = types.SimpleNamespace(model=gf_model, generate=gf_generate, quantize=gf_quantize,
                                    decode_one_token=gf_generate.decode_one_token,
                                    settings=gpt_fast_settings, source=_source_record(folder))
    return _loaded


@contextlib.contextmanager
def gpt_fast_settings(gf):
    """gpt-fast's inductor settings while the block runs; the process's own afterwards."""
    saved = _read_settings()
    _write_settings(gf.settings)
    try:
        yield
    finally:
        _write_settings(saved)


# ---- tinyllm's weights in gpt-fast's Transformer ---------------------------------------------

def model_args(gf, c: Config):
    """gpt-fast's ModelArgs for a tinyllm Config."""
    if c.head_dim * c.n_heads != c.dim:
        raise ValueError(f"{c.source}: gpt-fast ties head_dim to dim / n_heads ({c.dim} / {c.n_heads}), "
                         f"this shape has head_dim {c.head_dim}")
    scaling = None
    if c.rope_scaling is not None:
        s = c.rope_scaling
        if s.kind != "llama3":
            raise ValueError(f"{c.source}: gpt-fast has llama3 RoPE scaling only, not {s.kind!r}")
        scaling = {"factor": s.factor, "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    return gf.model.ModelArgs(block_size=c.max_seq_len, vocab_size=c.vocab_size, n_layer=c.n_layers,
                              n_head=c.n_heads, dim=c.dim, intermediate_size=c.hidden_dim,
                              n_local_heads=c.n_kv_heads, rope_base=c.rope_theta, norm_eps=c.norm_eps,
                              rope_scaling=scaling)


def interleave_rope_rows(w, n_heads: int, head_dim: int):
    """Rows of q or k heads from the half-split RoPE pairing (i, i + E/2) to the interleaved
    one (2i, 2i + 1): new row 2i is old row i, new row 2i + 1 is old row i + E/2.
    [n_heads * E, D] -> [n_heads * E, D]"""
    d = w.shape[-1]
    return w.reshape(n_heads, 2, head_dim // 2, d).transpose(1, 2).reshape(n_heads * head_dim, d)


def build_transformer(gf, model: Model, dtype, device: str):
    """gpt-fast's Transformer holding `model`'s weights, in `dtype` on `device`.

    Built on the meta device first, so that no float32 copy of the model is ever made;
    each matrix is then copied (and converted) straight from tinyllm's array."""
    import torch

    c, w = model.config, model.weights
    e, q_rows, kv_rows = c.head_dim, c.n_heads * c.head_dim, c.kv_dim
    with torch.device("meta"):
        net = gf.model.Transformer(model_args(gf, c))
    net = net.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        net.tok_embeddings.weight.copy_(as_torch(w.tok_embeddings))
        net.output.weight.copy_(as_torch(w.output))  # tied: the embedding, copied
        net.norm.weight.copy_(as_torch(w.norm))
        for block, mine in zip(net.layers, w.layers):
            qkv, wqkv = as_torch(mine.wqkv), block.attention.wqkv.weight  # rows q | k | v in both
            wqkv[:q_rows].copy_(interleave_rope_rows(qkv[:q_rows], c.n_heads, e))
            wqkv[q_rows:q_rows + kv_rows].copy_(interleave_rope_rows(qkv[q_rows:q_rows + kv_rows], c.n_kv_heads, e))
            wqkv[q_rows + kv_rows:].copy_(qkv[q_rows + kv_rows:])
            block.attention.wo.weight.copy_(as_torch(mine.wo))
            gate_up = as_torch(mine.w_gate_up)  # [2F, D]: gate rows, then up rows
            block.feed_forward.w1.weight.copy_(gate_up[:c.hidden_dim])
            block.feed_forward.w3.weight.copy_(gate_up[c.hidden_dim:])
            block.feed_forward.w2.weight.copy_(as_torch(mine.w_down))
            block.attention_norm.weight.copy_(as_torch(mine.attn_norm))
            block.ffn_norm.weight.copy_(as_torch(mine.mlp_norm))
    return net.eval()


def quantize_int8(gf, net):
    """gpt-fast's int8 weight-only quantization, as its quantize.py then generate.py apply it."""
    import torch

    handler = gf.quantize.WeightOnlyInt8QuantHandler(net)
    state = handler.create_quantized_state_dict()
    with torch.device("meta"):  # the new modules' empty buffers: replaced by `state` below
        net = handler.convert_for_runtime()
    net.load_state_dict(state, assign=True)
    return net


def _torch_at_least(major: int, minor: int) -> bool:
    import torch

    version = torch.__version__.split("+")[0].split(".")
    return (int(version[0]), int(version[1])) >= (major, minor)


def _prepare_int4(gf, weight_bf16, groupsize: int, inner_k_tiles: int):
    """gpt-fast's prepare_int4_weight_and_scales_and_zeros, with the 4-bit values packed
    two per byte first where torch's _convert_weight_to_int4pack expects them so."""
    import torch

    w_int32, scales_and_zeros = gf.quantize.group_quantize_tensor(weight_bf16, n_bit=4, groupsize=groupsize)
    if _torch_at_least(2, 5):
        # the even column in the high nibble: the order torch's own CUDA tests pack in
        w_int32 = (w_int32[:, ::2] << 4 | w_int32[:, 1::2]).to(torch.uint8)  # [N, K] -> [N, K/2]
    return torch.ops.aten._convert_weight_to_int4pack(w_int32, inner_k_tiles), scales_and_zeros


def quantize_int4(gf, net, groupsize: int = INT4_GROUP_SIZE, device: str = "cuda"):
    """gpt-fast's int4 weight-only quantization (grouped, asymmetric), on a bf16 model."""
    import torch

    handler = gf.quantize.WeightOnlyInt4QuantHandler(net, groupsize)
    original = gf.quantize.prepare_int4_weight_and_scales_and_zeros
    gf.quantize.prepare_int4_weight_and_scales_and_zeros = functools.partial(_prepare_int4, gf)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per matrix
            state = handler.create_quantized_state_dict(use_cuda=True)
    finally:
        gf.quantize.prepare_int4_weight_and_scales_and_zeros = original
    with torch.device("meta"):
        net = handler.convert_for_runtime()
    net.load_state_dict(state, assign=True)  # the packed matrices come back on the host
    return net.to(device)


def model_bytes(gf, net) -> dict:
    kv = sum(b.numel() * b.element_size() for name, b in net.named_buffers() if ".kv_cache." in name)
    everything = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    embedding = net.tok_embeddings.weight
    weights = everything - kv - embedding.numel() * embedding.element_size()
    return {"weight_bytes": weights, "kv_bytes": kv,
            "bytes_per_step": weights + kv + embedding.shape[1] * embedding.element_size(),
            "gpt_fast_model_size": gf.generate._get_model_size(net)[0]}


# ---- running it ---------------------------------------------------------------------------

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_logits(model: Model, net, ids: np.ndarray) -> dict:
    """Prefill logits of every position of `ids` [1, T] from tinyllm's `model` and from its
    gpt-fast copy `net` (whose caches must hold T positions): the largest difference and how
    often the two agree on the arg max."""
    import torch

    t = ids.shape[1]
    mine = to_numpy(model.forward(ids, model.new_cache(t + 8), last_only=False))[0].astype(np.float32)  # [T, V]
    device = net.tok_embeddings.weight.device
    with torch.no_grad():
        theirs = net(torch.as_tensor(ids, device=device), torch.arange(t, device=device))  # [1, T, V]
    theirs = theirs[0].float().cpu().numpy()
    return {"positions": t, "max_abs_diff": float(np.abs(mine - theirs).max()),
            "max_abs_logit": float(np.abs(mine).max()),
            "same_argmax": float((mine.argmax(-1) == theirs.argmax(-1)).mean())}


def gpt_fast_decode(gf, net, ids: np.ndarray, new_tokens: int) -> tuple[list[int], float]:
    """gpt-fast's prefill of `ids` [1, T], then its decode loop for `new_tokens` tokens, greedy.
    Returns the token from the prefill followed by the decoded ones, and the seconds of the
    decode loop alone (synchronised at both ends)."""
    import torch

    device = net.tok_embeddings.weight.device
    prompt = torch.as_tensor(ids, device=device)  # [1, T]
    t = prompt.shape[1]
    first = gf.generate.prefill(net, prompt, torch.arange(0, t, device=device), **GREEDY).clone()  # [1, 1]
    input_pos = torch.tensor([t], device=device, dtype=torch.int)  # advanced in place by the loop
    _sync(device)
    start = time.perf_counter()
    tokens, _ = gf.generate.decode_n_tokens(net, first.view(1, -1), input_pos, new_tokens, **GREEDY)
    _sync(device)
    elapsed = time.perf_counter() - start
    return [int(first)] + torch.cat(tokens, dim=-1).flatten().tolist(), elapsed


def tinyllm_greedy(model: Model, ids: np.ndarray, new_tokens: int) -> list[int]:
    """tinyllm's readable model, greedy: the token after the prompt, then new_tokens more."""
    cache = model.new_cache(ids.shape[1] + new_tokens + 8)
    tokens = [int(np.argmax(to_numpy(model.forward(ids, cache)[0, -1])))]
    for _ in range(new_tokens):
        tokens.append(int(np.argmax(to_numpy(model.forward(np.array([[tokens[-1]]]), cache)[0, -1]))))
    return tokens


def run_mode(gf, model: Model, mode: str, new_tokens: int, repeats: int, reference_tokens=None,
             device: str = "cuda") -> dict:
    """One mode's figures: gpt-fast's model built, quantized, compiled, warmed up and timed."""
    import torch

    torch.manual_seed(1234)
    dtype = torch.bfloat16 if mode == "int4" else torch.float16
    net = build_transformer(gf, model, dtype, device)
    if mode == "int8":
        net = quantize_int8(gf, net)
    elif mode == "int4":
        net = quantize_int4(gf, net, device=device)
    ids = prompt_ids(PROMPT_LEN, model.config.vocab_size)
    with torch.device(device):  # as generate.py: the caches, mask and RoPE table on the device
        net.setup_caches(max_batch_size=1, max_seq_length=PROMPT_LEN + new_tokens + 1)
    row = {"dtype": str(dtype).removeprefix("torch."), **model_bytes(gf, net)}
    if mode == "fp16":
        row["logits_vs_tinyllm"] = compare_logits(model, net, ids)
    gf.generate.decode_one_token = torch.compile(gf.decode_one_token, mode="reduce-overhead", fullgraph=True)
    try:
        start = time.perf_counter()
        tokens, _ = gpt_fast_decode(gf, net, ids, new_tokens)  # warm-up: compiles, records the graphs
        row["first_call_s"] = time.perf_counter() - start
        rates = []
        for _ in range(repeats):
            tokens, seconds = gpt_fast_decode(gf, net, ids, new_tokens)
            rates.append(new_tokens / seconds)
    finally:
        gf.generate.decode_one_token = gf.decode_one_token
    row.update(decode_tok_s=statistics.median(rates), decode_runs=rates, tokens_head=tokens[:9])
    row["GB_s"] = row["bytes_per_step"] * row["decode_tok_s"] / 1e9
    if reference_tokens:
        n = leading_matches(tokens, list(reference_tokens))
        row.update(tokens_compared=len(reference_tokens), leading_tokens_as_tinyllm=n,
                   tokens_match=n == len(reference_tokens))
    return row


def run_peer(shape_name: str, modes=MODES, new_tokens: int = NEW_TOKENS, *, model: Model | None = None,
             reference_tokens=None, repeats: int = 3) -> dict:
    """gpt-fast's batch-1 decode of `shape_name` in each of `modes` ('fp16', 'int8', 'int4').

    `model`: tinyllm's model whose weights gpt-fast receives (default: the shape's random
    fp16 weights, seed 0, as benchmarks/gpu_decode.py draws them). `reference_tokens`:
    tinyllm's greedy tokens for the same prompt (the one after the prompt first), compared
    with gpt-fast's (default: nine from `model`'s readable forward).
    Returns {"modes": {mode: figures or {"error": ...}}, ...}."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown gpt-fast mode {bad[0]!r}; expected some of {', '.join(MODES)}")
    import torch

    result = {"shape": shape_name, "torch": torch.__version__, "prompt_len": PROMPT_LEN, "new_tokens": new_tokens,
              "repeats": repeats, "sampling": GREEDY, "modes": {}}
    try:
        gf = load_gpt_fast()
    except Exception as e:  # every mode needs it
        result["modes"] = {m: {"error": f"{type(e).__name__}: {e}"[:500]} for m in modes}
        return result
    result["gpt_fast"] = gf.source
    if model is None:
        from benchmarks.gpu_models import random_model

        model = random_model(shape_name, "cuda", seed=0)
    if reference_tokens is None:
        reference_tokens = tinyllm_greedy(model, prompt_ids(PROMPT_LEN, model.config.vocab_size), 8)
    with gpt_fast_settings(gf), torch.no_grad():
        for mode in modes:
            print(f"[{shape_name}] gpt-fast {mode}", flush=True)
            try:
                result["modes"][mode] = run_mode(gf, model, mode, new_tokens, repeats, reference_tokens)
            except Exception as e:  # report, never hide, a failing mode
                result["modes"][mode] = {"error": f"{type(e).__name__}: {e}"[:500]}
            finally:  # the next mode starts from an empty cache of compiled graphs and memory
                torch._dynamo.reset()
                gc.collect()
                torch.cuda.empty_cache()
    return result


# ---- the CPU check ------------------------------------------------------------------------

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=97, rope_theta=500000.0,
            norm_eps=1e-5, max_seq_len=256)


def cpu_check(new_tokens: int = 8) -> dict:
    """Float32 on the CPU, nothing compiled: gpt-fast's Transformer holding a tiny random
    tinyllm model's weights computes tinyllm's function. Per case (tied or untied
    embeddings, with llama3 RoPE scaling), the prefill logits of every position agree to
    float32 rounding and gpt-fast's own prefill and decode loop choose tinyllm's greedy
    tokens; its int8 quantizer runs on the same copy (its logits are reported, close but
    not equal). Returns {"ok": bool, case: figures}."""
    import torch

    gf = load_gpt_fast()
    cases = {"untied": {}, "tied": {"tie_embeddings": True},
             "llama3 rope scaling": {"rope_scaling": RopeScaling("llama3", 8.0, original_max_position_embeddings=64)}}
    result = {}
    with torch.no_grad():
        for name, extra in cases.items():
            c = Config(**TINY, **extra, source=f"tiny ({name})")
            model = Model(c, random_weights(c, np, np.float32, seed=1), "cpu")
            net = build_transformer(gf, model, torch.float32, "cpu")
            net.setup_caches(max_batch_size=1, max_seq_length=PROMPT_LEN + new_tokens + 1)
            ids = prompt_ids(PROMPT_LEN, c.vocab_size)
            logits = compare_logits(model, net, ids)
            tokens, _ = gpt_fast_decode(gf, net, ids, new_tokens)
            expected = tinyllm_greedy(model, ids, new_tokens)
            close = logits["max_abs_diff"] <= 1e-4 * max(1.0, logits["max_abs_logit"])
            result[name] = {"logits": logits, "gpt_fast_tokens": tokens, "tinyllm_tokens": expected,
                            "ok": close and tokens == expected}
        int8 = quantize_int8(gf, build_transformer(gf, model, torch.float32, "cpu"))
        int8.setup_caches(max_batch_size=1, max_seq_length=PROMPT_LEN + new_tokens + 1)
        result["int8 (report only)"] = {"logits": compare_logits(model, int8, ids)}
    result["ok"] = all(r.get("ok", True) for r in result.values())
    return result


# ---- command line -------------------------------------------------------------------------

def markdown(result: dict) -> str:
    lines = [f"gpt-fast {(result.get('gpt_fast') or {}).get('commit') or '(commit unknown)'} · torch {result['torch']} · "
             f"{result['shape']} · {result['prompt_len']}-token prompt, {result['new_tokens']} new tokens, greedy", "",
             "| mode | dtype | decode tok/s | bytes/step (MB) | GB/s | first call s | tokens as tinyllm |",
             "|---|---|---|---|---|---|---|"]
    for mode, r in result["modes"].items():
        if "error" in r:
            error = " ".join(r["error"].split()).replace("|", "/")[:300]  # one table cell
            lines.append(f"| {mode} | error: {error} | | | | | |")
            continue
        same = "-" if "tokens_match" not in r else ("yes" if r["tokens_match"] else f"first {r['leading_tokens_as_tinyllm']}")
        lines.append(f"| {mode} | {r['dtype']} | {r['decode_tok_s']:.1f} | {r['bytes_per_step'] / 1e6:.0f} | "
                     f"{r['GB_s']:.0f} | {r['first_call_s']:.1f} | {same} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="tinyllama-1.1b", choices=list(ALL_SHAPES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    ap.add_argument("--cpu-check", action="store_true",
                    help="no GPU: check on the CPU that gpt-fast's model with tinyllm's weights computes tinyllm's function")
    args = ap.parse_args(argv)
    try:
        if args.cpu_check:
            result = cpu_check()
            for name, r in result.items():
                if name != "ok":
                    print(f"{name}: {json.dumps(r)}")
            print("cpu check: " + ("same function" if result["ok"] else "MISMATCH"))
        else:
            result = run_peer(args.shape, args.modes, args.new_tokens, repeats=args.repeats)
            print(markdown(result))
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"gpt_fast_peer: {e}", file=sys.stderr)
        return 1
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())

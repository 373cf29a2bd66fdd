"""The benchmark harness runs end to end on a tiny random model in seconds.

These tests check the harness, never the speed: no assertion on any timing beyond
"it is a positive number", so a slow or busy machine cannot fail them.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def make_tiny_model(directory: Path) -> Path:
    """A random LlamaForCausalLM saved as safetensors, with a word-level tokenizer.json."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    words = "the a of and to in lighthouse keeper stairs harbour boats water weather fog storms".split()
    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def run_module(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_e2e_tinyllm_alone_writes_json_and_markdown(tiny_model, tmp_path):
    run_module("e2e", "--model", str(tiny_model), "--engines", "tinyllm", "--repeats", "2",
               "--new-tokens", "6", "--prefill-lengths", "16", "40", "--gemv-repeats", "3", "--out", str(tmp_path))
    result = json.loads((tmp_path / "e2e.json").read_text())
    assert result["benchmark"] == "e2e"
    assert result["settings"]["new_tokens"] == 6
    assert {"date", "cpu", "commit", "command"} <= set(result["machine"])
    tiny = result["engines"]["tinyllm"]
    assert tiny["repeats"] == 2 and tiny["errors"] == []
    for key in ("load_s", "ttft_s", "decode_tok_s", "prefill_16_tok_s", "prefill_40_tok_s", "peak_rss_mib"):
        s = tiny[key]
        assert len(s["values"]) == 2 and s["min"] <= s["median"] <= s["max"] and s["min"] > 0
    assert len(tiny["generated"]) == 7  # the first token from prefill, then 6 decode steps
    assert result["ratios"] == {}  # no peer ran, so no ratio is made up
    gemv = result["gemv_ceiling"]
    assert gemv["gemvs"] == 2 * 4 + 1  # QKV, output, gate|up, down per layer, then the LM head
    assert gemv["weight_bytes"] == 4 * (2 * (32 * 64 + 32 * 32 + 32 * 128 + 64 * 32) + 64 * 32)
    assert gemv["ceiling_tok_s"] == pytest.approx(1 / gemv["sweep_s"]["median"])
    assert gemv["tinyllm_fraction"] == pytest.approx(tiny["decode_tok_s"]["median"] * gemv["sweep_s"]["median"])
    md = (tmp_path / "e2e.md").read_text()
    assert "| decode (tok/s) |" in md and "NumPy GEMV ceiling" in md


def test_e2e_ratios_come_from_the_same_run(tiny_model, tmp_path):
    pytest.importorskip("transformers")
    run_module("e2e", "--model", str(tiny_model), "--engines", "tinyllm,transformers", "--repeats", "1",
               "--new-tokens", "4", "--prefill-lengths", "16", "--no-gemv", "--out", str(tmp_path))
    result = json.loads((tmp_path / "e2e.json").read_text())
    tiny, peer = result["engines"]["tinyllm"], result["engines"]["transformers"]
    assert peer["repeats"] == 1, peer["errors"]
    ratios = result["ratios"]["transformers"]
    for key in ("load_s", "ttft_s", "decode_tok_s", "prefill_16_tok_s", "peak_rss_mib"):
        assert ratios[key] == pytest.approx(tiny[key]["median"] / peer[key]["median"])
    # the same weights and greedy decoding: transformers must pick tinyllm's tokens
    assert result["greedy_agreement"]["transformers"] == 5
    assert "tinyllm / transformers" in (tmp_path / "e2e.md").read_text()


def test_e2e_unknown_engine_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.e2e", "--engines", "tinyllm,vllm", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--engines: unknown engine 'vllm'" in proc.stderr


def test_components_table_for_every_length(tiny_model, tmp_path):
    run_module("components", "--model", str(tiny_model), "--device", "cpu", "--seq-lens", "1", "8", "32",
               "--repeats", "3", "--out", str(tmp_path))
    result = json.loads((tmp_path / "components.json").read_text())
    assert result["settings"]["dim"] == 32 and result["settings"]["n_kv_heads"] == 2
    (cpu,) = result["devices"]
    assert cpu["device"] == "cpu" and cpu["dtype"] == "float32"
    assert set(cpu["by_seq_len"]) == {"1", "8", "32"}
    for timings in cpu["by_seq_len"].values():
        assert set(timings) == {"rope", "qkv_projection", "attention_scores", "mask_cached", "mask_rebuilt",
                                "attention"}
        assert all(t["n"] == 3 and t["median"] > 0 for t in timings.values())
    md = (tmp_path / "components.md").read_text()
    assert "| mask_rebuilt |" in md and "T=32" in md


def test_scaling_writes_both_curves_and_a_plot(tiny_model, tmp_path):
    run_module("scaling", "--model", str(tiny_model), "--contexts", "16", "32", "--prompt-lengths", "8", "24",
               "--decode-tokens", "3", "--repeats", "2", "--out", str(tmp_path))
    result = json.loads((tmp_path / "scaling.json").read_text())
    tiny = result["engines"]["tinyllm"]
    assert set(tiny["decode_tok_s"]) == {"16", "32"} and set(tiny["prefill_tok_s"]) == {"8", "24"}
    for curve in tiny.values():
        for point in curve.values():
            assert len(point["values"]) == 2 and point["min"] <= point["median"] <= point["max"]
    assert "## decode tok/s by context length" in (tmp_path / "scaling.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result["plot"] is None  # the JSON and the table are written all the same
    else:
        assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_gpu_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    for name in ("tokenizers", "starlette", "uvicorn", "prometheus_client"):
        pytest.importorskip(name)
    return subprocess.run([sys.executable, "benchmarks/gpu_serve.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_gpu_serve_shared_prefix_on_the_cpu(tmp_path):
    """The shared-prefix scenario's plumbing (prompts, the servers with and without a prefix
    cache, the /metrics counters, the report) on a 2-layer random model on the CPU."""
    proc = run_gpu_serve("--device", "cpu", "--shape", "smollm2-135m", "--n-layers", "2", "--vocab-size", "512",
                         "--shared-prefix", "80", "--streams", "3", "--max-tokens", "3", "--repeats", "1",
                         "--clients", "thread", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_serve_shared_prefix_cpu.json").read_text())
    assert result["shared_prefix"] == {"tokens": 80, "question_tokens": 16, "block": 32, "reusable_tokens": 64,
                                       "computed_once_with_cache": True}
    (on,), (off,) = result["servers"]["on"]["runs"]["3"], result["servers"]["off"]["runs"]["3"]
    prompt_tokens = 3 * (80 + 16)
    # the system prompt's two whole blocks are computed by one request and copied by the other two
    assert on["prefix_hit_tokens"] == 2 * 64 and on["prefix_miss_tokens"] == prompt_tokens - 2 * 64
    assert off["prefix_hit_tokens"] == 0 and off["prefix_miss_tokens"] == prompt_tokens
    assert result["servers"]["off"]["prefix_cache_mb"] == 0 < result["servers"]["on"]["prefix_cache_mb"]
    for r in (on, off):
        assert r["exact"] and r["tokens"] == 9 and r["ttft_p90_s"] >= r["ttft_s"] > 0
    md = (tmp_path / "gpu_serve_shared_prefix_cpu.md").read_text()
    assert "| on (256 MB) | 3 |" in md and "| off | 3 |" in md and "TTFT median, off / on" in md


def test_gpu_serve_refuses_what_it_cannot_run(tmp_path):
    proc = run_gpu_serve("--device", "cpu", "--shape", "llama-2-7b", "--out", str(tmp_path))
    assert proc.returncode == 2 and "llama-3.2-1b, llama-3.2-3b, llama-3-8b, got 'llama-2-7b'" in proc.stderr
    proc = run_gpu_serve("--device", "cpu", "--engine", "instant", "--shared-prefix", "64", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--shared-prefix: needs --engine model" in proc.stderr


def test_gpu_serve_engine_process_and_its_timeline_on_the_cpu(tmp_path):
    """--engine-process: the server's engine in a child process, its CPU time counted, and the
    scheduler's side of --timeline recorded there and read back over its pipe."""
    proc = run_gpu_serve("--device", "cpu", "--shape", "smollm2-135m", "--n-layers", "2", "--vocab-size", "512",
                         "--streams", "3", "--max-tokens", "4", "--repeats", "1", "--clients", "thread",
                         "--engine-process", "--timeline", str(tmp_path / "tl"), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads((tmp_path / "gpu_serve_cpu.json").read_text())["runs"]["3"]
    assert run["exact"] and run["tokens"] == 12 and run["engine_cpu_us_per_token"] > 0
    assert run["server_cpu_us_per_token"] >= run["engine_cpu_us_per_token"]  # both processes counted
    events = json.loads((tmp_path / "tl" / "timeline_3-1.json").read_text())
    kinds = [e[0] for e in events]
    assert kinds.count("submit") == 3 and kinds.count("request") == 3  # the engine's and the client's sides
    # and the HTTP process's: each connection accepted, each request received and sent to the engine
    assert kinds.count("received") == 3 and kinds.count("sent") == 3 and kinds.count("accepted") >= 3
    steps = [e for e in events if e[0] == "step"]
    assert len(steps) == run["steps"] and all(0 <= e[1] <= e[2] and e[4] <= 3 for e in steps)
    assert kinds.count("round") >= len(steps) and "admit" in kinds


def test_gpu_serve_with_several_http_processes_on_the_cpu(tmp_path):
    """--http-processes 2: the runs complete through both, and server CPU counts them all."""
    proc = run_gpu_serve("--device", "cpu", "--shape", "smollm2-135m", "--n-layers", "2", "--vocab-size", "512",
                         "--streams", "4", "--max-tokens", "4", "--repeats", "1", "--clients", "thread",
                         "--engine-process", "--http-processes", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads((tmp_path / "gpu_serve_cpu.json").read_text())["runs"]["4"]
    assert run["exact"] and run["tokens"] == 16
    assert run["server_cpu_us_per_token"] >= run["engine_cpu_us_per_token"] > 0


def test_serve_request_cost_on_the_cpu(tmp_path):
    for name in ("tokenizers", "starlette", "uvicorn", "prometheus_client"):
        pytest.importorskip(name)
    proc = subprocess.run([sys.executable, "benchmarks/serve_request_cost.py", "--requests", "5", "--rounds", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "serve_request_cost.json").read_text())
    for kind in ("health", "completion", "stream"):
        (r,) = result["rounds"][kind]
        assert r["wall_ms"] > 0 and r["http_cpu_ms"] > 0

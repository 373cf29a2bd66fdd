"""The line profiler: it reports the lines that ran in the functions it registers, in
milliseconds, leaves out lines that never ran, and needs no decorator in the library."""
from __future__ import annotations

import inspect
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("line_profiler")

from tinyllm import profiling  # noqa: E402
from tinyllm.backend import Device  # noqa: E402
from tinyllm.config import Config  # noqa: E402
from tinyllm.model import LayerWeights, Model, Ops, Weights  # noqa: E402
from tinyllm.sampler import Sampler  # noqa: E402

PACKAGE = Path(profiling.__file__).parent


def tiny_model(device="cpu") -> Model:
    c = Config(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=64, max_seq_len=128)
    rng = np.random.default_rng(0)

    def w(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * 0.1

    layers = [LayerWeights(attn_norm=1 + w(32), wqkv=w((4 + 2 * 2) * 8, 32), wo=w(32, 32), mlp_norm=1 + w(32),
                           w_gate_up=w(2 * 64, 32), w_down=w(32, 64)) for _ in range(c.n_layers)]
    embed = w(64, 32)
    return Model(c, Weights(tok_embeddings=embed, layers=layers, norm=1 + w(32), output=embed), device)


def run_generation(model, n_prompt=5, n_new=3):
    sampler = Sampler(temperature=0.8, top_k=10, seed=0)
    cache = model.new_cache(32)
    token = sampler(model.forward(np.arange(n_prompt)[None, :], cache)[0, -1])
    for _ in range(n_new):
        token = sampler(model.forward(np.asarray([[token]]), cache)[0, -1])


def report_lines(report: str, func) -> list[str]:
    """The report's rows (line number, hits, ms, ms/hit, %, source) for one function."""
    start = report.index(f"\n{func.__qualname__}  tinyllm/") + 1  # the function's section, not the summary
    block = report[start:].split("\n\n")[0]
    return [row for row in block.splitlines()[2:]]


def test_report_shows_profiled_functions_lines_in_ms():
    model = tiny_model()
    out = io.StringIO()
    with profiling.profile(model, out=out) as prof:
        run_generation(model)
    report = out.getvalue()
    assert report == prof.report + "\n"
    for func in (Model.forward_block, Ops.attention, Ops.rms_norm, Ops.linear, Ops.swiglu, Sampler.__call__):
        rows = report_lines(report, func)
        assert rows, func.__qualname__
        source, first = inspect.getsourcelines(func)
        for row in rows:
            number, hits, ms, per_hit, pct, text = re.match(
                r"\s*(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)  (.*)$", row).groups()
            # the source printed is the function's own line with that number
            assert text == source[int(number) - first].rstrip()
            assert int(hits) > 0
    # forward_block ran 4 times (prefill + 3 decode steps): its per-layer lines twice as often
    block = {int(r.split()[0]): int(r.split()[1]) for r in report_lines(report, Model.forward_block)}
    assert max(block.values()) >= 4 * model.config.n_layers
    assert "line profile on cpu" in report.splitlines()[0] and "CUDA" not in report


def test_lines_that_never_ran_are_left_out():
    model = tiny_model()
    out = io.StringIO()
    with profiling.profile(model, out=out):
        run_generation(model, n_prompt=4, n_new=1)
    rows = report_lines(out.getvalue(), Model.forward)
    source, first = inspect.getsourcelines(Model.forward)
    chunk_lines = [first + i for i, text in enumerate(source) if "PREFILL_CHUNK)" in text and "for i in" in text]
    assert chunk_lines, "Model.forward no longer prefills long prompts in chunks; update this test"
    shown = {int(r.split()[0]) for r in rows}
    assert not shown & set(chunk_lines)  # a 4-token prompt never takes the chunked branch
    assert all(int(r.split()[1]) > 0 for r in rows)


def test_disabled_profile_is_a_no_op():
    model = tiny_model()
    out = io.StringIO()
    with profiling.profile(model, enabled=False, out=out):
        run_generation(model, n_new=1)
    assert out.getvalue() == ""


@dataclass(frozen=True)
class CountingDevice(Device):
    """A 'cuda' device backed by NumPy whose synchronise only counts: the CUDA branch of the
    profiler, checked without a GPU."""

    calls: list = None

    def synchronize(self):
        self.calls.append(1)


def test_cuda_path_synchronises_after_each_op_and_says_so():
    calls = []
    model = tiny_model(CountingDevice("cuda", 0, np, calls))
    fast_ops = model.ops
    out = io.StringIO()
    with profiling.profile(model, out=out):
        assert isinstance(model.ops, profiling.SynchronisedOps)
        model.forward(np.arange(3)[None, :], model.new_cache(8))
    assert model.ops is fast_ops  # restored afterwards
    header = out.getvalue().split("\n\n")[0]
    assert "cuda:0" in header and "device synchronisation after each op" in header
    assert len(calls) >= 6 * model.config.n_layers  # norms, linears, rope, attention, swiglu, adds per layer


def test_missing_line_profiler_is_a_one_line_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "line_profiler", None)
    with pytest.raises(profiling.ProfilerMissingError, match=r"--profile needs line_profiler.*pip install"):
        profiling.profile(tiny_model())


def test_library_carries_no_profile_decorator():
    for path in PACKAGE.rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not re.match(r"\s*@profile\b", line), f"{path}: {line.strip()}"


def test_run_profile_flag_prints_the_report(tmp_path):
    """`python -m tinyllm.run --profile` on a tiny model: the answer on stdout, the profile on stderr."""
    import subprocess
    import sys

    from test_benchmarks import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "tiny")
    proc = subprocess.run([sys.executable, "-m", "tinyllm.run", "--model", str(model_dir), "--raw", "--prompt",
                           "the keeper and the boats", "--max-new-tokens", "3", "--profile"],
                          cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tinyllm --profile: line profile on cpu" in proc.stderr
    assert "tinyllm --profile" not in proc.stdout
    for func in (Model.forward_block, Ops.attention, Sampler.__call__):
        assert f"\n{func.__qualname__}  tinyllm/" in proc.stderr
    source = inspect.getsource(Model.forward_block)
    qkv_line = next(line for line in source.splitlines() if "ops.norm_linear(x, layer.attn_norm" in line)
    assert qkv_line.rstrip() in proc.stderr  # the line itself, with its timing row

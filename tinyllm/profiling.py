"""Line-by-line profiling: which line of the forward pass, the sampler or the loop costs what.

    python -m tinyllm.run --profile "Why is the sky blue?"

    with tinyllm.profiling.profile(llm):         # or from Python
        ...generate...

A sampling profiler (cProfile, py-spy) names the functions that are slow; in a
model written as a handful of NumPy lines per function, the question is *which
line*. `line_profiler` times every line of the functions it is given. tinyllm gives
it the functions programmatically (`LineProfiler.add_function`), so the library
never carries an `@profile` decorator and a normal run pays nothing.

Profiled: the model's `forward` and `forward_block`, every operation of its `Ops`
(rms_norm, linear, rope, attention, softmax, swiglu, ...), RoPE and the KV cache
writes, the sampler, and the generation loop. The report lists functions by total
time, then their lines in milliseconds; lines that never ran are left out. A line's
time includes the functions it calls, so nested functions' totals overlap.

On CUDA, GPU work is queued and the clock would land on whichever line happens to
wait. While profiling, the model therefore runs the readable operations with a
device synchronisation after each one (never the fused fast path), and the report
header says so: the figures show where time goes, slower than a normal run.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import linecache
import sys
import time

from .errors import TinyLLMError

PROFILE_INSTALL = "pip install 'tinyllm[profile]'  (or: pip install line-profiler)"
# Modules whose own functions and methods are profiled, besides the model's classes.
MODULES = ("tinyllm.model", "tinyllm.rope", "tinyllm.kv_cache", "tinyllm.sampler", "tinyllm.generate")


class ProfilerMissingError(TinyLLMError, ImportError):
    """--profile without line_profiler installed."""


def new_line_profiler():
    try:
        from line_profiler import LineProfiler
    except ImportError:
        raise ProfilerMissingError(f"--profile needs line_profiler, which is not installed: {PROFILE_INSTALL}") from None
    return LineProfiler()


def check_available() -> None:
    """Raise ProfilerMissingError now (e.g. before a slow model load) if line_profiler is missing."""
    new_line_profiler()


def own_functions(obj, module_name: str) -> list:
    """Plain functions defined in module `module_name`, found in a module or a class
    (methods of the classes it defines included)."""
    found = []
    for value in vars(obj).values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        if inspect.isfunction(value) and value.__module__ == module_name and not generated(value):
            found.append(value)
        elif inspect.isclass(value) and value.__module__ == module_name and value is not obj:
            found += own_functions(value, module_name)
    return found


def generated(func) -> bool:
    """Dunder methods (mostly written by @dataclass) say nothing about where time goes;
    __call__ and __iter__ are kept: samplers and generation loops live there."""
    name = func.__name__
    return name.startswith("__") and name.endswith("__") and name not in ("__call__", "__iter__", "__next__")


def functions_to_profile(model) -> list:
    """The forward pass, its operations (whatever Ops class the model uses), RoPE, the KV cache,
    the sampler and the generation loop."""
    funcs = []
    for name in MODULES:
        try:
            funcs += own_functions(importlib.import_module(name), name)
        except ImportError:  # a module not written yet, or an optional one
            continue
    for cls in type(model).__mro__ + type(model.ops).__mro__:  # fast-path subclasses too
        if cls is not object:
            funcs += [f for f in vars(cls).values() if inspect.isfunction(f) and not generated(f)]
    unique = {}
    for f in funcs:
        unique.setdefault(f.__code__, f)  # one entry per code object
    return list(unique.values())


class SynchronisedOps:
    """Wraps an Ops object: every operation waits for the GPU before returning, so the time
    a queued kernel takes is charged to the line that called that operation."""

    def __init__(self, ops, device):
        self._ops, self._device = ops, device

    def __getattr__(self, name):
        attr = getattr(self._ops, name)
        if not callable(attr):
            return attr

        def synchronised(*args, **kwargs):
            out = attr(*args, **kwargs)
            self._device.synchronize()
            return out

        return synchronised


class Profile:
    """Context manager: line-profile everything inside the `with` block, then print the report."""

    def __init__(self, llm, out=None, title: str = "tinyllm --profile"):
        self.llm = llm if hasattr(llm, "step") else None  # an LLM, or a bare Model
        self.model = llm.model if self.llm is not None else llm
        self.out = out if out is not None else sys.stderr
        self.title = title
        self.profiler = new_line_profiler()
        self.functions = functions_to_profile(self.model)
        self.report = ""

    def __enter__(self):
        for f in self.functions:
            self.profiler.add_function(f)
        device = self.model.device
        self.saved_ops = self.model.ops
        if self.llm is not None:
            # the readable step: a fast one would replay a CUDA graph, which no line profiler sees
            from .step import ReadableStep

            self.saved_step, self.llm.step = self.llm.step, ReadableStep(self.model)
        if device.is_cuda:
            from .model import Ops

            readable = Ops(self.model.xp)  # the readable path, never the fused kernels
            self.model.ops = SynchronisedOps(readable, device)
        self.start = time.perf_counter()
        self.profiler.enable_by_count()
        return self

    def __exit__(self, *exc):
        self.profiler.disable_by_count()
        wall = time.perf_counter() - self.start
        self.model.ops = self.saved_ops
        if self.llm is not None:
            self.llm.step = self.saved_step
        self.report = format_report(self.profiler.get_stats(), wall, self.header(wall))
        print(self.report, file=self.out, flush=True)
        return False

    def header(self, wall: float) -> str:
        device = self.model.device
        lines = [f"{self.title}: line profile on {device.name}, {wall * 1e3:.1f} ms wall time under the profiler "
                 "(line_profiler adds overhead to every line; compare lines with each other, not with a normal run)."]
        if device.is_cuda:
            lines.append("CUDA: profiled on the readable path (tinyllm.model.Ops, no fused kernels, no CUDA graph) "
                         "with a device synchronisation after each op, so an op's GPU time lands on the line that "
                         "called it; lines inside an op show host (launch) time only.")
        return "\n".join(lines)


def profile(llm, enabled: bool = True, out=None, title: str = "tinyllm --profile"):
    """`with profile(llm):` profiles the block; `enabled=False` makes it a no-op (for a CLI flag)."""
    return Profile(llm, out, title) if enabled else contextlib.nullcontext()


def format_report(stats, wall: float, header: str) -> str:
    """Functions by total time, then each one's lines that ran: hits, ms, ms per hit, % of the function."""
    unit_ms = stats.unit * 1e3
    functions = []
    for (filename, first_line, name), timings in stats.timings.items():
        timings = [(line, hits, t) for line, hits, t in timings if hits > 0]
        if timings:
            total_ms = sum(t for _, _, t in timings) * unit_ms
            functions.append((total_ms, filename, first_line, name, timings))
    functions.sort(key=lambda f: -f[0])

    out = [header, "", "Functions by total time (a caller's time includes its callees):", ""]
    out.append(f"{'total ms':>10}  {'% wall':>6}  function")
    for total_ms, filename, first_line, name, _ in functions:
        out.append(f"{total_ms:10.1f}  {100 * total_ms / (wall * 1e3):6.1f}  {name}  ({short(filename)}:{first_line})")
    for total_ms, filename, first_line, name, timings in functions:
        out += ["", f"{name}  {short(filename)}:{first_line}  total {total_ms:.1f} ms",
                f"{'line':>6} {'hits':>8} {'ms':>10} {'ms/hit':>9} {'%':>6}  source"]
        for line, hits, t in sorted(timings):
            ms = t * unit_ms
            source = linecache.getline(filename, line).rstrip()
            out.append(f"{line:6d} {hits:8d} {ms:10.2f} {ms / hits:9.4f} {100 * ms / total_ms if total_ms else 0:6.1f}  {source}")
    return "\n".join(out)


def short(filename: str) -> str:
    """Paths inside the package as tinyllm/..., others unchanged."""
    marker = "tinyllm/"
    i = filename.rfind(marker)
    return filename[i:] if i >= 0 else filename

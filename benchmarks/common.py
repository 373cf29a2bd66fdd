"""What every benchmark shares: honest timing, the machine's description, prompts, output files.

Honest here means: a warm-up before any clock is read, several repeats reported as
min and median (never one lucky run), prefill and decode reported apart, and the
date, machine and commit written next to every figure.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A plain passage, tokenized and repeated until a prompt has exactly the length asked for.
PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps "
    "as his father had taught him. Below, the harbour filled with fishing boats returning from "
    "the grey water, their engines coughing, gulls circling over the nets. He trimmed the wick, "
    "polished the great lens until the brass frame shone, and wrote the weather in a ledger that "
    "had been kept without a missing day for ninety-one years. Storms came from the west in "
    "autumn; in spring the fog rolled in so thick that the horn sounded through the night. "
)
CHAT_QUESTION = (
    "I am planning a three-day walking trip along a coastal path in early spring. Which clothes "
    "and gear should I pack, how far should I plan to walk each day, and what should I do if the "
    "weather turns bad halfway through a stage? Please answer in a short list."
)


def summarize(values: list[float]) -> dict:
    """min / median / max of repeated measurements, with the raw values kept."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "n": len(values), "values": values}


def peak_rss_mib() -> float:
    """The peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def best_of(fn, repeats: int = 5, warmup: int = 1, sync=None) -> dict:
    """Time fn() `repeats` times after `warmup` calls; `sync` (e.g. a GPU synchronise)
    runs before each clock read so that queued work is counted."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return summarize(times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_name() -> str:
    import numpy as np

    try:
        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{info.get('name', '?')} {info.get('version', '')}".strip()
    except Exception:
        return "unknown"


def git_commit() -> str:
    """Short commit hash of the repository, with '+dirty' when tracked files differ from it;
    $TINYLLM_COMMIT when set (the GPU machine gets a copy of the tree whose .git may be stale)."""
    if os.environ.get("TINYLLM_COMMIT"):
        return os.environ["TINYLLM_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info(threads: int | None = None) -> dict:
    import numpy as np

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),  # set by the workers, or by the caller
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas_name(),
        "commit": git_commit(),
        "command": command_line(),
    }


def command_line() -> str:
    """How this benchmark was started, as one could type it again."""
    env = os.environ.get("OPENBLAS_NUM_THREADS")
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    name = f"python -m {script.parent.name}.{script.stem}" if script else "python"
    return (f"OPENBLAS_NUM_THREADS={env} " if env else "") + " ".join([name] + sys.argv[1:])


def thread_env(threads: int) -> dict:
    """Environment for a worker process: every BLAS / OpenMP pool limited to `threads`."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# ---- prompts ----------------------------------------------------------------------------------

def load_tokenizer(path: str | Path | None):
    """tinyllm's tokenizer for a checkpoint, without loading (dequantizing) its weights."""
    from tinyllm.loaders import default_model_path
    from tinyllm.tokenizer import Tokenizer

    path = default_model_path() if path is None else Path(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and len(list(path.glob("*.gguf"))) == 1:
        path = next(path.glob("*.gguf"))
    if path.suffix == ".gguf":
        from tinyllm.loaders.gguf import field_values, open_gguf

        return Tokenizer.from_gguf_fields(field_values(open_gguf(path)), str(path))
    return Tokenizer.from_dir(path if path.is_dir() else path.parent)


def prompt_ids(tokenizer, n: int) -> list[int]:
    """Exactly n token ids of plain text (BOS first when the model uses one)."""
    ids = list(tokenizer.encode(PASSAGE))
    body = [i for i in ids if i != tokenizer.bos_id] or [0]
    out = ids[:1] if ids and ids[0] == tokenizer.bos_id else []
    while len(out) < n:
        out += body
    return out[:n]


def chat_prompt_ids(tokenizer) -> list[int]:
    """The chat question through the model's own chat template (plain text if it has none)."""
    template = tokenizer.chat_template
    if not template:
        return list(tokenizer.encode(CHAT_QUESTION))
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    text = ImmutableSandboxedEnvironment().from_string(template).render(
        messages=[{"role": "user", "content": CHAT_QUESTION}], add_generation_prompt=True,
        bos_token="", eos_token="")
    return list(tokenizer.encode(text))


# ---- output -----------------------------------------------------------------------------------

def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x, digits: int = 3) -> str:
    """A number with `digits` significant figures, '-' for missing."""
    if x is None:
        return "-"
    if isinstance(x, int) or abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def header_markdown(info: dict) -> str:
    threads = info.get("threads") or info.get("OPENBLAS_NUM_THREADS")
    threads = f", {threads} threads" if threads else ""
    return (f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores{threads}), "
            f"NumPy {info['numpy']} ({info['blas']}), Python {info['python']}, commit `{info['commit']}`, "
            f"load average (1 min) {fmt(info['load_average'], 2)} at the start"
            + (f", {fmt(info['load_average_end'], 2)} at the end" if info.get("load_average_end") is not None else "")
            + f".\n\nCommand: `{info['command']}`\n")


def mark_end(info: dict) -> None:
    """Record the load average when the measurements are over (other work on the machine skews them)."""
    info["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def publish(out_dir: str | Path, name: str, result: dict, to_markdown, extra=()) -> None:
    """A benchmark's last step: record the end load average, write NAME.json and NAME.md,
    print the table, and say which files were written (`extra`: more files, e.g. a plot)."""
    mark_end(result["machine"])
    md = to_markdown(result)
    paths = [*write_outputs(out_dir, name, result, md), *extra]
    print(md)
    print("\nwrote " + ", ".join(map(str, paths[:-1])) + f" and {paths[-1]}", file=sys.stderr)


def write_outputs(out_dir: str | Path, name: str, result: dict, markdown: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def leading_matches(a: list[int], b: list[int]) -> int:
    """How many tokens two generations share before they first differ."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

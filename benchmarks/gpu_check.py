"""Every GPU check and benchmark in one call, ending with a short pass/fail table.

    python benchmarks/gpu_check.py [--out DIR] [--peers none|eager|all] [--skip-tests] [--skip-bench]

1. tests/test_cuda.py and tests/test_cuda_bf16.py under pytest (the kernels against NumPy
   and torch, the whole models against NumPy and transformers, graph replay against eager,
   fast against readable, seeded device sampling, device errors; the same in bf16); each
   test's measured errors are
   collected through the TINYLLM_GPU_REPORT file;
2. benchmarks/gpu_decode.py (decode, prefill and TTFT, peers side by side).
Writes DIR/gpu_tests.json, DIR/gpu_tests.xml, DIR/gpu_bench.json and DIR/gpu_check.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_tests(out: Path, extra: list[str]) -> list[dict]:
    report = out / "gpu_tests.jsonl"
    report.unlink(missing_ok=True)
    xml = out / "gpu_tests.xml"
    env = {**os.environ, "TINYLLM_GPU_REPORT": str(report), "PYTHONUNBUFFERED": "1"}
    # --noconftest: the CPU suite's conftest needs packages (gguf) this file does not
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "--noconftest", "-p", "no:cacheprovider",
           f"--junitxml={xml}", str(REPO / "tests" / "test_cuda.py"), str(REPO / "tests" / "test_cuda_bf16.py"),
           *extra]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env)
    print(f"tests took {time.perf_counter() - start:.0f} s", flush=True)
    metrics: dict[str, dict] = {}
    if report.exists():
        for line in report.read_text().splitlines():
            d = json.loads(line)
            metrics.setdefault(d.pop("test"), {}).update(d)
    rows = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            status = "pass"
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    status = {"failure": "FAIL", "error": "ERROR", "skipped": "skip"}[tag]
                    detail = (el.get("message") or "").splitlines()[0][:100] if el.get("message") else ""
                    break
            else:
                detail = ""
            name = case.get("name")
            rows.append({"test": name, "status": status, "seconds": float(case.get("time", 0)),
                         "metrics": metrics.get(name, {}), "detail": detail})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| test | result | s | measured |", "|---|---|---|---|"]
    for r in rows:
        m = ", ".join(f"{k}={v:.3g}" for k, v in r["metrics"].items())
        lines.append(f"| {r['test']} | {r['status']} | {r['seconds']:.1f} | {m} {r['detail']} |")
    n_pass = sum(r["status"] == "pass" for r in rows)
    lines.append(f"\n{n_pass}/{len(rows)} passed, "
                 f"{sum(r['status'] in ('FAIL', 'ERROR') for r in rows)} failed, "
                 f"{sum(r['status'] == 'skip' for r in rows)} skipped")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "gpu_out")))
    ap.add_argument("--peers", default="all", choices=["none", "eager", "all"])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--pytest-args", default="")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [] if args.skip_tests else run_tests(args.out, args.pytest_args.split())
    (args.out / "gpu_tests.json").write_text(json.dumps(rows, indent=1))
    bench_md = ""
    if not args.skip_bench:
        sys.path.insert(0, str(REPO))
        from benchmarks import gpu_decode

        try:
            res = gpu_decode.main(["--peers", args.peers, "--out", str(args.out / "gpu_bench.json")])
            bench_md = gpu_decode.markdown(res)
        except Exception as e:
            import traceback

            traceback.print_exc()
            bench_md = f"benchmark failed: {type(e).__name__}: {e}"
    text = table(rows) + "\n\n" + bench_md
    (args.out / "gpu_check.md").write_text(text)
    print("\n" + text)
    return 0 if all(r["status"] in ("pass", "skip") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

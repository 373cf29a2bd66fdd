"""`--model org/name` and `org/name:file.gguf` through huggingface_hub's cache, offline.

The cache is built in the test with huggingface_hub's own layout (blobs named by their hash,
snapshot files that link to them, refs/main naming the snapshot), holding tiny checkpoints
made here; HF_HUB_OFFLINE=1, so nothing can reach the network."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllm.loaders import hub_id

pytest.importorskip("huggingface_hub")

ROOT = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """Lay `files` (name in the repository -> local file) out as huggingface_hub caches a
    download of `repo` at REVISION; -> the snapshot directory."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / REVISION
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A hub cache holding `tiny-org/tiny-llama` (safetensors + tokenizer, and a PyTorch .bin
    that must not be needed) and `tiny-org/tiny-gguf` (one GGUF); plus the same safetensors
    checkpoint as a plain directory, to compare with."""
    from conftest import make_hf_model, tiny_checkpoint_dir, write_gguf

    local = tmp_path_factory.mktemp("local_model")
    tiny_checkpoint_dir(local)
    gguf_path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    gguf_tensors = write_gguf(make_hf_model(seed=1), gguf_path)

    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"
    files = {p.name: p for p in local.iterdir()}
    put_in_hub_cache(cache, "tiny-org/tiny-llama", files)
    put_in_hub_cache(cache, "tiny-org/tiny-gguf", {"tiny.gguf": gguf_path})
    return {"home": home, "cache": cache, "local": local, "gguf_tensors": gguf_tensors}


def offline_env(hub_cache) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return env | {"HF_HOME": str(hub_cache["home"]), "HF_HUB_CACHE": str(hub_cache["cache"]),
                  "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}


def run(hub_cache, *args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, encoding="utf-8", cwd=ROOT,
                          env=offline_env(hub_cache), stdin=subprocess.DEVNULL, timeout=300)


def test_hub_ids_and_paths_are_told_apart():
    assert hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")["repo"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    m = hub_id("bartowski/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct-Q4_K_M.gguf")
    assert (m["repo"], m["file"]) == ("bartowski/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct-Q4_K_M.gguf")
    assert hub_id("TinyLlama/TinyLlama-1.1B-Chat-v1.0")["file"] is None
    for path in ("/abs/model.gguf", "model.gguf", "./org/name", "models/x.gguf", "a/b/c", "dir/model.safetensors",
                 "org/", "/org/name", "C:\\models\\x.gguf"):
        assert hub_id(path) is None, path


def test_model_by_hub_name_runs_offline_from_the_cache(hub_cache):
    """`--model org/name` gives the same ids as the same checkpoint given by its local path."""
    common = ["-m", "tinyllm.run", "--raw", "-n", "5", "--json", "a baker had"]
    by_name = run(hub_cache, *common, "--model", "tiny-org/tiny-llama")
    assert by_name.returncode == 0, by_name.stderr
    by_path = run(hub_cache, *common, "--model", str(hub_cache["local"]))
    assert by_path.returncode == 0, by_path.stderr
    a, b = json.loads(by_name.stdout), json.loads(by_path.stdout)
    assert (a["prompt_ids"], a["token_ids"]) == (b["prompt_ids"], b["token_ids"])
    assert a["model"] == str(hub_cache["cache"] / "models--tiny-org--tiny-llama" / "snapshots" / REVISION)


def test_gguf_file_by_hub_name(hub_cache):
    """`org/name:file.gguf` is that file in the cache, read as a GGUF."""
    import numpy as np

    code = ("import sys, numpy as np; from tinyllm.loaders import read_checkpoint; "
            "c = read_checkpoint('tiny-org/tiny-gguf:tiny.gguf'); "
            "print(c.path, c.format); np.save(sys.argv[1], c.tensors['model.norm.weight'])")
    out = hub_cache["home"] / "norm.npy"
    r = run(hub_cache, "-c", code, str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(hub_cache["cache"] / "models--tiny-org--tiny-gguf" / "snapshots" / REVISION /
                                    "tiny.gguf"), "gguf"]
    np.testing.assert_array_equal(np.load(out), hub_cache["gguf_tensors"]["model.norm.weight"])


@pytest.mark.parametrize("model, message", [
    ("tiny-org/not-cached", "tiny-org/not-cached: not in the Hugging Face cache"),
    ("tiny-org/tiny-gguf:other.gguf", "tiny-org/tiny-gguf:other.gguf: not in the Hugging Face cache"),
])
def test_missing_model_offline_is_one_line(hub_cache, model, message):
    r = run(hub_cache, "-m", "tinyllm.run", "--model", model, "--raw", "hi")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr and "HF_HUB_OFFLINE is set" in r.stderr

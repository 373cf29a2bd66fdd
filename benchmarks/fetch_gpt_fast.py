"""Copy gpt-fast's model.py, generate.py and quantize.py into .gptfast/ for the GPU peer.

gpt-fast (pytorch-labs/gpt-fast) is not a package and is never committed here: its three
files are copied from a local source into the ignored folder `.gptfast/` at the repository
root, which travels to the GPU machine with the working tree. benchmarks/gpt_fast_peer.py
imports them from there.

    python benchmarks/fetch_gpt_fast.py /path/to/gpt-fast            # a clone, or a plain copy
    python benchmarks/fetch_gpt_fast.py /path/to/gpt-fast.git --rev main   # a bare mirror

The source is a git directory (a clone or a bare mirror; the files are read at --rev, so
local edits in a clone's work tree are not picked up) or a plain folder holding the files.
`.gptfast/SOURCE.json` records where they came from, the commit when known, and each
file's SHA-256, so that the peer can report which gpt-fast it ran and whether the copies
were edited since.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILES = ("model.py", "generate.py", "quantize.py")
DEFAULT_DEST = REPO / ".gptfast"


def git_dir_of(source: Path) -> Path | None:
    """The git directory of a clone (source/.git) or of a bare mirror (source), else None."""
    if (source / ".git").exists():
        return source / ".git"
    if (source / "HEAD").is_file() and (source / "objects").is_dir():
        return source
    return None


def read_files(source: Path, rev: str) -> tuple[dict[str, bytes], str | None]:
    """{name: bytes} of FILES from `source`, and the commit they were read at (None for a plain folder)."""
    git_dir = git_dir_of(source)
    if git_dir is None:
        missing = [name for name in FILES if not (source / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{source}: not a git directory and missing {', '.join(missing)}")
        return {name: (source / name).read_bytes() for name in FILES}, None

    def git(*args) -> bytes:
        proc = subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True)
        if proc.returncode:
            raise FileNotFoundError(f"{git_dir}: git {' '.join(args)} failed: {proc.stderr.decode().strip()}")
        return proc.stdout

    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}").decode().strip()
    return {name: git("show", f"{commit}:{name}") for name in FILES}, commit


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(source: Path, dest: Path = DEFAULT_DEST, rev: str = "HEAD") -> dict:
    files, commit = read_files(source, rev)
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (dest / name).write_bytes(data)
    record = {"source": str(source), "commit": commit, "sha256": {name: sha256(data) for name, data in files.items()}}
    (dest / "SOURCE.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", type=Path, help="a gpt-fast clone, bare mirror, or plain folder with its files")
    ap.add_argument("--rev", default="HEAD", help="the revision to read from a git source (default HEAD)")
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"where to copy them (default {DEFAULT_DEST})")
    args = ap.parse_args(argv)
    try:
        record = fetch(args.source, args.dest, args.rev)
    except (FileNotFoundError, OSError) as e:
        print(f"fetch_gpt_fast: {e}", file=sys.stderr)
        return 1
    print(f"copied {', '.join(FILES)} of gpt-fast {record['commit'] or '(commit unknown)'} to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

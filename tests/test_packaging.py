"""The built wheel holds every file the package reads at run time.

An editable install reads the source tree, so it hides a file that the wheel leaves out
(kernels.cu once was). This test builds the wheel from a copy of the sources, installs it
into a folder outside the source tree and checks, from a process that cannot see the
sources, that each file of the source package is there and that the modules which read
data files at import find them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _package_files(root: Path) -> set[str]:
    """Every file of the source package, as a path relative to `root` (caches left out)."""
    return {p.relative_to(root).as_posix() for p in (root / "tinyllm").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "tinyllm", src / "tinyllm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (built,) = out.glob("tinyllm-*.whl")
    return built


def test_wheel_holds_every_package_file(wheel):
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = {n for n in zf.namelist() if n.startswith("tinyllm/")}
    missing = sorted(_package_files(REPO) - in_wheel)
    assert not missing, f"files of the package that the wheel lacks: {missing}"


def test_installed_wheel_finds_its_files(wheel, tmp_path):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # A fresh interpreter whose path holds the install and not the sources: the kernels'
    # source is read when tinyllm.cuda.kernels is imported (CuPy itself is imported lazily).
    probe = (
        "import sys, tinyllm, tinyllm.cuda.kernels as k\n"
        "from pathlib import Path\n"
        "root = Path(tinyllm.__file__).parent\n"
        f"assert root.is_relative_to({str(target)!r}), root\n"
        "assert '__global__' in k.SOURCE\n"
        "print('\\n'.join(sorted(p.relative_to(root.parent).as_posix() for p in root.rglob('*')"
        " if p.is_file() and '__pycache__' not in p.parts)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    installed = set(done.stdout.split())
    missing = sorted(_package_files(REPO) - installed)
    assert not missing, f"files of the package missing after installing the wheel: {missing}"

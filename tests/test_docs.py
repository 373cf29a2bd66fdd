"""The tutorial in docs/ is tested like code.

1. Every ```python block of every chapter (docs/NN-*.md) runs, in order, in one namespace
   per chapter, and what it prints must equal the ```text block that follows it in the
   chapter (a block with no ```text block after it must print nothing). A block fenced
   ```python no-run is shown but not executed (the few that need a GPU).
   Each block also runs alone, in a fresh namespace, as a reader pasting it into a new
   interpreter started in the repository root would run it, and prints the same: its
   imports and setup are in the block, and what it takes from earlier blocks it gets through
   `docs/tutorial.py`'s `earlier()`.
2. Every link into the repository (`[...](../tinyllm/model.py)`) points at a file that
   exists, and when the link's text names code (`Ops.rms_norm`, `apply_rope`,
   `KVCache.nbytes`), that name is defined in the linked file: a rename cannot silently
   break the tutorial. Links between docs pages must resolve too.
3. Every exercise solution, docs/solutions/NN_*.py, runs as a script (its asserts are the
   check), and chapter NN links it.

`tinyllm.load()` takes seconds, so the chapters share one loaded default model: while a
chapter runs, `tinyllm.load()` with no arguments returns the module's shared LLM.

To see what a chapter's blocks print (when writing one):

    python tests/test_docs.py docs/07-attention.md            # print each block's output
    python tests/test_docs.py --write docs/07-attention.md    # rewrite its ```text blocks
"""
from __future__ import annotations

import ast
import contextlib
import io
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHAPTERS = sorted(DOCS.glob("[0-9][0-9]-*.md"))
PAGES = sorted(DOCS.glob("*.md"))

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


# ---- reading a chapter ---------------------------------------------------------------------
def code_blocks(text: str):
    """(source, expected output or None, span of the text block or None, line) for every
    runnable python block, in order."""
    fences = list(FENCE.finditer(text))
    blocks = []
    for i, m in enumerate(fences):
        if m.group(1).strip() != "python":
            continue
        expected, span = None, None
        nxt = fences[i + 1] if i + 1 < len(fences) else None
        if nxt is not None and nxt.group(1).strip() == "text" and not text[m.end():nxt.start()].strip():
            expected, span = nxt.group(2), nxt.span()
        blocks.append((m.group(2), expected, span, text.count("\n", 0, m.start()) + 1))
    return blocks


def normalize(out: str) -> str:
    return "\n".join(line.rstrip() for line in out.strip("\n").splitlines())


# ---- running a chapter -----------------------------------------------------------------------
@contextlib.contextmanager
def shared_default_model(llm):
    """`tinyllm.load()` (no arguments) returns `llm` while the chapter runs."""
    import tinyllm

    real = tinyllm.load

    def load(path=None, device="cpu", dtype=None, **kwargs):
        if path is None and device == "cpu" and dtype is None and llm is not None:
            return llm
        return real(path, device, dtype, **kwargs)

    tinyllm.load = load
    try:
        yield
    finally:
        tinyllm.load = real


def run_chapter(path: Path, llm=None):
    """Run every block; yield (line, source, expected, printed) one block at a time."""
    ns = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    with shared_default_model(llm):
        for source, expected, span, line in code_blocks(path.read_text(encoding="utf-8")):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(source, f"{path.name}:{line}", "exec"), ns)
            yield line, source, expected, out.getvalue()


@contextlib.contextmanager
def one_blas_thread():
    """Run NumPy's OpenBLAS with one thread, restoring the count afterwards.

    The snippets check printed values, not speed. On two cores shared with other work, two
    OpenBLAS threads wait on each other and a decode step gets tens of times slower
    (docs/profiling.md), which made this test take minutes; one thread keeps it steady.
    A no-op where NumPy's OpenBLAS cannot be found."""
    import ctypes
    import glob
    import os

    import numpy as np

    get = set_ = None
    for path in glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*")):
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", "")):
            if hasattr(lib, f"{prefix}_get_num_threads{suffix}"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}")
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}")
                break
    if get is None:
        yield
        return
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


@pytest.fixture(scope="module")
def default_llm():
    import tinyllm

    return tinyllm.load()


def test_chapters_exist():
    assert len(CHAPTERS) >= 13, "docs/ should hold the tutorial's chapters (docs/NN-*.md)"
    assert (DOCS / "README.md").exists()


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_snippets_print_what_the_chapter_shows(chapter, default_llm, monkeypatch):
    monkeypatch.chdir(ROOT)  # snippets open repository files by relative path
    with one_blas_thread():
        results = list(run_chapter(chapter, default_llm))
    for line, _source, expected, printed in results:
        where = f"{chapter.name}, the python block at line {line}"
        if expected is None:
            assert printed == "", f"{where} prints output but no ```text block follows it:\n{printed}"
        else:
            assert normalize(printed) == normalize(expected), (
                f"{where} printed:\n{printed}\nthe chapter shows:\n{expected}")


def run_blocks_alone(path: Path, llm=None):
    """Run every block in a fresh namespace of its own; yield as run_chapter does."""
    with shared_default_model(llm):
        for source, expected, span, line in code_blocks(path.read_text(encoding="utf-8")):
            ns = {"__name__": "__main__"}
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(source, f"{path.name}:{line}", "exec"), ns)
            yield line, source, expected, out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_each_snippet_runs_alone(chapter, default_llm, monkeypatch):
    """A reader pastes one block into a fresh interpreter: it must need nothing it does not
    import or set up itself (docs/tutorial.py brings what earlier blocks built)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))  # `python` started in the root finds docs/tutorial.py
    with one_blas_thread():
        results = list(run_blocks_alone(chapter, default_llm))
    for line, _source, expected, printed in results:
        where = f"{chapter.name}, the python block at line {line}, run alone"
        assert normalize(printed) == normalize(expected or ""), (
            f"{where} printed:\n{printed}\nthe chapter shows:\n{expected}")


# ---- links to code ---------------------------------------------------------------------------
def defined_names(path: Path) -> set[str]:
    """Top-level functions, classes and assignments, and `Class.member` for each class's
    methods, properties, fields and attributes set on `self`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}.{item.name}")
                    for sub in ast.walk(item):  # attributes set on self, e.g. `self.length = 0`
                        if (isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)
                                and isinstance(sub.value, ast.Name) and sub.value.id == "self"):
                            names.add(f"{node.name}.{sub.attr}")
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(f"{node.name}.{item.target.id}")
                elif isinstance(item, ast.Assign):
                    names |= {f"{node.name}.{t.id}" for t in item.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


CODE_NAME = re.compile(r"^`([A-Za-z_][A-Za-z_0-9]*(?:\.[A-Za-z_][A-Za-z_0-9]*)?)(?:\(\))?`$")


def links(page: Path):
    text = page.read_text(encoding="utf-8")
    text = FENCE.sub("", text)  # links inside code blocks are code, not links
    for m in LINK.finditer(text):
        label, target = m.group(1), m.group(2)
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # web addresses and anchors in the same page
        yield label, target


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_links_point_at_existing_files_and_names(page):
    problems = []
    for label, target in links(page):
        file = (page.parent / target.split("#")[0]).resolve()
        if not file.exists():
            problems.append(f"[{label}]({target}): {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file} does not exist")
            continue
        m = CODE_NAME.match(label)
        if m and file.suffix == ".py" and m.group(1) not in (file.name, file.stem):
            name = m.group(1)  # `Ops.rms_norm`, `apply_rope()`; a label that is the file's own name is not checked
            if name not in defined_names(file):
                problems.append(f"[{label}]({target}): {name} is not defined in {file.relative_to(ROOT)}")
    assert not problems, f"{page.name}:\n" + "\n".join(problems)


INLINE_MEMBER = re.compile(r"`([A-Z][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)(?:\(\))?`")


def test_names_in_the_prose_exist():
    """`Class.member` written in the prose (linked or not) exists, when Class is a tinyllm class."""
    defined = set()
    for file in (ROOT / "tinyllm").rglob("*.py"):
        defined |= defined_names(file)
    classes = {n for n in defined if "." not in n and n[:1].isupper()}
    problems = []
    for page in PAGES:
        prose = FENCE.sub("", page.read_text(encoding="utf-8"))
        for cls, member in INLINE_MEMBER.findall(prose):
            if cls in classes and f"{cls}.{member}" not in defined:
                problems.append(f"{page.name}: `{cls}.{member}` is not defined in tinyllm/")
    assert not problems, "\n".join(problems)


def test_every_chapter_links_code_it_explains():
    """A chapter that teaches the code links to it (the lint above then checks the names)."""
    for page in CHAPTERS:
        code_links = [t for _, t in links(page) if t.startswith("../") and ".py" in t]
        assert code_links, f"{page.name} links to no code"


def test_the_index_lists_every_chapter():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    targets = {t.split("#")[0] for _, t in links(DOCS / "README.md")}
    missing = [p.name for p in CHAPTERS if p.name not in targets]
    assert not missing, f"docs/README.md does not link {missing}"
    assert index.strip()


# ---- exercise solutions -----------------------------------------------------------------------
SOLUTIONS = sorted((DOCS / "solutions").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_exercise_solutions_run(solution, default_llm, monkeypatch):
    """Each chapter's exercise solutions run as a script (their asserts are the check)."""
    import runpy

    monkeypatch.chdir(ROOT)
    with shared_default_model(default_llm), one_blas_thread(), contextlib.redirect_stdout(io.StringIO()):
        runpy.run_path(str(solution), run_name="__main__")


def test_every_solution_is_linked_from_its_chapter():
    """docs/solutions/NN_*.py belongs to chapter NN, which links it under its exercises."""
    problems = []
    for solution in SOLUTIONS:
        chapter = next((p for p in CHAPTERS if p.name[:2] == solution.name[:2]), None)
        if chapter is None:
            problems.append(f"{solution.name}: no chapter {solution.name[:2]}")
        elif f"solutions/{solution.name}" not in {t.split("#")[0] for _, t in links(chapter)}:
            problems.append(f"{chapter.name} does not link solutions/{solution.name}")
    assert not problems, "\n".join(problems)


# ---- writing a chapter -------------------------------------------------------------------------
def _main(argv):
    write = "--write" in argv
    paths = [Path(a) for a in argv if not a.startswith("--")]
    import tinyllm

    llm = tinyllm.load()
    for path in paths:
        path = path.resolve()
        outputs = []
        with one_blas_thread():
            results = list(run_chapter(path, llm))
        for line, _source, expected, printed in results:
            print(f"---- {path.name}:{line}" + ("" if expected is None else "  (has a text block)"))
            print(printed, end="")
            outputs.append(printed)
        if write:
            text = path.read_text(encoding="utf-8")
            blocks = code_blocks(text)
            for (_src, expected, span, line), printed in reversed(list(zip(blocks, outputs))):
                body = "```text\n" + printed.rstrip("\n") + "\n```"
                if span is not None:
                    text = text[:span[0]] + body + text[span[1]:]
                elif printed:
                    # insert a text block after the python block that starts at `line`
                    start = sum(len(l) + 1 for l in text.split("\n")[:line - 1])
                    end = FENCE.search(text, start).end()
                    text = text[:end] + "\n" + body + text[end:]
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _main(sys.argv[1:])

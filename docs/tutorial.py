"""The names a tutorial block takes from the blocks before it in its chapter.

Each ```python block of docs/NN-*.md runs alone, pasted into a fresh interpreter started in
the repository root. A block that goes on from what an earlier block built (a function the
chapter wrote, a cache it filled) starts with

    from docs.tutorial import earlier
    forward, params = earlier("00", "forward", "params")

which runs the chapter's blocks from the top, quietly, until every asked-for name exists,
and returns those names. The chapter stays the one place the code is written: nothing here
repeats it, so what a block gets is what the reader saw built above it.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def earlier(chapter: str, *names: str):
    """Run chapter `chapter` ("07" or "07-attention")'s python blocks in order in one fresh
    namespace, printing nothing, and stop after the block where the last of `names` is first
    defined; return their values (one value for one name, else a tuple)."""
    path = next(DOCS.glob(f"{chapter}*.md"))
    ns = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    missing = set(names)
    for m in _FENCE.finditer(path.read_text(encoding="utf-8")):
        if m.group(1).strip() != "python":
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(m.group(2), str(path), "exec"), ns)
        missing -= ns.keys()
        if not missing:
            break
    if missing:
        raise NameError(f"{path.name} defines no {sorted(missing)}")
    values = tuple(ns[n] for n in names)
    return values[0] if len(values) == 1 else values

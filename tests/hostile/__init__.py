"""Hostile inputs and interruptions, as data: every case is run by ``tests/test_hostile.py``.

A case builds its input in a scratch folder, runs the CLI (in-process, or as a subprocess when it
sends signals) and must end with a non-zero exit, a one-line ``edgeprune: …`` message containing
``expect``, no traceback, and nothing new in ``scratch/out``. Each area keeps its cases in its own
module here (``CASES`` list); ``ALL_CASES`` gathers them. ``scripts/hostile_table.py`` renders the
README's reliability table from the same list.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    stderr: str


@dataclass(frozen=True)
class Case:
    name: str  # short unique id, e.g. "rules-null-role"
    what: str  # one line for the README table: the hostile input or interruption
    expect: str  # substring the one-line error message must contain (case-insensitive)
    argv: Callable[[Path], list[str]] | None = None  # CLI arguments after `edgeprune`; may write files in scratch
    run: Callable[[Path], Outcome] | None = None  # instead of argv: run it yourself (subprocess, signals, API)
    exit_code: int | None = None  # exact exit code when it matters; otherwise any non-zero
    after: Callable[[Path], None] | None = None  # extra checks (raise AssertionError), e.g. a payload never ran
    slow: bool = False  # runs a whole job before failing (still run in CI)


def _gather() -> list[Case]:
    cases: list[Case] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        cases.extend(getattr(module, "CASES", []))
    names = [c.name for c in cases]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes, f"duplicate hostile case names: {sorted(dupes)}"
    return cases


ALL_CASES: list[Case] = _gather()

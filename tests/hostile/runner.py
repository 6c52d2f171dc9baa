"""Run one hostile `Case` and check what the promise says: one line, non-zero exit, clean --out."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from . import Case, Outcome


def run_cli(argv: list[str]) -> Outcome:
    """The CLI in-process (no interpreter start-up per case): exit code and what went to stderr."""
    from edgeprune.cli import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return Outcome(code, err.getvalue())


def snapshot(folder: Path) -> dict[str, int]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def check(case: Case, scratch: Path) -> Outcome:
    out = scratch / "out"
    if case.run is not None:
        before = snapshot(out)
        outcome = case.run(scratch)
    else:
        assert case.argv is not None, f"{case.name}: a case needs argv or run"
        argv = case.argv(scratch)
        before = snapshot(out)
        outcome = run_cli(argv)
    line = error_line(outcome.stderr)
    assert "Traceback" not in outcome.stderr, f"{case.name}: traceback\n{outcome.stderr[-3000:]}"
    assert outcome.exit_code != 0, f"{case.name}: exit 0\n{outcome.stderr[-2000:]}"
    if case.exit_code is not None:
        assert outcome.exit_code == case.exit_code, f"{case.name}: exit {outcome.exit_code}, want {case.exit_code}"
    assert line.startswith(("edgeprune: ", "Error:", "Usage:")) or "Error" in line, f"{case.name}: last line {line!r}"
    assert case.expect.lower() in outcome.stderr.lower(), f"{case.name}: {case.expect!r} not in {outcome.stderr!r}"
    assert snapshot(out) == before, f"{case.name}: --out changed: {sorted(set(snapshot(out)) ^ set(before))}"
    if case.after is not None:
        case.after(scratch)
    return outcome

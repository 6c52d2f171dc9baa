"""Run every hostile case of ``tests/hostile`` and write the README's reliability table.

    python scripts/hostile_table.py > benchmarks/results/reliability.md

Each row: the input, the exit code, the one line the user sees, and what was left in --out.
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hostile import ALL_CASES  # noqa: E402
from tests.hostile.runner import check, error_line  # noqa: E402


def main() -> int:
    rows = []
    failed = 0
    for case in ALL_CASES:
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp).resolve()
            try:
                outcome = check(case, scratch)
                line, code, verdict = error_line(outcome.stderr), outcome.exit_code, "nothing new"
            except AssertionError as exc:
                failed += 1
                line, code, verdict = str(exc).splitlines()[0], "?", "FAILED"
        msg = line.replace(str(scratch), "SCRATCH").replace("|", "\\|")
        rows.append(f"| `{case.name}` | {case.what} | {code} | {msg} | {verdict} |")
        print(f"{case.name}: {verdict}", file=sys.stderr)
    print(f"Machine: {platform.platform()}, Python {platform.python_version()}")
    print("Command: python scripts/hostile_table.py")
    print("SCRATCH is the case's temporary folder.\n")
    print(f"{len(ALL_CASES)} hostile inputs and interruptions, {len(ALL_CASES) - failed} handled as promised.\n")
    print("| case | input | exit | what the user sees | `--out` |")
    print("|---|---|---:|---|---|")
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""What a benchmark ran on: machine, CPU, load and library versions, recorded beside every result."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces a benchmark run: ``python -m module`` and its arguments, shell-quoted."""
    return f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)


def write_results(out: Path, stem: str, result: dict, markdown: str) -> None:
    """``<stem>.json`` and ``<stem>.md`` in ``out`` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)


def machine_info() -> dict:
    """Machine, CPU, cores, load average at the start, versions, the exact command and the UTC time."""
    from edgeprune.report import versions

    return {
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "versions": versions(),
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv]),
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

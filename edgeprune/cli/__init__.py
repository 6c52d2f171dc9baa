"""Command-line interface: ``edgeprune compress | inspect | export | verify | bench | targets``.

Each sub-command lives in its own module and registers itself on the shared Typer ``app``.
``main`` turns every `EdgepruneError` into a one-line message and a non-zero exit code.
"""

from __future__ import annotations

import signal
import sys

from ..errors import EdgepruneError

# Importing the modules registers their commands on `app`.
from . import bench as _bench  # noqa: E402,F401
from . import compress as _compress  # noqa: E402,F401
from . import export_cmd as _export  # noqa: E402,F401
from . import inspect_cmd as _inspect  # noqa: E402,F401
from . import targets_cmd as _targets  # noqa: E402,F401
from ._app import app


def _terminate(signum: int, frame: object) -> None:
    # Turn SIGTERM into an exception so `finally` blocks remove staging folders and temp files.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app(args=argv, standalone_mode=True)
    except EdgepruneError as exc:
        print(f"edgeprune: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("edgeprune: interrupted", file=sys.stderr)
        sys.exit(130)

"""Command-line interface: ``edgeprune compress | inspect | export | verify | bench | targets``.

Each sub-command lives in its own module and registers itself on the shared Typer ``app``.
``main`` turns every `EdgepruneError` into a one-line message and a non-zero exit code.
"""

from __future__ import annotations

import contextlib
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


class Interrupted(BaseException):
    """A signal asked the run to stop. Not an `Exception`, so no ``except Exception`` swallows it, and not
    a `KeyboardInterrupt`, which Typer would turn into a silent exit; ``finally`` blocks still run, and
    ``subprocess.run`` kills its child on it (onnxruntime runner, ssh, QEMU)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def _interrupt(signum: int, frame: object) -> None:
    # The first signal stops the run; later ones are swallowed so a second Ctrl-C cannot cut the
    # clean-up short (staging removal, lock release). A Python no-op handler rather than SIG_IGN: children
    # started during clean-up must not inherit an ignored SIGINT.
    for s in STOP_SIGNALS:
        signal.signal(s, _swallow)
    raise Interrupted(signum)


def _swallow(signum: int, frame: object) -> None:
    pass


def _install_handlers() -> dict[int, object]:
    previous: dict[int, object] = {}
    for s in STOP_SIGNALS:
        try:
            previous[s] = signal.signal(s, _interrupt)
        except ValueError:  # not the main thread: signals stay as the host program set them
            break
    return previous


def main(argv: list[str] | None = None) -> None:
    previous = _install_handlers()
    try:
        app(args=argv, standalone_mode=True)
    except EdgepruneError as exc:
        print(f"edgeprune: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print("edgeprune: interrupted", file=sys.stderr)
        # The process is on its way out: a late signal must not break the exit (atexit hooks, torch
        # finalizers) with a trace, nor kill it once finalization has put the defaults back, which it
        # does for Python handlers but not for SIG_IGN. Its children are gone already, none is started.
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        previous = {}
        sys.exit(128 + exc.signum)  # the shell convention: 130 SIGINT, 143 SIGTERM, 129 SIGHUP
    finally:
        for s, handler in previous.items():  # an in-process caller (tests) gets its own handlers back
            signal.signal(s, handler)

"""Command-line interface: ``edgeprune compress | inspect | export | verify | bench | targets``.

Each sub-command lives in its own module and registers itself on the shared Typer ``app``.
``main`` turns every `EdgepruneError` into a one-line message and a non-zero exit code.
"""

from __future__ import annotations

import contextlib
import signal
import sys

from ..errors import EdgepruneError


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


def _registered_app():
    """The Typer app with every command registered (importing a command's module registers it). Imported
    inside `main`, after the handlers: start-up imports torch, timm and onnx for seconds, and a Ctrl-C then
    must end as 'interrupted' too, not as a KeyboardInterrupt trace."""
    from . import bench, compress, export_cmd, inspect_cmd, targets_cmd  # noqa: F401
    from ._app import app

    return app


def main(argv: list[str] | None = None) -> None:
    previous = _install_handlers()
    try:
        _registered_app()(args=argv, standalone_mode=True)
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

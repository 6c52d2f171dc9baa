"""Bad options: each refused before any model or data loads, in well under a second (issue 16).

Every case points ``--data`` at a folder that does not exist, so an option checked only after loading
would fail with a data error instead of ``expect``; and each run is timed (after one untimed warm-up of
the CLI: Typer builds its parsers on the first call), so a check that waits for the default job fails.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from . import Case, Outcome

LIMIT_S = 1.0


@functools.cache
def _warm() -> None:
    import edgeprune.export.ship  # noqa: F401  (imported by validate: start-up, not loading)

    from .runner import run_cli

    with tempfile.TemporaryDirectory() as tmp:
        run_cli(["compress", "--threads", "0", "--out", str(Path(tmp) / "out"), "-q"])


def _fast(args: Callable[[Path], list[str]]) -> Callable[[Path], Outcome]:
    """`compress ARGS` in-process, with a missing data folder and --out in scratch, refused within LIMIT_S."""

    def run(s: Path) -> Outcome:
        from .runner import run_cli

        _warm()
        argv = ["compress", *args(s), "--data", f"imagefolder:{s / 'no-such-folder'}", "--out", str(s / "out"), "-q"]
        t0 = time.monotonic()
        outcome = run_cli(argv)
        took = time.monotonic() - t0
        assert took < LIMIT_S, f"{' '.join(argv)} took {took:.2f} s to fail: checked after loading?"
        return outcome

    return run


def _case(name: str, what: str, expect: str, args: Callable[[Path], list[str]]) -> Case:
    return Case(name=f"option-{name}", what=what, expect=expect, run=_fast(args))


CASES = [
    _case(
        "quantize-int4",
        "`compress --quantize int4`",
        "--quantize must be int8 or none",
        lambda s: ["--quantize", "int4"],
    ),
    _case("pack-bogus", "`compress --pack bogus`", "--pack must be dense or sparse", lambda s: ["--pack", "bogus"]),
    _case("threads-negative", "`compress --threads -1`", "--threads must be >= 1", lambda s: ["--threads", "-1"]),
    _case(
        "threads-zero",
        "`compress --threads 0` (was: silently the default)",
        "--threads must be >= 1",
        lambda s: ["--threads", "0"],
    ),
    _case("target-unknown", "`compress --target arm65`", "unknown target 'arm65'", lambda s: ["--target", "arm65"]),
    _case(
        "latency-from-bad",
        "`compress --latency-from pi@board` (no scheme)",
        "unknown device 'pi@board'",
        lambda s: ["--latency-from", "pi@board"],
    ),
    _case(
        "latency-from-port",
        "`compress --latency-from ssh://pi@board:99999`",
        "the port must be a number 1-65535",
        lambda s: ["--latency-from", "ssh://pi@board:99999"],
    ),
    _case(
        "latency-from-injection",
        "`compress --latency-from ssh://pi@-oProxyCommand=sh` (an ssh option as host)",
        "invalid host name",
        lambda s: ["--latency-from", "ssh://pi@-oProxyCommand=sh"],
    ),
    _case(
        "identity-missing",
        "`compress --latency-from ssh://… --identity` a key file that does not exist",
        "no such key file",
        lambda s: ["--latency-from", "ssh://pi@127.0.0.1:1", "--identity", str(s / "id_missing")],
    ),
    _case(
        "identity-directory",
        "`compress --latency-from ssh://… --identity` a directory",
        "is a directory",
        lambda s: ["--latency-from", "ssh://pi@127.0.0.1:1", "--identity", str(s)],
    ),
    _case(
        "identity-without-ssh",
        "`compress --identity KEY` with the default local device (would be ignored)",
        "--identity only applies to an ssh:// device",
        lambda s: ["--identity", str(s)],
    ),
    _case(
        "ssh-option-injection",
        "`compress --ssh-option -oProxyCommand=sh`",
        "bad --ssh-option",
        lambda s: ["--latency-from", "ssh://pi@127.0.0.1:1", "--ssh-option", "-oProxyCommand=sh"],
    ),
    _case(
        "ssh-unreachable",
        "`compress --latency-from ssh://u@127.0.0.1:1` (nothing listens): found before the pruning",
        "unreachable",
        lambda s: ["--latency-from", "ssh://u@127.0.0.1:1"],
    ),
    _case(
        "speedup-unstructured",
        "`compress --speedup 2` without `--granularity channel` (was: silently ignored)",
        "--speedup only applies to --granularity channel",
        lambda s: ["--speedup", "2"],
    ),
    _case(
        "latency-budget-unstructured",
        "`compress --latency-budget 1` without `--granularity channel`",
        "--latency-budget only applies to --granularity channel",
        lambda s: ["--latency-budget", "1"],
    ),
    _case(
        "round-to-unstructured",
        "`compress --round-to 8` without `--granularity channel`",
        "--round-to only applies to --granularity channel",
        lambda s: ["--round-to", "8"],
    ),
    _case(
        "latency-costs-unstructured",
        "`compress --latency-costs` without `--granularity channel`",
        "--latency-costs only applies to --granularity channel",
        lambda s: ["--latency-costs"],
    ),
    _case(
        "speedup-one",
        "`compress --granularity channel --speedup 1`",
        "--speedup must be > 1",
        lambda s: ["--granularity", "channel", "--speedup", "1"],
    ),
    _case(
        "latency-budget-zero",
        "`compress --granularity channel --latency-budget 0`",
        "--latency-budget must be a positive number",
        lambda s: ["--granularity", "channel", "--latency-budget", "0"],
    ),
    _case(
        "round-to-zero",
        "`compress --granularity channel --round-to 0`",
        "--round-to must be >= 1",
        lambda s: ["--granularity", "channel", "--round-to", "0"],
    ),
    _case(
        "max-drop-with-speedup",
        "`compress --granularity channel --speedup 2 --max-drop 1` (two selection goals)",
        "give one selection goal",
        lambda s: ["--granularity", "channel", "--speedup", "2", "--max-drop", "1"],
    ),
    _case(
        "max-drop-nan",
        "`compress --max-drop nan`",
        "--max-drop must be >= 0",
        lambda s: ["--max-drop", "nan"],
    ),
    _case(
        "pack-sparse-channel",
        "`compress --granularity channel --pack sparse` (a compacted model has no zeros to pack)",
        "--pack sparse does not apply to --granularity channel",
        lambda s: ["--granularity", "channel", "--pack", "sparse"],
    ),
    _case(
        "identity-channel-local",
        "`compress --granularity channel --identity KEY` with the default local device (channel mode now benchmarks "
        "on --latency-from, so its device options are checked like unstructured's)",
        "--identity only applies to an ssh:// device",
        lambda s: ["--granularity", "channel", "--identity", str(s / "key")],
    ),
]

"""``--out`` ownership and interruptions: signals mid-run, a folder in use, a damaged journal, a full disk.

The signal cases run the real CLI as a subprocess (the demo job), wait until it holds ``--out`` (its
staging folder exists), send the signal and check it ends with ``edgeprune: interrupted``, the shell's
128+signal exit code, the ``--out`` it made removed again and no process of it left behind
(``tests/test_outdir.py`` interrupts runs into an ``--out`` holding an earlier set).
"""

from __future__ import annotations

import fcntl
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from . import Case, Outcome
from .runner import run_cli

DEMO_JOB = ["--finetune-epochs", "0", "--signals", "magnitude", "--eval-size", "200", "--calib-size", "100"]
OLD_SET = {"model.onnx": b"old model", "report.json": b"{}", "notes.txt": b"the user's own file"}


def old_set(out: Path) -> Path:
    """An ``--out`` holding an earlier run's files and a file of the user's (contents never read)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, data in OLD_SET.items():
        (out / name).write_bytes(data)
    return out


def start_cli(args: list[str], **popen) -> subprocess.Popen:
    """``python -m edgeprune ARGS`` in its own process group (a signal to the test reaches only it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "edgeprune", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        **popen,
    )


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) first: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out after {timeout:g} s waiting for the run")
        time.sleep(0.1)


def staging_dirs(out: Path) -> list[Path]:
    return sorted(out.glob(".edgeprune-staging-*")) if out.is_dir() else []


def processes_mentioning(*texts: str) -> list[int]:
    """Live processes (not zombies) whose command line contains every one of ``texts``: a run's strays."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(t in cmdline for t in texts):
            pids.append(int(entry.name))
    return pids


def finish(proc: subprocess.Popen, timeout: float = 120) -> Outcome:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"the run did not stop within {timeout:g} s of the signal: {err[-2000:]}") from None
    return Outcome(proc.returncode, err)


def no_strays(out: Path) -> None:
    """No staging folder in ``out`` and, within a few seconds, no process started on files in it."""
    assert not staging_dirs(out), f"staging left behind: {staging_dirs(out)}"
    deadline = time.monotonic() + 10
    while processes_mentioning(str(out)):
        assert time.monotonic() < deadline, f"processes left behind: {processes_mentioning(str(out))}"
        time.sleep(0.2)


def interrupt_mid_run(sig: int, repeat: int = 1) -> Callable[[Path], Outcome]:
    """A case's ``run``: the demo job into a new ``--out``, ``sig`` sent once the run stages in it."""

    def run(s: Path) -> Outcome:
        out = s / "out"
        proc = start_cli(["compress", *DEMO_JOB, "--out", str(out), "-q"])
        wait_for(lambda: bool(staging_dirs(out)), proc)
        time.sleep(2.0)  # into the job: data and model loaded, stages under way
        for _ in range(repeat):  # a burst: the later ones land during the clean-up
            os.kill(proc.pid, sig)
            time.sleep(0.02)
        return finish(proc)

    return run


@contextmanager
def held_lock(folder: Path):
    """Hold the lock on ``folder`` from another process, as a live run would (flock on the folder)."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def _busy(s: Path) -> Outcome:
    out = s / "out"
    out.mkdir()  # empty: the runner's snapshot is taken before `run` builds anything
    with held_lock(out):
        return run_cli(["compress", *DEMO_JOB, "--out", str(out), "-q"])


def _lock_is_free(s: Path) -> None:
    fd = os.open(s / "out", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the run kept it
    finally:
        os.close(fd)


def _damaged_journal(s: Path) -> list[str]:
    out = old_set(s / "out")
    (out / ".edgeprune-publish.json").write_text('{"staging": "../../etc", "files": ["x"]')
    return ["compress", *DEMO_JOB, "--out", str(out), "-q"]


def _journal_escapes(s: Path) -> list[str]:
    out = old_set(s / "out")
    (out / ".edgeprune-publish.json").write_text('{"staging": "..", "files": ["notes.txt"]}')
    return ["compress", *DEMO_JOB, "--out", str(out), "-q"]


def _folder_in_the_way(s: Path) -> list[str]:
    out = old_set(s / "out")
    (out / "model.int8.onnx").mkdir()
    (out / "model.int8.onnx" / "keep.txt").write_text("a folder of the user's where an artifact goes")
    return ["export", "--quantize", "int8", "--calib-size", "32", "--eval-size", "64", "--out", str(out)]


def _out_is_a_file(s: Path) -> list[str]:
    (s / "out").write_text("a file, not a folder")
    return ["compress", *DEMO_JOB, "--out", str(s / "out"), "-q"]


def _disk_full(s: Path) -> Outcome:
    """``export`` into a 300 KiB tmpfs; where mounting is not allowed (not root), into a folder with a
    300 KiB file-size limit (EFBIG instead of ENOSPC, the same path through the code)."""
    out = s / "out"
    out.mkdir()
    argv = ["export", "--quantize", "none", "--calib-size", "32", "--eval-size", "64", "--out", str(out)]
    mount = ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(out)]
    mounted = subprocess.run(mount, capture_output=True).returncode == 0
    if not mounted:
        proc = start_cli(argv, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (300 << 10, 300 << 10)))
        return finish(proc)
    try:
        (out / "notes.txt").write_text("the user's own file")
        # The demo model's ONNX (1.2 MB) cannot fit in 300 KiB. The runner's snapshot sees the folder
        # before the mount and after the unmount, so this checks the mounted one itself.
        return run_cli(argv)
    finally:
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"], sorted(out.iterdir())
        subprocess.run(["umount", str(out)], check=True)


def _interrupted_checks(s: Path) -> None:
    out = s / "out"
    no_strays(out)
    assert not out.exists(), f"the run made {out} and left it: {sorted(out.iterdir())}"


CASES = [
    Case(
        name="outdir-sigint",
        what="Ctrl-C (SIGINT) in the middle of `compress`",
        expect="edgeprune: interrupted",
        run=interrupt_mid_run(signal.SIGINT),
        exit_code=130,
        after=_interrupted_checks,
        slow=True,
    ),
    Case(
        name="outdir-sigterm",
        what="SIGTERM in the middle of `compress`",
        expect="edgeprune: interrupted",
        run=interrupt_mid_run(signal.SIGTERM),
        exit_code=143,
        after=_interrupted_checks,
        slow=True,
    ),
    Case(
        name="outdir-sighup",
        what="SIGHUP (terminal closed) in the middle of `compress`",
        expect="edgeprune: interrupted",
        run=interrupt_mid_run(signal.SIGHUP),
        exit_code=129,
        after=_interrupted_checks,
        slow=True,
    ),
    Case(
        name="outdir-sigint-burst",
        what="Ctrl-C pressed five times (later ones during the clean-up)",
        expect="edgeprune: interrupted",
        run=interrupt_mid_run(signal.SIGINT, repeat=5),
        exit_code=130,
        after=_interrupted_checks,
        slow=True,
    ),
    Case(
        name="outdir-busy",
        what="`compress --out D` while another run holds D",
        expect="is in use by another edgeprune run",
        run=_busy,
        after=lambda s: (_lock_is_free(s), no_strays(s / "out")),
    ),
    Case(
        name="outdir-journal-damaged",
        what="a truncated `.edgeprune-publish.json` in --out",
        expect="is damaged",
        argv=_damaged_journal,
        after=_lock_is_free,
    ),
    Case(
        name="outdir-journal-escapes",
        what="a publish journal naming a staging folder outside --out",
        expect="is damaged",
        argv=_journal_escapes,
        after=_lock_is_free,
    ),
    Case(
        name="outdir-folder-in-the-way",
        what="a folder named `model.int8.onnx` in --out where `export` writes the INT8 file",
        expect="is a folder, where edgeprune writes model.int8.onnx",
        argv=_folder_in_the_way,
        after=lambda s: no_strays(s / "out"),
        slow=True,
    ),
    Case(
        name="outdir-not-a-folder",
        what="`--out` names an existing file",
        expect="cannot write to output directory",
        argv=_out_is_a_file,
    ),
    Case(
        name="outdir-disk-full",
        what="`export` into a 300 KiB filesystem (ENOSPC while writing)",
        expect="cannot write",
        run=_disk_full,
        slow=True,
    ),
]

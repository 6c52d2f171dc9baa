"""The ``--out`` folder: owned by one run at a time, its artifacts replaced as a whole set or not at all.

What lives in an ``--out`` folder::

    model.onnx, dense.int8.onnx, report.json, ...  the published set: only names `is_managed` accepts
    .edgeprune-manifest.json                       the names of the published set (written by the publish)
    .edgeprune-staging-XXXXXXXX/                   one run's artifacts while it works (private to that run)
    .edgeprune-publish.json                        the publish journal: exists only while a publish is applied

Ownership. A run takes an exclusive, non-blocking ``flock`` on the folder itself (a descriptor opened on
the directory) before it creates anything in it. A second run gets a one-line error and touches nothing.
Locking the directory rather than a lock file leaves nothing to clean up (a failed run leaves the folder
exactly as it found it) and has no unlink-while-waiting race; the kernel drops the lock when the process
dies however it dies, so a lock is never stale.

Publishing is a write-ahead journal, applied forward:

1. the run writes every artifact into its staging folder (inside ``--out``, so the same filesystem);
2. it writes the journal (the new set's names and the staging folder) to a temporary name and renames it
   to ``.edgeprune-publish.json``: the commit point. Until then ``--out`` holds the old set untouched;
3. it applies the journal: renames each staged file over its name, deletes the managed files of the old
   set that the new set lacks, and renames the journal to ``.edgeprune-manifest.json``. After the commit
   there are only renames and unlinks, which need no free space, so a full disk cannot stop them.

SIGINT/SIGTERM/SIGHUP are held back from step 2 to the end of step 3, so an interruption lands before the
commit (old set) or after the publish (new set). The staged files are fsync'd before the commit. Only
SIGKILL or a power cut can stop step 3 half-way; the next run to claim the folder finds the journal,
applies it again (every step is idempotent) and so completes the new set before it does anything else.
It then removes staging folders left by killed runs (it holds the lock, so none of them belongs to a
live run) and says so in one log line.

Which files are ours: exactly `MANAGED_NAMES`, the names `is_managed` accepts (``model``/``dense`` with
optional ``.int8`` as ``.onnx``/``.ort``/``.onnx.data``, ``report.json``, ``report.md``, ``pareto.png``).
A run deletes such a file when it does not produce it again, so a stale ``model.int8.onnx`` never sits
beside a new ``model.onnx``; every other file in ``--out`` is never touched.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgepruneError

STAGING_PREFIX = ".edgeprune-staging-"
JOURNAL = ".edgeprune-publish.json"
MANIFEST = ".edgeprune-manifest.json"
# Every file name edgeprune writes into --out, in one place: `export.ship` names its companions with
# `int8_name` and `ort_name`, and `is_managed` accepts exactly the names below. A new artifact name must be
# added here: publish refuses a staged file it would not know as ours later.
ARTIFACT_STEMS = ("model", "dense")  # the selected model and the dense reference
REPORT_FILES = ("report.json", "report.md", "pareto.png")


def int8_name(onnx_name: str) -> str:
    """The INT8 companion of an FP32 ONNX file: ``model.onnx`` -> ``model.int8.onnx``."""
    return onnx_name.removesuffix(".onnx") + ".int8.onnx"


def is_int8_name(name: str) -> bool:
    """Whether ``name`` is an INT8 companion (``model.int8.onnx``, ``model.int8.ort``)."""
    return ".int8." in name


def ort_name(onnx_name: str) -> str:
    """The ORT-format twin of an ONNX file: ``model.onnx`` -> ``model.ort``, ``model.int8.onnx`` ->
    ``model.int8.ort``."""
    return onnx_name.removesuffix(".onnx") + ".ort"


def artifact_files(stem: str) -> tuple[str, ...]:
    """Every file one artifact may have: FP32 and INT8 ONNX, their ORT twins and ONNX external data."""
    onnx_files = (f"{stem}.onnx", int8_name(f"{stem}.onnx"))
    return (*onnx_files, *(ort_name(n) for n in onnx_files), *(f"{n}.data" for n in onnx_files))


MANAGED_NAMES = frozenset([*(n for stem in ARTIFACT_STEMS for n in artifact_files(stem)), *REPORT_FILES])
_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"[A-Za-z0-9_]+")
# Errors of the disk, not of the input: reported as one line, --out left as it was.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}
_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}

Log = Callable[[str], None]


def is_managed(name: str) -> bool:
    """True for the file names edgeprune writes into ``--out`` (and may therefore replace or delete)."""
    return name in MANAGED_NAMES


@dataclass
class OutputDir:
    """A claimed ``--out`` folder: its lock, this run's staging folder and whether this run created it."""

    out: Path
    staging: Path
    created: bool
    _fd: int = field(repr=False)
    published: dict[str, str] | None = None

    def publish(self) -> dict[str, str]:
        """Replace the published set with everything in the staging folder; returns ``{name: path}``."""
        names = sorted(f.name for f in self.staging.iterdir())
        bad = [n for n in names if not is_managed(n)]
        if bad:  # a programming error, not the user's: every artifact must be a managed name
            raise RuntimeError(f"staged files with unmanaged names: {bad}")
        for name in names:
            target = self.out / name
            if target.is_dir() and not target.is_symlink():
                raise EdgepruneError(f"{target} is a folder, where edgeprune writes {name}; move it away and rerun")
        for name in names:  # on disk before the commit, so a power cut cannot leave renamed empty files
            _fsync(self.staging / name)
        _fsync(self.staging)
        journal = {"staging": self.staging.name, "files": names}
        with _signals_held():
            _write_json_atomic(self.out / JOURNAL, journal)  # the commit point
            _apply_journal(self.out)
            _fsync(self.out)
        self.published = {n: str(self.out / n) for n in names}
        return self.published

    def release(self) -> None:
        """Remove the staging folder, ``out`` too if this run made it and published nothing; drop the lock."""
        with _signals_held():
            if not (self.out / JOURNAL).exists():  # else a committed publish still needs these files
                shutil.rmtree(self.staging, ignore_errors=True)
            if self.created and self.published is None:
                try:
                    self.out.rmdir()  # only succeeds when empty
                except OSError:
                    pass
            os.close(self._fd)  # releases the flock


@contextmanager
def claim_output_dir(out: Path, log: Log | None = None) -> Iterator[OutputDir]:
    """Own ``out`` for the duration: lock it, repair what an earlier killed run left, stage into it.

    A disk error while the run writes (ENOSPC and kin) becomes a one-line `EdgepruneError`; ``out`` is
    left as it was. The staging folder is removed and the lock released however the block ends.
    """
    out = Path(out)
    fd, created = _lock(out)
    try:
        recover(out, log)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    except OSError as exc:
        _unlock_after_failure(fd, out, created)
        raise EdgepruneError(f"cannot write to output directory {out}: {exc.strerror or exc}") from None
    except BaseException:
        _unlock_after_failure(fd, out, created)
        raise
    od = OutputDir(out, staging, created, fd)
    try:
        yield od
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        where = f" ({Path(exc.filename).name})" if exc.filename else ""
        raise EdgepruneError(
            f"cannot write the artifacts in {out}: {exc.strerror}{where}; free some space or choose another "
            f"--out ({out} is unchanged)"
        ) from None
    finally:
        od.release()


def recover(out: Path, log: Log | None = None) -> None:
    """Finish a publish a killed run left half-applied, then remove killed runs' staging folders.

    Call only while holding the lock on ``out`` (no live run can then own a staging folder there).
    """
    log = log or (lambda message: None)
    if (out / JOURNAL).exists():
        _apply_journal(out)
        log(f"completed the publish an interrupted run left half-done in {out}")
    leftovers = [p for p in out.glob(STAGING_PREFIX + "*") if p.is_dir()]
    for p in leftovers:
        shutil.rmtree(p)
    (out / (JOURNAL + ".tmp")).unlink(missing_ok=True)
    if leftovers:
        log(f"removed {len(leftovers)} staging folder(s) left in {out} by an interrupted run")


def read_manifest(out: Path) -> list[str] | None:
    """The names of the set the last publish left in ``out``; ``None`` if there is no manifest."""
    try:
        data = json.loads((Path(out) / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable: a later publish rewrites it; the managed names decide what is ours anyway
    files = data.get("files") if isinstance(data, dict) else None
    return [f for f in files if isinstance(f, str) and is_managed(f)] if isinstance(files, list) else None


def _lock(out: Path) -> tuple[int, bool]:
    try:
        out.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as exc:
        raise EdgepruneError(f"cannot write to output directory {out}: {exc.strerror or exc}") from None
    if not out.is_dir():
        raise EdgepruneError(f"cannot write to output directory {out}: it is not a folder; choose another --out")
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        if fd < 3:  # never a standard stream's number, which a child started later would keep open
            fd, low = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3), fd
            os.close(low)
    except OSError as exc:
        raise EdgepruneError(f"cannot write to output directory {out}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)  # never remove the folder here: the run holding it may be about to stage into it
        holder = _lock_holder(out)
        who = f" (pid {holder})" if holder else ""
        raise EdgepruneError(
            f"{out} is in use by another edgeprune run{who}; wait for it to finish or choose another --out"
        ) from None
    return fd, created


def _unlock_after_failure(fd: int, out: Path, created: bool) -> None:
    if created:
        try:
            out.rmdir()
        except OSError:
            pass
    os.close(fd)


def _lock_holder(out: Path) -> int | None:
    """The one other process with ``out`` open (the lock holder), from /proc (Linux); else ``None``.

    Not /proc/locks: a flock belongs to an open file description, and its pid there stays the locker's
    even when only a forked child still holds it.
    """
    try:
        target = os.stat(out)
        procs = [p for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != os.getpid()]
    except OSError:
        return None
    holders = set()
    for proc in procs:
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            try:
                st = os.stat(fd)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                holders.add(int(proc.name))
                break
    return holders.pop() if len(holders) == 1 else None


def _apply_journal(out: Path) -> None:
    """Move the journal's staged files into place, delete the old set's leftovers, make it the manifest."""
    path = out / JOURNAL
    try:
        journal = json.loads(path.read_text())
        staging, names = journal["staging"], journal["files"]
        valid = (
            isinstance(staging, str)
            and _STAGING_NAME.fullmatch(staging)
            and isinstance(names, list)
            and all(isinstance(n, str) and is_managed(n) for n in names)
        )
    except (OSError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        # Written by rename, so a damaged journal was not ours: we cannot tell which set is complete.
        raise EdgepruneError(
            f"{path} is damaged, so whether {out} holds a complete set is unknown; delete it and the "
            "artifacts in that folder, then rerun"
        )
    for name in names:
        src = out / staging / name
        if src.exists():
            os.replace(src, out / name)
    keep = set(names)
    for p in out.iterdir():
        if is_managed(p.name) and p.name not in keep and (p.is_file() or p.is_symlink()):
            p.unlink()
    os.replace(path, out / MANIFEST)
    shutil.rmtree(out / staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold back SIGINT/SIGTERM/SIGHUP (delivered when the block ends): a publish is never cut in two."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    except (AttributeError, OSError, ValueError):  # no pthread_sigmask (not POSIX)
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

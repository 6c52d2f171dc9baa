"""``--out`` ownership (issue 19): one run at a time, the whole set replaced or nothing, clean after signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeprune.errors import EdgepruneError
from edgeprune.outdir import (
    JOURNAL,
    MANAGED_NAMES,
    MANIFEST,
    artifact_files,
    claim_output_dir,
    int8_name,
    is_managed,
    ort_name,
    read_manifest,
)
from tests.hostile.outdir import (
    DEMO_JOB,
    finish,
    held_lock,
    no_strays,
    old_set,
    processes_mentioning,
    staging_dirs,
    start_cli,
    wait_for,
)
from tests.hostile.runner import error_line, run_cli

QUICK_JOB = [
    "--method",
    "mag",
    "--finetune-epochs",
    "0",
    "--eval-size",
    "200",
    "--calib-size",
    "100",
    "--quantize",
    "none",
]  # fmt: skip  (one candidate: reaches export and benchmark in seconds)
EXPORT = ["export", "--calib-size", "32", "--eval-size", "64"]


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def lock_is_free(folder: Path) -> bool:
    import fcntl

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "name, ours",
    [("model.onnx", True), ("dense.int8.onnx", True), ("model.int8.ort", True), ("model.onnx.data", True),
     ("report.json", True), ("report.md", True), ("pareto.png", True), ("model_v1.onnx", False),
     ("notes.txt", False), ("report.json.bak", False), ("sub/model.onnx", False), ("MODEL.ONNX", False)],
)  # fmt: skip
def test_managed_names(name: str, ours: bool) -> None:
    assert is_managed(name) is ours


def test_ship_names_come_from_the_managed_list() -> None:
    """`export.ship` names its companions with `int8_name` / `ort_name`; the managed set is built from them."""
    assert int8_name("model.onnx") == "model.int8.onnx" and int8_name("dense") == "dense.int8.onnx"
    assert ort_name("model.onnx") == "model.ort" and ort_name("dense.int8.onnx") == "dense.int8.ort"
    assert sorted(artifact_files("dense")) == [
        "dense.int8.onnx", "dense.int8.onnx.data", "dense.int8.ort", "dense.onnx", "dense.onnx.data", "dense.ort"
    ]  # fmt: skip
    assert len(MANAGED_NAMES) == 2 * 6 + 3 and not is_managed(int8_name("model_v1.onnx"))


def test_publish_replaces_the_whole_managed_set(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.onnx", "model.int8.onnx", "dense.int8.onnx", "model.ort", "report.md", "model_v1.onnx"):
        (out / name).write_text(f"old {name}")
    (out / "notes.txt").write_text("mine")
    with claim_output_dir(out) as od:
        assert not lock_is_free(out)
        (od.staging / "model.onnx").write_text("new model")
        (od.staging / "report.json").write_text("{}")
        published = od.publish()
        assert contents(out)["model.onnx"] == b"new model"  # in place before the block even ends
    assert published == {"model.onnx": str(out / "model.onnx"), "report.json": str(out / "report.json")}
    # The stale INT8 / ORT companions and the old report are gone; files that are not ours stay.
    assert sorted(contents(out)) == sorted([MANIFEST, "model.onnx", "model_v1.onnx", "notes.txt", "report.json"])
    assert contents(out)["model_v1.onnx"] == b"old model_v1.onnx"
    assert read_manifest(out) == ["model.onnx", "report.json"]
    assert not staging_dirs(out) and not (out / JOURNAL).exists() and lock_is_free(out)


def test_a_failed_run_leaves_the_old_set_and_removes_the_folder_it_made(tmp_path: Path) -> None:
    out = old_set(tmp_path / "out")
    before = contents(out)
    with pytest.raises(ValueError), claim_output_dir(out) as od:
        (od.staging / "model.onnx").write_text("half")
        raise ValueError("a stage failed")
    assert contents(out) == before and not staging_dirs(out) and lock_is_free(out)
    fresh = tmp_path / "fresh" / "out"
    with pytest.raises(ValueError), claim_output_dir(fresh):
        raise ValueError("a stage failed")
    assert not fresh.exists()


def test_a_second_claim_is_refused_and_names_the_folder(tmp_path: Path) -> None:
    out = old_set(tmp_path / "out")
    before = contents(out)
    with claim_output_dir(out):
        with pytest.raises(EdgepruneError, match="is in use by another edgeprune run") as err:
            with claim_output_dir(out):
                pass
    assert str(out) in str(err.value) and "\n" not in str(err.value)
    with held_lock(out) as holder:  # another process: the message says which
        with pytest.raises(EdgepruneError, match=f"in use by another edgeprune run \\(pid {holder.pid}\\)"):
            with claim_output_dir(out):
                pass
    assert contents(out) == before and not staging_dirs(out)
    assert lock_is_free(out)  # the holder's death released it: never stale


def test_a_killed_runs_staging_is_removed_by_the_next_claim(tmp_path: Path) -> None:
    out = old_set(tmp_path / "out")
    before = contents(out)
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from edgeprune.outdir import claim_output_dir\n"
        "with claim_output_dir(Path(sys.argv[1])) as od:\n"
        "    (od.staging / 'model.onnx').write_text('half-written')\n"
        "    print('staged', flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "staged"
    proc.kill()  # SIGKILL: no clean-up runs
    proc.wait()
    assert len(staging_dirs(out)) == 1 and lock_is_free(out)
    lines: list[str] = []
    with claim_output_dir(out, log=lines.append) as od:
        assert staging_dirs(out) == [od.staging]
    assert lines == [f"removed 1 staging folder(s) left in {out} by an interrupted run"]
    assert not staging_dirs(out) and contents(out) == before


def _half_applied_publish(out: Path) -> None:
    """What SIGKILL between the journal's commit and the manifest leaves: one file moved, one not yet."""
    old_set(out)
    (out / "model.int8.onnx").write_text("old int8")
    staging = out / ".edgeprune-staging-killed1"
    staging.mkdir()
    (out / "model.onnx").write_text("new model")  # already moved
    (staging / "report.json").write_text('{"new": true}')  # not yet
    (out / JOURNAL).write_text(json.dumps({"staging": staging.name, "files": ["model.onnx", "report.json"]}))


def test_a_half_applied_publish_is_completed_by_the_next_claim(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _half_applied_publish(out)
    lines: list[str] = []
    with claim_output_dir(out, log=lines.append):
        pass
    assert contents(out) == {
        MANIFEST: (out / MANIFEST).read_bytes(),
        "model.onnx": b"new model",
        "notes.txt": b"the user's own file",
        "report.json": b'{"new": true}',
    }
    assert read_manifest(out) == ["model.onnx", "report.json"]
    assert lines == [f"completed the publish an interrupted run left half-done in {out}"]
    assert not staging_dirs(out) and not (out / JOURNAL).exists()


def test_a_damaged_journal_is_refused_and_nothing_is_touched(tmp_path: Path) -> None:
    out = old_set(tmp_path / "out")
    (out / JOURNAL).write_text('{"staging": ".edgeprune-staging-x", "files": ["../../etc/passwd"]}')
    before = contents(out)
    with pytest.raises(EdgepruneError, match="is damaged") as err:
        with claim_output_dir(out):
            pass
    assert "\n" not in str(err.value) and contents(out) == before and lock_is_free(out)


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 300 KiB tmpfs (root only: skipped where mounting is not allowed)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_while_writing_is_one_line_and_leaves_out_as_it_was(tiny_fs: Path) -> None:
    out = old_set(tiny_fs / "out")
    before = contents(out)
    with pytest.raises(EdgepruneError, match="No space left on device") as err:
        with claim_output_dir(out) as od:
            (od.staging / "report.md").write_text("x")
            with open(od.staging / "pareto.png", "wb") as f:  # a plain write, not the atomic helper
                f.write(os.urandom(1 << 20))
    assert "\n" not in str(err.value) and str(out) in str(err.value)
    assert contents(out) == before and not staging_dirs(out) and lock_is_free(out)


@pytest.mark.slow
def test_a_stale_int8_companion_is_gone_after_a_run_that_makes_none(tmp_path: Path) -> None:
    out = tmp_path / "out"
    outcome = run_cli([*EXPORT, "--quantize", "int8", "--out", str(out)])
    assert outcome.exit_code == 0, outcome.stderr[-2000:]
    assert {"model.onnx", "model.int8.onnx"} <= set(contents(out))
    (out / "notes.txt").write_text("mine")
    outcome = run_cli([*EXPORT, "--quantize", "none", "--out", str(out)])
    assert outcome.exit_code == 0, outcome.stderr[-2000:]
    assert sorted(contents(out)) == [MANIFEST, "model.onnx", "notes.txt"]
    assert read_manifest(out) == ["model.onnx"]
    assert run_cli(["verify", str(out / "model.onnx")]).exit_code == 0


@pytest.mark.slow
def test_a_killed_run_is_cleaned_up_and_the_report_lists_exactly_the_artifacts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "dense.int8.onnx").write_text("an earlier run's INT8 file")  # this run makes none
    proc = start_cli(["compress", *DEMO_JOB, "--out", str(out), "-q"])
    wait_for(lambda: bool(staging_dirs(out)), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # no clean-up at all: staging stays, the kernel drops the lock
    proc.wait()
    assert staging_dirs(out) and lock_is_free(out)

    outcome = run_cli(["compress", *QUICK_JOB, "--bench-runs", "5", "--out", str(out)])  # not -q: the clean-up says so
    assert outcome.exit_code == 0, outcome.stderr[-2000:]
    assert f"removed 1 staging folder(s) left in {out} by an interrupted run" in " ".join(outcome.stderr.split())
    report = json.loads((out / "report.json").read_text())
    files = sorted(n for n in contents(out) if n != MANIFEST)
    assert sorted(report["artifacts"]) == files == read_manifest(out)
    assert "dense.int8.onnx" not in files and "model.onnx" in files
    assert all(Path(p) == out / n for n, p in report["artifacts"].items())
    no_strays(out)


def _bench_children(out: Path, main_pid: int) -> list[int]:
    # The runner by name: a child the run has forked but not yet exec'd carries the run's own command line
    # (``--out`` included), and signalling on it once hit the run still importing, before its handlers.
    return [p for p in processes_mentioning(str(out), "runner.py") if p != main_pid]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to the process", "Ctrl-C to the process group"])
def test_a_signal_during_the_benchmark_leaves_the_old_set_and_no_children(tmp_path: Path, how: str) -> None:
    out = old_set(tmp_path / "out")
    before = contents(out)
    # 3000 timed runs: a benchmark long enough to land in
    proc = start_cli(["compress", *QUICK_JOB, "--bench-runs", "3000", "--out", str(out), "-q"])
    wait_for(lambda: bool(_bench_children(out, proc.pid)), proc)
    children = _bench_children(out, proc.pid)
    if how.startswith("SIGTERM"):
        os.kill(proc.pid, signal.SIGTERM)  # the child is not signalled: the run must stop it
        want = 143
    else:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: every process of the group gets it
        want = 130
    outcome = finish(proc)
    assert outcome.exit_code == want, outcome.stderr[-2000:]
    assert error_line(outcome.stderr) == "edgeprune: interrupted" and "Traceback" not in outcome.stderr
    no_strays(out)
    assert not any(Path(f"/proc/{c}").exists() for c in children)
    assert contents(out) == before and lock_is_free(out)


def _importing_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_ctrl_c_during_start_up_is_interrupted_not_a_trace(tmp_path: Path) -> None:
    # Start-up imports torch, timm and onnx for seconds before any command runs; a Ctrl-C there is a stop too.
    proc = start_cli(["compress", *QUICK_JOB, "--out", str(tmp_path / "out"), "-q"])
    wait_for(lambda: _importing_torch(proc.pid), proc)
    os.killpg(proc.pid, signal.SIGINT)
    outcome = finish(proc)
    assert outcome.exit_code == 130, outcome.stderr[-2000:]
    assert error_line(outcome.stderr) == "edgeprune: interrupted" and "Traceback" not in outcome.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_holds_out(tmp_path: Path) -> None:
    out = old_set(tmp_path / "out")
    before = contents(out)
    first = start_cli(["compress", *DEMO_JOB, "--out", str(out), "-q"])
    try:
        wait_for(lambda: bool(staging_dirs(out)), first)
        os.kill(first.pid, signal.SIGSTOP)  # frozen: holds the lock, writes nothing while we look
        staged = {p: sorted(p.iterdir()) for p in staging_dirs(out)}
        second = run_cli(["compress", *DEMO_JOB, "--out", str(out), "-q"])
        assert second.exit_code != 0
        line = error_line(second.stderr)
        assert line == (
            f"edgeprune: error: {out} is in use by another edgeprune run (pid {first.pid}); "
            "wait for it to finish or choose another --out"
        )
        assert contents(out) == before and {p: sorted(p.iterdir()) for p in staging_dirs(out)} == staged
    finally:
        os.kill(first.pid, signal.SIGCONT)
        time.sleep(0.5)
        os.kill(first.pid, signal.SIGTERM)
    outcome = finish(first)
    assert outcome.exit_code == 143 and error_line(outcome.stderr) == "edgeprune: interrupted"
    no_strays(out)
    assert contents(out) == before and lock_is_free(out)

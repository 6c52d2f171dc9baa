"""`edgeprune bench --device ssh://…` against real SSH servers started by the test (tests/sshd.py):
OpenSSH's sshd, and dropbear without SFTP (what small boards run).

The "device" is this machine behind its own server on a loopback port, with a throwaway host key and user
key. Every session's TMPDIR is the server's ``remote_tmp/``, so we can check the benchmark leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from edgeprune.benchmarks.device import (
    bench_artifacts,
    check_device,
    check_device_options,
    parse_device,
    remote_word,
    sample_input,
)
from edgeprune.benchmarks.ssh import SshTarget, check_identity, check_ssh_options, ssh_failure

from edgeprune.errors import DeviceError, EdgepruneError

from .sshd import dropbear_unavailable_reason, sshd_unavailable_reason, start_dropbear, start_sshd
from .test_bench import make_tiny_classifier, ort_logits, run_cli

needs_sshd = pytest.mark.skipif(sshd_unavailable_reason() is not None, reason=str(sshd_unavailable_reason()))
needs_dropbear = pytest.mark.skipif(
    dropbear_unavailable_reason() is not None, reason=str(dropbear_unavailable_reason())
)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dropbear(tmp_path_factory):
    server = start_dropbear(tmp_path_factory.mktemp("dropbear"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("ssh_models")
    a = make_tiny_classifier(d / "small.onnx", [8], seed=0)
    b = make_tiny_classifier(d / "large.onnx", [1024, 1024], seed=1)
    x = np.random.default_rng(3).standard_normal((48, 1, 4, 4)).astype(np.float32)
    y = ort_logits(a, x).argmax(1).astype(np.int64)
    return {"a": a, "b": b, "x": x, "y": y, "acc_b": float((ort_logits(b, x).argmax(1) == y).mean())}


@pytest.fixture(scope="module")
def pythons(tmp_path_factory) -> dict:
    """Interpreters for the device: this one (has everything), one without onnxruntime, one bare."""
    d = tmp_path_factory.mktemp("venvs")
    bare = d / "bare"
    no_ort = d / "no_ort"
    for venv in (bare, no_ort):
        # --without-pip: instant; the venv sees none of this interpreter's site-packages.
        import venv as venv_mod

        venv_mod.EnvBuilder(with_pip=False, symlinks=True).create(venv)
    # numpy (and its bundled libs) but no onnxruntime: exactly what a fresh `pip install numpy` gives.
    site = next((no_ort / "lib").glob("python3*/site-packages"))
    np_dir = Path(np.__file__).parent
    for name in ("numpy", "numpy.libs"):
        if (np_dir.parent / name).exists():
            (site / name).symlink_to(np_dir.parent / name)
    return {"full": sys.executable, "no_ort": str(no_ort / "bin" / "python3"), "bare": str(bare / "bin" / "python3")}


def leftovers(sshd) -> list[Path]:
    return sorted(sshd.remote_tmp.glob("edgeprune.*"))


def ssh_bench(sshd, paths, *, python=sys.executable, **kw):
    kw.setdefault("identity", str(sshd.user_key))
    kw.setdefault("ssh_options", sshd.client_options())
    kw.setdefault("sample", sample_input(paths[0]))
    return bench_artifacts(paths, sshd.url, remote_python=python, **kw)


# ---------------------------------------------------------------- pure parts


def test_parse_ssh_target():
    t = SshTarget.parse("ssh://pi@raspberrypi.local:2222")
    assert (t.user, t.host, t.port) == ("pi", "raspberrypi.local", 2222)
    assert t.destination == "pi@raspberrypi.local" and t.known_hosts_name == "[raspberrypi.local]:2222"
    v6 = SshTarget.parse("ssh://root@[fe80::1]:22")
    assert v6.host == "fe80::1" and str(v6) == "ssh://root@[fe80::1]:22"
    assert SshTarget.parse("ssh://board").user is None
    for bad in ("pi@host", "ssh://", "ssh://pi@host/path", "ssh://pi:pw@host", "ssh://pi@host:99999"):
        with pytest.raises(EdgepruneError):
            SshTarget.parse(bad)
    for injected in ("ssh://-oProxyCommand=sh@host", "ssh://user@-oProxyCommand=sh", "ssh://a;b@host"):
        with pytest.raises(EdgepruneError, match="invalid"):
            SshTarget.parse(injected)


def test_remote_python_is_quoted_but_tilde_means_remote_home():
    assert remote_word("python3") == "python3"
    assert remote_word("~/ort/bin/python3") == '"$HOME"/ort/bin/python3'
    assert remote_word("/opt/my env/python3; rm -rf /") == "'/opt/my env/python3; rm -rf /'"


def test_ssh_options_must_be_key_value():
    assert check_ssh_options(["StrictHostKeyChecking=accept-new"]) == ["StrictHostKeyChecking=accept-new"]
    for bad in ("-oProxyCommand=x", "", "=x", "NoValue"):
        with pytest.raises(EdgepruneError, match="ssh-option"):
            check_ssh_options([bad])


def test_ssh_failure_messages_name_problem_and_fix():
    t = SshTarget.parse("ssh://pi@board:2222")
    unknown = str(ssh_failure("Host key verification failed.\n", t, "x"))
    assert "ssh-keyscan -p 2222 board" in unknown and "accept-new" in unknown
    changed = str(ssh_failure("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\n...", t, "x"))
    assert "CHANGED" in changed and "ssh-keygen -R '[board]:2222'" in changed
    assert "--identity" in str(ssh_failure("pi@board: Permission denied (publickey).", t, "x"))
    assert "unreachable" in str(ssh_failure("ssh: connect to host board port 2222: No route to host", t, "x"))
    lost = str(ssh_failure("Timeout, server board not responding.", t, "during the benchmark"))
    assert "lost the connection" in lost and "during the benchmark" in lost
    assert "resolve" in str(ssh_failure("ssh: Could not resolve hostname board: Name or service not known", t, "x"))


# ---------------------------------------------------------------- against the real sshd


@needs_sshd
def test_round_trip_ratios_accuracy_outputs(sshd, models):
    sample = sample_input(models["a"])
    rep = ssh_bench(
        sshd, [models["a"], models["b"]], sample=sample, runs=30, warmup=3, x=models["x"], y=models["y"],
        return_outputs=True,
    )  # fmt: skip
    a, b = rep.results
    assert a["artifact"] == str(models["a"]) and b["artifact"] == str(models["b"])
    assert a["ratio_to_first"] == 1.0 and b["ratio_to_first"] > 3
    assert a["accuracy"] == 1.0 and b["accuracy"] == pytest.approx(models["acc_b"])
    np.testing.assert_allclose(rep.outputs[0], ort_logits(models["a"], sample), rtol=1e-5, atol=1e-6)
    assert rep.device["spec"] == sshd.url and rep.device["machine"] and rep.device["onnxruntime"]
    assert rep.peak_rss_mb and rep.peak_rss_mb > 10 and not rep.emulated
    assert leftovers(sshd) == []


@needs_sshd
def test_cli_over_ssh_writes_json(sshd, models, tmp_path, pythons):
    out = tmp_path / "r.json"
    args = ["bench", str(models["a"]), str(models["b"]), "--device", sshd.url, "--identity", str(sshd.user_key)]
    args += ["--runs", "10", "--warmup", "1", "--json", str(out), "--remote-python", pythons["full"]]
    for opt in sshd.client_options():
        args += ["--ssh-option", opt]
    assert run_cli(args) == 0
    data = json.loads(out.read_text())
    assert data["device"]["spec"] == sshd.url
    assert [r["ratio_to_first"] > 3 for r in data["results"]] == [False, True]
    assert leftovers(sshd) == []


@needs_sshd
def test_wrong_key_is_an_auth_error(sshd, models):
    with pytest.raises(DeviceError, match="authentication to .* failed.*--identity"):
        ssh_bench(sshd, [models["a"]], identity=str(sshd.wrong_key))


@needs_sshd
def test_wrong_port_is_unreachable(sshd, models):
    closed = SshTarget.parse(sshd.url.rsplit(":", 1)[0] + ":1")
    with pytest.raises(DeviceError, match="unreachable"):
        bench_artifacts(
            [models["a"]], str(closed), sample=sample_input(models["a"]), identity=str(sshd.user_key),
            ssh_options=sshd.client_options(),
        )  # fmt: skip


@needs_sshd
def test_unknown_host_key_refused_unless_user_opts_in(sshd, models, tmp_path):
    with pytest.raises(DeviceError, match="not in known_hosts.*ssh-keyscan -p") as info:
        ssh_bench(sshd, [models["a"]], ssh_options=sshd.client_options(sshd.empty_known_hosts))
    assert "\n" not in str(info.value)
    # Explicit opt-in: accept-new records the key and proceeds.
    fresh = tmp_path / "known_hosts"
    fresh.write_text("")
    opts = [*sshd.client_options(fresh), "StrictHostKeyChecking=accept-new"]
    rep = ssh_bench(sshd, [models["a"]], ssh_options=opts, runs=3, warmup=0)
    assert rep.results[0]["latency_ms"]["p50"] > 0
    # (Debian hashes known_hosts names, so ask ssh-keygen rather than grep.)
    host_key = (sshd.root / "host_ed25519.pub").read_text().split()[1]
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{sshd.port}", "-f", str(fresh)], capture_output=True)
    assert found.returncode == 0 and host_key in found.stdout.decode()


@needs_sshd
def test_changed_host_key_is_refused(sshd, models, tmp_path):
    forged = tmp_path / "known_hosts"
    key_type, key = (Path(str(sshd.wrong_key) + ".pub")).read_text().split()[:2]
    forged.write_text(f"[127.0.0.1]:{sshd.port} {key_type} {key}\n")
    with pytest.raises(DeviceError, match="CHANGED"):
        ssh_bench(sshd, [models["a"]], ssh_options=sshd.client_options(forged))


@needs_sshd
def test_missing_onnxruntime_says_which_pip(sshd, models, pythons):
    with pytest.raises(DeviceError, match="onnxruntime not installed") as info:
        ssh_bench(sshd, [models["a"]], python=pythons["no_ort"])
    assert f"{pythons['no_ort']} -m pip install onnxruntime" in str(info.value)
    assert leftovers(sshd) == []


@needs_sshd
def test_missing_numpy_and_missing_python(sshd, models, pythons):
    with pytest.raises(DeviceError, match="numpy and onnxruntime not installed.*-m pip install numpy onnxruntime"):
        ssh_bench(sshd, [models["a"]], python=pythons["bare"])
    with pytest.raises(DeviceError, match="'/nonexistent/python3' was not found"):
        ssh_bench(sshd, [models["a"]], python="/nonexistent/python3")
    assert leftovers(sshd) == []


def _start_long_bench(sshd, models, **kw) -> tuple[threading.Thread, dict]:
    """Run a practically endless benchmark in a thread; returns (thread, box with 'error' or 'report')."""
    box: dict = {}

    def work():
        try:
            box["report"] = ssh_bench(sshd, [models["b"]], runs=10**8, warmup=0, **kw)
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    th = threading.Thread(target=work, daemon=True)
    th.start()
    return th, box


def _wait_runner_pid(sshd, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pidfile in sshd.remote_tmp.glob("edgeprune.*/runner.pid"):
            text = pidfile.read_text().strip()
            if text:
                time.sleep(0.3)  # let it get into the timed loop
                return int(text)
        time.sleep(0.05)
    raise AssertionError("the remote runner never started")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


@needs_sshd
def test_runner_killed_mid_run(sshd, models):
    th, box = _start_long_bench(sshd, models, timeout=60)
    pid = _wait_runner_pid(sshd)
    os.kill(pid, signal.SIGKILL)  # what the OOM killer does on a small board
    th.join(30)
    assert not th.is_alive()
    assert isinstance(box.get("error"), DeviceError), box
    assert "killed by signal 9" in str(box["error"])
    assert leftovers(sshd) == []


@needs_sshd
def test_connection_dropped_mid_run(sshd, models):
    th, box = _start_long_bench(sshd, models, timeout=60)
    pid = _wait_runner_pid(sshd)
    # The runner's parent is the shell, whose parent is sshd's session process: killing that one drops
    # the connection the way a crashed device or a pulled cable does, while the runner keeps going.
    shell = int(Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[1])
    session = int(Path(f"/proc/{shell}/stat").read_text().split(")")[-1].split()[1])
    assert "sshd" in Path(f"/proc/{session}/cmdline").read_text()
    os.kill(session, signal.SIGKILL)
    th.join(30)
    assert not th.is_alive()
    assert isinstance(box.get("error"), DeviceError), box
    assert "lost the connection" in str(box["error"]) or "killed" in str(box["error"])
    # Cleanup reconnected, stopped the orphaned runner by its pid and removed the temp dir.
    assert leftovers(sshd) == []
    time.sleep(0.2)
    assert not _alive(pid)


@needs_sshd
def test_timeout_stops_remote_runner_and_cleans_up(sshd, models):
    th, box = _start_long_bench(sshd, models, timeout=4)
    pid = _wait_runner_pid(sshd)
    th.join(30)
    assert isinstance(box.get("error"), DeviceError) and "timed out after 4 s" in str(box["error"])
    assert leftovers(sshd) == []
    time.sleep(0.2)
    assert not _alive(pid)


def test_sshd_helper_cleans_up(tmp_path):
    if sshd_unavailable_reason():
        pytest.skip(sshd_unavailable_reason())
    server = start_sshd(tmp_path / "s")
    proc = server.proc
    server.stop()
    assert proc.poll() is not None
    shutil.rmtree(tmp_path / "s")


# ---------------------------------------------------------------- device spec, key and options, checked up front


def test_parse_device_and_pure_checks(tmp_path):
    assert parse_device("local").kind == "local" and parse_device("qemu-arm64").ssh is None
    assert parse_device("ssh://pi@board:2222").ssh == SshTarget("board", "pi", 2222)
    with pytest.raises(EdgepruneError, match="unknown device 'pi@board'"):
        parse_device("pi@board")
    with pytest.raises(EdgepruneError, match="--identity only applies to an ssh:// device"):
        check_device_options("local", identity=str(tmp_path))
    with pytest.raises(EdgepruneError, match="--ssh-option only applies"):
        check_device_options("qemu-arm64", ssh_options=["ConnectTimeout=3"])
    with pytest.raises(EdgepruneError, match="no such key file"):
        check_identity(tmp_path / "id_missing")
    with pytest.raises(EdgepruneError, match="is a directory"):
        check_identity(tmp_path)
    key = tmp_path / "id_key"
    key.write_text("not checked for format: ssh says what is wrong with a key")
    assert check_identity(key) == str(key)
    if os.geteuid() != 0:  # root reads any file
        key.chmod(0)
        with pytest.raises(EdgepruneError, match="cannot read the key file"):
            check_identity(key)


@needs_sshd
def test_probe_checks_host_key_and_auth(sshd):
    check_device(sshd.url, str(sshd.user_key), sshd.client_options())
    with pytest.raises(DeviceError, match="authentication to .* failed"):
        check_device(sshd.url, str(sshd.wrong_key), sshd.client_options())
    with pytest.raises(DeviceError, match=f"ssh-keyscan -p {sshd.port} 127.0.0.1"):
        check_device(sshd.url, str(sshd.user_key), sshd.client_options(sshd.empty_known_hosts))
    closed = sshd.url.rsplit(":", 1)[0] + ":1"
    with pytest.raises(DeviceError, match="unreachable"):
        check_device(closed, str(sshd.user_key), sshd.client_options())


@needs_sshd
def test_compress_refuses_a_bad_device_before_loading_anything(sshd, tmp_path):
    """The probe runs before the model and data load: a wrong key fails in seconds, --out stays untouched.

    The data folder does not exist, so had anything loaded, the error would be about the data instead.
    """
    out = tmp_path / "out"
    args = ["compress", "--data", f"imagefolder:{tmp_path / 'no-such-folder'}", "--out", str(out), "-q"]
    args += ["--latency-from", sshd.url, "--identity", str(sshd.wrong_key)]
    for opt in sshd.client_options():
        args += ["--ssh-option", opt]
    t0 = time.monotonic()
    code, err = run_cli_capture(args)
    assert code == 3 and "authentication to" in err and "Traceback" not in err
    assert time.monotonic() - t0 < 20 and not out.exists()


def run_cli_capture(argv: list[str]) -> tuple[int, str]:
    from tests.hostile.runner import run_cli as run_in_process

    outcome = run_in_process(argv)
    return outcome.exit_code, outcome.stderr


# ---------------------------------------------------------------- dropbear (no SFTP), like a small board


@needs_dropbear
def test_dropbear_board_has_no_sftp(dropbear, tmp_path):
    """The fixture is a faithful board: OpenSSH >= 9's scp (SFTP) fails against it as reported in issue 19."""
    f = tmp_path / "f"
    f.write_text("x")
    argv = ["scp", "-q", "-o", "BatchMode=yes", "-i", str(dropbear.user_key), "-P", str(dropbear.port)]
    for opt in dropbear.client_options():
        argv += ["-o", opt]
    proc = subprocess.run([*argv, str(f), f"{dropbear.user}@127.0.0.1:{dropbear.remote_tmp}/"], capture_output=True)
    assert proc.returncode != 0 and b"Connection closed" in proc.stderr
    assert not (dropbear.remote_tmp / "f").exists()


@needs_dropbear
def test_bench_over_dropbear(dropbear, models):
    sample = sample_input(models["a"])
    rep = ssh_bench(
        dropbear, [models["a"], models["b"]], sample=sample, runs=20, warmup=2, x=models["x"], y=models["y"],
        return_outputs=True,
    )  # fmt: skip
    a, b = rep.results
    assert a["ratio_to_first"] == 1.0 and b["ratio_to_first"] > 3
    assert a["accuracy"] == 1.0 and b["accuracy"] == pytest.approx(models["acc_b"])
    np.testing.assert_allclose(rep.outputs[0], ort_logits(models["a"], sample), rtol=1e-5, atol=1e-6)
    assert rep.device["spec"] == dropbear.url and rep.device["onnxruntime"]
    assert leftovers(dropbear) == []


@needs_dropbear
def test_cli_bench_over_dropbear(dropbear, models, tmp_path):
    """`edgeprune bench model.onnx --device ssh://root@127.0.0.1:PORT` against dropbear, host keys checked."""
    out = tmp_path / "r.json"
    args = ["bench", str(models["a"]), "--device", dropbear.url, "--identity", str(dropbear.user_key)]
    args += ["--runs", "5", "--warmup", "1", "--json", str(out), "--remote-python", sys.executable]
    for opt in dropbear.client_options():
        args += ["--ssh-option", opt]
    assert run_cli(args) == 0
    assert json.loads(out.read_text())["results"][0]["latency_ms"]["p50"] > 0
    assert leftovers(dropbear) == []


@needs_dropbear
def test_dropbear_probe_and_refusals(dropbear, models):
    check_device(dropbear.url, str(dropbear.user_key), dropbear.client_options())
    with pytest.raises(DeviceError, match="not in known_hosts.*ssh-keyscan -p"):
        ssh_bench(dropbear, [models["a"]], ssh_options=dropbear.client_options(dropbear.empty_known_hosts))
    with pytest.raises(DeviceError, match="authentication to .* failed"):
        check_device(dropbear.url, str(dropbear.wrong_key), dropbear.client_options())
    assert leftovers(dropbear) == []


@needs_dropbear
def test_copy_names_with_shell_characters_arrive_intact(dropbear, tmp_path):
    """The remote command is built with shlex.quote: a file name the shell would split or expand arrives as is."""
    from edgeprune.benchmarks.ssh import SshSession

    session = SshSession(SshTarget.parse(dropbear.url), dropbear.user_key, dropbear.client_options())
    remote = session.make_temp_dir(30)
    src = tmp_path / "a b;$(touch pwned).bin"
    payload = os.urandom(200_000)
    src.write_bytes(payload)
    try:
        session.put([src], remote, 30)
        assert (Path(remote) / src.name).read_bytes() == payload
        assert not any((d / "pwned").exists() for d in (Path(remote), dropbear.root / "home", Path.cwd()))
    finally:
        session.remove_dir(remote, 30)
    assert leftovers(dropbear) == []


@needs_dropbear
@pytest.mark.slow
def test_compress_benchmarks_on_a_dropbear_board(dropbear, tmp_path):
    """The whole job with --latency-from a dropbear board: the login is checked first, the artifacts are
    streamed (no SFTP) and timed there, and the report says where."""
    out = tmp_path / "out"
    args = ["compress", "--signals", "magnitude", "--range-baselines", "mag", "--finetune-epochs", "0"]
    args += ["--calib-size", "200", "--eval-size", "300", "--bench-runs", "5", "--quantize", "none", "-q"]
    args += ["--out", str(out), "--latency-from", dropbear.url, "--identity", str(dropbear.user_key)]
    args += ["--remote-python", sys.executable]
    for opt in dropbear.client_options():
        args += ["--ssh-option", opt]
    assert run_cli(args) == 0
    bench = json.loads((out / "report.json").read_text())["bench"]
    assert bench["device"]["spec"] == dropbear.url
    assert [r["latency_ms"]["p50"] > 0 for r in bench["results"]] == [True, True]
    assert leftovers(dropbear) == []

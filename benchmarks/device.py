"""Benchmark ONNX artifacts on a device: this machine, a board over SSH, or emulated arm64 (QEMU).

One entry point, `bench_artifacts`, used by ``edgeprune bench`` and by the compress pipeline. Every
device runs the same self-contained ``runner.py`` in its own process, so peak RSS is the runner's (not
torch's) and local numbers are comparable with remote ones:

- ``local``: ``sys.executable runner.py`` on this machine;
- ``ssh://user@host[:port]``: ``mktemp -d`` on the device, stream runner + artifacts + inputs .npz over
  ssh (no scp/SFTP: dropbear boards have none), ``python3 runner.py``, parse its JSON, and always kill a
  leftover runner and remove the temp dir;
- ``qemu-arm64``: the aarch64 interpreter under QEMU user mode (``edgeprune.benchmarks.qemu_arm64``).
  Correct outputs and accuracy, but timings of an emulator are meaningless: the report is marked
  ``emulated`` and its results carry ``latency_ms: null``; the raw timings stay under
  ``emulated_timings_ms`` only for debugging.

Callers that run long work before benchmarking (``compress``) call `check_device_options` (pure) and
`check_device` (a cheap login) first, so a bad spec, key or unreachable board fails in seconds, not after
the pruning.
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeprune.errors import DataError, DeviceError, EdgepruneError

from .ssh import PROBE_CONNECT_TIMEOUT_S, SshSession, SshTarget, check_identity, check_ssh_options

RUNNER = Path(__file__).with_name("runner.py")
DEVICES_HELP = "local, ssh://user@host[:port] or qemu-arm64"
LOCAL_DEVICES = ("local", "qemu-arm64")  # devices named by a word; the rest is an ssh:// URL
# Fields of a runner result that are timings: hidden behind `emulated_timings_ms` under emulation.
_TIMING_FIELDS = ("latency_ms", "cv", "noisy", "throughput_per_s", "ratio_to_first")


@dataclass
class BenchReport:
    device: dict  # facts from the runner (uname, CPU model, cores, onnxruntime version, governor) + "spec"
    threads: int
    results: list[dict]  # one per artifact, in the order given; see runner.bench for the fields
    peak_rss_mb: float | None  # of the runner process holding every artifact's session
    emulated: bool  # True under QEMU: latency fields are null, never report them as latency
    outputs: list[np.ndarray] | None = field(default=None, repr=False)  # first output on `sample`, if asked

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "threads": self.threads,
            "emulated": self.emulated,
            "peak_rss_mb": self.peak_rss_mb,
            "results": self.results,
        }


@dataclass(frozen=True)
class DeviceSpec:
    """A parsed ``--device`` / ``--latency-from``: ``kind`` is a `LOCAL_DEVICES` word or "ssh"."""

    kind: str
    ssh: SshTarget | None = None

    def __str__(self) -> str:
        return str(self.ssh) if self.ssh is not None else self.kind


def parse_device(spec: str) -> DeviceSpec:
    """``local``, ``qemu-arm64`` or ``ssh://[user@]host[:port]``; anything else is a one-line error."""
    if spec in LOCAL_DEVICES:
        return DeviceSpec(spec)
    if spec.startswith("ssh://"):
        return DeviceSpec("ssh", SshTarget.parse(spec))
    raise EdgepruneError(f"unknown device '{spec}'; use {DEVICES_HELP}")


def check_device_options(
    spec: str, identity: str | Path | None = None, ssh_options: list[str] | tuple[str, ...] = ()
) -> DeviceSpec:
    """Everything about a device that can be checked without touching it: the spec, the key, the options.

    ``--identity`` and ``--ssh-option`` with a device that is not ssh:// are refused: they would be
    ignored, and a user who passes them believes the numbers came from that board.
    """
    device = parse_device(spec)
    if device.kind != "ssh" and (identity is not None or ssh_options):
        flag = "--identity" if identity is not None else "--ssh-option"
        raise EdgepruneError(f"{flag} only applies to an ssh:// device, not '{spec}'; drop it or give ssh://user@host")
    check_identity(identity)
    check_ssh_options(ssh_options)
    return device


def check_device(
    spec: str, identity: str | Path | None = None, ssh_options: list[str] | tuple[str, ...] = ()
) -> DeviceSpec:
    """`check_device_options`, then a cheap look at the device itself: for ssh:// a login running ``true``
    (BatchMode, host-key checking on, a short ConnectTimeout), for qemu-arm64 that QEMU is installed."""
    device = check_device_options(spec, identity, ssh_options)
    if device.kind == "ssh":
        SshSession(device.ssh, identity, ssh_options, connect_timeout=PROBE_CONNECT_TIMEOUT_S).probe()
    elif device.kind == "qemu-arm64":
        from .qemu_arm64 import qemu_binary

        qemu_binary()
    return device


def sample_input(path: str | Path, batch: int = 1, seed: int = 0) -> np.ndarray:
    """A random float32 input shaped like the model's first input (dynamic batch -> ``batch``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if not inputs:
        raise EdgepruneError(f"{path} has no graph input")
    inp = inputs[0]
    tensor_type = inp.type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise EdgepruneError(f"{path}: input '{inp.name}' is not float32; edgeprune bench feeds float32 images")
    shape = []
    for i, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(int(dim.dim_value))
        elif i == 0:
            shape.append(batch)
        else:
            raise EdgepruneError(
                f"{path}: input '{inp.name}' has a dynamic dimension {i} ({dim.dim_param or '?'}); "
                "export with a fixed image size"
            )
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def input_shape(path: str | Path) -> tuple:
    """The first input's shape; dynamic dimensions are None."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    return tuple(
        int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in inp.type.tensor_type.shape.dim
    )


def _write_inputs(folder: Path, sample: np.ndarray, x: np.ndarray | None, y: np.ndarray | None) -> Path:
    arrays = {"sample": np.ascontiguousarray(sample, dtype=np.float32)}
    if (x is None) != (y is None):
        raise DataError("accuracy needs both images (x) and labels (y)")
    if x is not None:
        if len(x) != len(y):
            raise DataError(f"{len(x)} images but {len(y)} labels")
        arrays["x"] = np.ascontiguousarray(x, dtype=np.float32)
        arrays["y"] = np.ascontiguousarray(y, dtype=np.int64)
    path = folder / "inputs.npz"
    np.savez_compressed(path, **arrays)  # compressed: it crosses the network for SSH devices
    return path


def remote_word(path: str) -> str:
    """``path`` quoted for the remote shell; a leading ``~/`` still means the remote home."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def _runner_args(
    models: list[str], inputs: str, pidfile: str | None, threads: int, warmup: int, runs: int, outputs: bool
) -> list[str]:
    args = ["--inputs", inputs, "--threads", str(threads), "--warmup", str(warmup), "--runs", str(runs)]
    if pidfile:
        args += ["--pidfile", pidfile]
    if outputs:
        args.append("--outputs")
    return args + models


def _last_json(stdout: str) -> dict | None:
    # Login scripts on a device may print banners before the runner's single JSON line.
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _parse_runner(proc: subprocess.CompletedProcess, where: str, python: str, remote: bool = True) -> dict:
    """The runner's JSON, or a one-line DeviceError saying what went wrong and how to fix it."""
    out = _last_json(proc.stdout or "")
    stderr_lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
    last_err = stderr_lines[-1] if stderr_lines else "no error message"
    if out is not None and "error" in out:
        if out["error"] == "missing_module":
            fix = out.get("fix") or f"{python} -m pip install {out.get('module')}"
            # Debian 12 / Raspberry Pi OS refuse a system-wide pip install (PEP 668): say what works.
            venv = (
                "; where pip refuses (externally-managed Python): python3 -m venv ~/ort && "
                "~/ort/bin/pip install numpy onnxruntime, then --remote-python ~/ort/bin/python3"
            )
            raise DeviceError(
                f"{out.get('module')} not installed for {out.get('python') or python} on {where}; "
                f"install it{' there' if remote else ''} with `{fix}`" + (venv if remote else "")
            )
        raise DeviceError(f"the benchmark failed on {where}: {out.get('message', out['error'])}")
    if proc.returncode == 127:
        raise DeviceError(
            f"'{python}' was not found on {where}; install Python >= 3.8 there (e.g. `sudo apt install "
            "python3 python3-numpy`) or point --remote-python at an interpreter"
        )
    if proc.returncode > 128 or proc.returncode < 0:
        sig = proc.returncode - 128 if proc.returncode > 128 else -proc.returncode
        hint = " (out of memory?)" if sig == 9 else ""
        raise DeviceError(f"the benchmark runner was killed by signal {sig} on {where}{hint}")
    if proc.returncode != 0:
        raise DeviceError(f"the benchmark runner failed on {where} (exit {proc.returncode}): {last_err}")
    if out is None or "results" not in out:
        raise DeviceError(f"the benchmark runner on {where} returned no result: {last_err}")
    return out


def _report(out: dict, spec: str, emulated: bool, names: list[str]) -> BenchReport:
    results = out["results"]
    for res, name in zip(results, names, strict=True):
        res["artifact"] = name  # the path the user gave, not the runner's temporary name
        if emulated:
            res["emulated_timings_ms"] = res.pop("latency_ms")
            for key in _TIMING_FIELDS[1:]:
                res[key] = None
            res["latency_ms"] = None
    device = dict(out.get("device") or {})
    device["spec"] = spec
    outputs = out.get("outputs")
    return BenchReport(
        device=device,
        threads=int(out.get("threads", 1)),
        results=results,
        peak_rss_mb=out.get("peak_rss_mb"),
        emulated=emulated,
        outputs=[np.asarray(o, dtype=np.float32) for o in outputs] if outputs is not None else None,
    )


def _bench_local(paths, folder, inputs, args_kw, timeout) -> dict:
    argv = [sys.executable, str(RUNNER), *_runner_args([str(p) for p in paths], str(inputs), None, **args_kw)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"the local benchmark timed out after {timeout:g} s; use fewer --runs") from None
    return _parse_runner(proc, "this machine", sys.executable, remote=False)


def _bench_qemu(paths, folder, inputs, args_kw, timeout) -> dict:
    from .qemu_arm64 import qemu_python  # heavy setup lives there; only import when asked for

    args = _runner_args([str(Path(p).absolute()) for p in paths], str(inputs), None, **args_kw)
    try:
        proc = qemu_python(str(RUNNER), args, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"the emulated arm64 run timed out after {timeout:g} s; use fewer images") from None
    return _parse_runner(proc, "emulated arm64 (qemu)", "python3", remote=False)


def _bench_ssh(paths, folder, inputs, args_kw, timeout, *, target, identity, ssh_options, remote_python) -> dict:
    session = SshSession(target, identity=identity, options=list(ssh_options))
    # Short safe names on the device; the report maps them back to the user's paths.
    staged = []
    for i, p in enumerate(paths):
        link = folder / f"m{i}{Path(p).suffix}"  # .ort stays .ort: onnxruntime picks the format by it
        link.symlink_to(Path(p).absolute())
        staged.append(link)
    remote = session.make_temp_dir(timeout)
    pidfile = f"{remote}/runner.pid"
    finished = False
    try:
        session.put([RUNNER, inputs, *staged], remote, timeout)
        runner_argv = ["runner.py", *_runner_args([s.name for s in staged], "inputs.npz", "runner.pid", **args_kw)]
        # Not `exec`: the shell then reports a killed runner as 128+signal instead of ssh's bare 255.
        cmd = f"cd {shlex.quote(remote)} || exit 1; {remote_word(remote_python)} {shlex.join(runner_argv)}; exit $?"
        proc = session.run(cmd, timeout, "during the benchmark")
        out = _parse_runner(proc, str(target), remote_python)
        finished = True
        return out
    finally:
        try:
            # Kill a runner only when it may still be running: a finished one's pid may be reused.
            session.remove_dir(remote, min(timeout, 30.0), pidfile=None if finished else pidfile)
        except EdgepruneError as exc:
            if finished:
                raise DeviceError(f"benchmark done, but cleanup failed: {exc}") from None
            # otherwise the original error is the one the user needs to see
            print(f"edgeprune: warning: {exc}", file=sys.stderr)


def bench_artifacts(
    paths: list[Path],
    device: str = "local",
    *,
    sample: np.ndarray,
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    identity: str | None = None,
    ssh_options: list[str] | tuple[str, ...] = (),
    timeout: float = 600,
    remote_python: str = "python3",
    return_outputs: bool = False,
) -> BenchReport:
    """Time ``paths`` interleaved on ``device`` with input ``sample``; accuracy on (x, y) when given.

    Results come back in the order of ``paths``; ``ratio_to_first`` compares p50 latencies with the
    first artifact. ``return_outputs`` also brings back each artifact's first output on ``sample``.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise EdgepruneError("nothing to benchmark: give at least one .onnx artifact")
    for p in paths:
        if not p.is_file():
            raise EdgepruneError(f"artifact not found: {p}")
    if threads < 1 or runs < 1 or warmup < 0:
        raise EdgepruneError("--threads and --runs must be >= 1 and --warmup >= 0")
    target = check_device_options(device, identity, ssh_options).ssh  # before any file is written
    if target is not None and (not remote_python or remote_python.startswith("-")):
        raise EdgepruneError(f"bad --remote-python '{remote_python}': give an interpreter name or path")
    args_kw = {"threads": threads, "warmup": warmup, "runs": runs, "outputs": return_outputs}
    names = [str(p) for p in paths]
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-") as tmp:
        folder = Path(tmp)
        inputs = _write_inputs(folder, sample, x, y)
        if device == "local":
            out = _bench_local(paths, folder, inputs, args_kw, timeout)
            return _report(out, device, False, names)
        if device == "qemu-arm64":
            out = _bench_qemu(paths, folder, inputs, args_kw, timeout)
            # On an arm64 host qemu_python runs the native interpreter: real timings, not emulated.
            emulated = platform.machine() not in ("aarch64", "arm64")
            report = _report(out, device, emulated, names)
            if emulated:
                from .qemu_arm64 import QEMU_CPU

                # The guest reads the host's /proc/cpuinfo; say what is really executing the code.
                report.device["emulated_cpu"] = QEMU_CPU
                report.device["cpu_model"] = f"QEMU {QEMU_CPU} (emulated on {report.device.get('cpu_model')})"
                report.peak_rss_mb = None  # the emulator's memory, not the model's
            return report
        out = _bench_ssh(
            paths,
            folder,
            inputs,
            args_kw,
            timeout,
            target=target,
            identity=identity,
            ssh_options=ssh_options,
            remote_python=remote_python,
        )
        return _report(out, str(target), False, names)

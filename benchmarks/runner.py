"""Self-contained ONNX benchmark runner.

This file is imported locally *and* copied verbatim to remote devices, so it may only depend on the
Python standard library, numpy and onnxruntime. Run it as a script on the device:

    python3 runner.py --inputs inputs.npz --threads 4 --runs 50 model_a.onnx model_b.onnx

It prints one JSON object on stdout: ``{"device": {...}, "results": [...]}``. When something on the
device is missing or broken it prints ``{"error": KIND, "message": ..., ...}`` instead and exits
non-zero (4: a Python module is missing, 5: a model cannot be loaded or run), so the caller can tell
the user what to install or fix. Keep it runnable on Python 3.8: no ``match``, no ``X | Y`` outside
annotations, no ``str.removeprefix``.

Several models are timed *interleaved*, one run of each per round, so slow drift of the device (thermal
throttling, a background job) hits all of them alike; ratios to the first model stay fair. Each round
visits them in a fresh shuffled order: a model run right after a bigger one finds its weights evicted
from the caches, and a fixed order would charge that to whichever model follows the biggest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import time

try:
    import numpy as np
except ImportError:  # only possible on a bare device; main() reports it as JSON
    np = None  # type: ignore[assignment]

EXIT_MISSING_MODULE = 4
EXIT_MODEL_ERROR = 5

NOISY_CV = 0.15  # a coefficient of variation above this marks a run as noisy


def latency_stats(samples_ms: list[float] | np.ndarray) -> dict:
    """p50/p90/p99/mean/std (ms), coefficient of variation and throughput of one input per run."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples")
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": mean,
        "std": std,
        "cv": std / mean if mean > 0 else 0.0,
        "runs": int(a.size),
        "throughput_per_s": 1000.0 / mean if mean > 0 else 0.0,
    }


# Arm "CPU part" numbers (implementer 0x41) of the cores edge boards use; /proc/cpuinfo on arm64 has no
# model name, only these.
ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd49": "Neoverse-N2",
    "0xd4f": "Neoverse-V2",
}
# CPU flags that decide how fast INT8 runs: Arm dot-product / int8 matmul / SVE, x86 VNNI.
INT8_FLAGS = ("asimddp", "i8mm", "sve", "avx2", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(text: str) -> set[str]:
    """The first CPU's feature flags in the text of /proc/cpuinfo ("flags" on x86, "Features" on arm64)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def parse_cpuinfo(text: str) -> dict:
    """CPU model and INT8-relevant flags from the text of /proc/cpuinfo (x86 or arm64)."""
    fields = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields.setdefault(key.strip().lower(), value.strip())  # first CPU's value
    model = fields.get("model name") or fields.get("cpu model")
    if not model and fields.get("cpu implementer") == "0x41":
        part = fields.get("cpu part", "").lower()
        model = ARM_PARTS.get(part, "Arm core " + part)
    # "model" is a board name on Arm ("Raspberry Pi 4 Model B Rev 1.4") but a number on x86.
    board = fields.get("model") if not fields.get("model", "0").isdigit() else None
    model = model or fields.get("hardware") or board
    flags = cpu_flags(text)
    return {
        "cpu_model": model or None,
        "board": board,
        "int8_flags": [f for f in INT8_FLAGS if f in flags],
        "dotprod": ("asimddp" in flags) if ("features" in fields) else None,
    }


def _read(path: str):
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace").strip().strip("\x00") or None
    except OSError:
        return None


def device_facts() -> dict:
    """What the machine is: enough to tell two benchmark results apart."""
    import onnxruntime as ort

    facts = {
        "hostname": platform.node(),
        "machine": platform.machine(),
        "uname": " ".join(platform.uname()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_model": None,
        "board": None,
        "int8_flags": [],
        "dotprod": None,
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
    }
    cpuinfo = _read("/proc/cpuinfo")
    if cpuinfo:
        facts.update(parse_cpuinfo(cpuinfo))
    # Jetson and most device-tree boards name themselves here (the Pi too, without "Model" in cpuinfo).
    facts["board"] = facts["board"] or _read("/proc/device-tree/model")
    return facts


def make_session(path: str, threads: int, spinning: bool = True):
    """``spinning`` False: intra-op threads sleep between runs (onnxruntime spins them by default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def accuracy(session, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of an ONNX session on (x, y). Handles models exported with a fixed batch of 1."""
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else batch_size
    correct = 0
    for i in range(0, len(x), step):
        xb = x[i : i + step].astype(np.float32, copy=False)
        logits = session.run(None, {name: xb})[0]
        correct += int((logits.argmax(axis=1) == y[i : i + step]).sum())
    return correct / max(1, len(x))


def run_orders(n: int, rounds: int, seed: int = 0) -> list[list[int]]:
    """The order in which ``n`` interleaved models run, round by round: a fresh (seeded) shuffle each round.

    Measured on the 2-core x86 VM: a pruned ResNet run right after the dense one is 3-4 % slower than the
    same model run after a smaller one (its weights were evicted from the caches); in a fixed order that
    penalty lands on one model every round and moves speedups by as much as the differences compared."""
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(range(n))
        rng.shuffle(order)
        orders.append(order)
    return orders


def bench(
    paths: list[str],
    sample: np.ndarray,
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
) -> list[dict]:
    """Time each model on ``sample`` (one batch), interleaved; optionally measure accuracy on (x, y)."""
    sessions = [make_session(p, threads) for p in paths]
    feeds = [{s.get_inputs()[0].name: sample.astype(np.float32, copy=False)} for s in sessions]
    for s, f in zip(sessions, feeds):  # noqa: B905 (zip(strict=) needs Python 3.10; devices may have 3.8)
        for _ in range(warmup):
            s.run(None, f)
    samples: list[list[float]] = [[] for _ in paths]
    for order in run_orders(len(paths), runs):
        for i in order:
            t0 = time.perf_counter()
            sessions[i].run(None, feeds[i])
            samples[i].append((time.perf_counter() - t0) * 1000.0)
    results = []
    first_p50 = None
    for path, s, ms in zip(paths, sessions, samples):  # noqa: B905
        stats = latency_stats(ms)
        first_p50 = stats["p50"] if first_p50 is None else first_p50
        results.append(
            {
                "artifact": os.path.basename(path),
                "bytes": os.path.getsize(path),
                "latency_ms": {k: stats[k] for k in ("p50", "p90", "p99", "mean")},
                "cv": stats["cv"],
                "noisy": stats["cv"] > NOISY_CV,
                "throughput_per_s": stats["throughput_per_s"],
                "ratio_to_first": stats["p50"] / first_p50 if first_p50 else None,
                "accuracy": accuracy(s, x, y) if x is not None and y is not None else None,
            }
        )
    return results


def median_p50(
    paths: list, sample: np.ndarray, threads: int = 1, runs: int = 50, repeats: int = 1, warmup: int = 20
) -> list[float]:
    """Each model's p50 latency (ms), interleaved (``bench``); with ``repeats`` > 1 the median over that many
    such runs (one run's figures swing by several % on a shared machine, by a tenth at 2 threads)."""
    per_run = [
        [r["latency_ms"]["p50"] for r in bench([str(p) for p in paths], sample, threads, warmup, runs)]
        for _ in range(repeats)
    ]
    return [float(np.median(col)) for col in zip(*per_run)]  # noqa: B905 (Python 3.8 on devices)


def first_outputs(paths: list[str], sample: np.ndarray) -> list[list]:
    """The first output of each model on ``sample``, as nested lists (for correctness checks)."""
    outs = []
    for path in paths:
        session = make_session(path, 1)
        feed = {session.get_inputs()[0].name: sample.astype(np.float32, copy=False)}
        outs.append(np.asarray(session.run(None, feed)[0], dtype=np.float64).tolist())
    return outs


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    /proc/self/status VmHWM first: ru_maxrss survives fork+exec on Linux, so a runner started by a big
    parent (a Python process with torch loaded) would report the parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _missing_modules(names: list[str]) -> int:
    # sys.executable is the interpreter the caller chose (e.g. --remote-python); install into that one.
    print(
        json.dumps(
            {
                "error": "missing_module",
                "module": " and ".join(names),
                "python": sys.executable,
                "python_version": platform.python_version(),
                "message": f"{' and '.join(names)} not installed for {sys.executable}",
                "fix": f"{sys.executable or 'python3'} -m pip install {' '.join(names)}",
            }
        )
    )
    return EXIT_MISSING_MODULE


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark ONNX models with onnxruntime (CPU).")
    p.add_argument("models", nargs="+")
    p.add_argument("--inputs", required=True, help=".npz with 'sample' (one batch) and optional 'x', 'y'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--outputs", action="store_true", help="also return each model's first output on 'sample'")
    p.add_argument("--pidfile", help="write this process id here first (lets the caller stop a stuck run)")
    args = p.parse_args(argv)
    if args.pidfile:
        with open(args.pidfile, "w") as fh:
            fh.write(str(os.getpid()))
    missing = [] if np is not None else ["numpy"]
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        missing.append("onnxruntime")
    if missing:
        return _missing_modules(missing)
    data = np.load(args.inputs)
    x = data["x"] if "x" in data.files else None
    y = data["y"] if "y" in data.files else None
    try:
        results = bench(args.models, data["sample"], args.threads, args.warmup, args.runs, x, y)
        outputs = first_outputs(args.models, data["sample"]) if args.outputs else None
    except Exception as exc:  # onnxruntime raises its own exception types; report any as one line
        message = " ".join(str(exc).split())
        print(json.dumps({"error": "model_error", "message": f"{type(exc).__name__}: {message}"}))
        return EXIT_MODEL_ERROR
    out = {
        "device": device_facts(),
        "threads": args.threads,
        "results": results,
        "peak_rss_mb": peak_rss_mb(),
    }
    if outputs is not None:
        out["outputs"] = outputs
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

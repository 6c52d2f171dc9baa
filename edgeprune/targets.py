"""Target profiles: what a deployment CPU prefers, kept as data (``targets.json``), not if-chains.

A user adds or overrides profiles with a JSON file of the same shape, passed as ``--targets-file`` or
named by the ``EDGEPRUNE_TARGETS`` environment variable. A profile may say ``"base": "arm64"`` to start
from a built-in one and change only some fields:

    {"my-board": {"base": "rpi4", "description": "our gateway (Cortex-A72, 2 cores)", "threads": 2}}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

from .errors import EdgepruneError
from .schema import Bool, Int, OneOf, Str, field_problems, read_json_file, show

ENV_VAR = "EDGEPRUNE_TARGETS"
ARCHES = ("x86_64", "aarch64")
# How onnxruntime.quantization should quantize for the target (activations x weights):
#   qdq_s8s8               QDQ, signed activations and weights (Arm NEON: fast and accurate)
#   qdq_u8s8_reduce_range  QDQ, uint8 activations, int8 weights on 7 bits (x86 AVX2 without VNNI:
#                          VPMADDUBSW can saturate with full-range weights)
#   qdq_u8u8               QDQ, unsigned both (for runtimes without signed kernels)
INT8_FORMATS = ("qdq_s8s8", "qdq_u8s8_reduce_range", "qdq_u8u8")


@dataclass(frozen=True)
class Target:
    name: str
    arch: str  # "x86_64" or "aarch64", as `uname -m` prints it
    description: str
    threads: int  # default onnxruntime intra-op threads for benchmarks
    round_to: int  # preferred channel multiple for structured pruning
    int8_format: str  # one of INT8_FORMATS
    int8_worth_it: bool  # whether INT8 is the default for this target
    opset: int

    def to_dict(self) -> dict:
        return asdict(self)


_FIELDS = {f.name: f.type for f in fields(Target)}


def _builtin() -> dict[str, dict]:
    text = resources.files("edgeprune").joinpath("targets.json").read_text()
    return json.loads(text)


def _read_user_file(path: Path) -> dict[str, dict]:
    table = read_json_file(path, "target file")
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise EdgepruneError(f'target file {path} must be a JSON object of profiles: {{"name": {{...}}}}')
    for name, fields_ in table.items():
        base = fields_.get("base")
        if base is not None and not isinstance(base, str):
            raise EdgepruneError(
                f"target profile '{name}' in {path}: base must be the name of a target (a string), got {show(base)}"
            )
    return table


# Every field of a profile and what it must hold; `_validate` reports all the bad ones on one line.
TARGET_SCHEMA = {
    "arch": OneOf(ARCHES),
    "description": Str(),
    "threads": Int(lo=1),
    "round_to": Int(lo=1),
    "int8_format": OneOf(INT8_FORMATS),
    "int8_worth_it": Bool(),
    "opset": Int(lo=1),
}


def _validate(name: str, fields_: dict, where: str) -> Target:
    missing = sorted(set(_FIELDS) - {"name"} - set(fields_))
    unknown = sorted(set(fields_) - set(_FIELDS) - {"base"})
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)}"] if unknown else []
        )
        raise EdgepruneError(f"target profile '{name}' in {where} is malformed: {'; '.join(parts)}")
    f = {k: v for k, v in fields_.items() if k != "base"}
    problems = field_problems(f, TARGET_SCHEMA)
    if problems:
        raise EdgepruneError(f"target profile '{name}' in {where} is malformed: {'; '.join(problems)}")
    return Target(name=name, **f)


def available_targets(extra_file: str | Path | None = None) -> dict[str, Target]:
    """All target profiles: the built-in ones plus those in ``extra_file`` (default: ``$EDGEPRUNE_TARGETS``).

    A user profile with the name of a built-in one replaces it; ``"base"`` inherits a profile's fields.
    """
    table = {name: ("built-in targets.json", dict(f)) for name, f in _builtin().items()}
    if extra_file is None and os.environ.get(ENV_VAR):
        extra_file = os.environ[ENV_VAR]
    if extra_file is not None:
        path = Path(extra_file)
        for name, user_fields in _read_user_file(path).items():
            fields_ = dict(user_fields)
            base = fields_.pop("base", None)
            if base is not None:
                if base not in table:
                    raise EdgepruneError(
                        f"target profile '{name}' in {path}: base '{base}' is not a known target "
                        f"({', '.join(sorted(table))})"
                    )
                fields_ = {**table[base][1], **fields_}
            table[name] = (str(path), fields_)
    return {name: _validate(name, f, where) for name, (where, f) in table.items()}


def get_target(name: str, extra_file: str | Path | None = None) -> Target:
    targets = available_targets(extra_file)
    if name not in targets:
        raise EdgepruneError(
            f"unknown target '{name}'; choose one of: {', '.join(sorted(targets))} "
            f"(or add it with a targets file, see `edgeprune targets --help`)"
        )
    return targets[name]


# x86 CPU flag -> channel block onnxruntime's convolutions run in (MLAS NCHWc: 16 floats per AVX-512 register).
# A width between two multiples of the block is padded up: measured on an AVX-512 Xeon, 4 3x3 convs at 28x28
# with 8 channels ran as slow as with 16, 24 as 32, 40 as 48 (benchmarks/results/conv_blocks.md).
CONV_BLOCK_FLAGS = {"avx512f": 16}


def host_cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first CPU's flags from ``/proc/cpuinfo`` (or the given text); empty where it cannot be read."""
    from .benchmarks.runner import _read, cpu_flags

    return cpu_flags(cpuinfo if cpuinfo is not None else _read("/proc/cpuinfo") or "")


def round_to_hint(target: Target, round_to: int, host_arch: str, flags: set[str]) -> str | None:
    """A one-line suggestion when latency is measured on this host and ``round_to`` is finer than the channel
    block its convolutions run in: pruning to widths the block pads back up costs accuracy and buys nothing."""
    if target.arch != host_arch:
        return None
    block = max((b for f, b in CONV_BLOCK_FLAGS.items() if f in flags), default=None)
    if block is None or round_to % block == 0:
        return None
    return (
        f"note: this CPU runs convolutions in {block}-channel blocks (AVX-512) and round_to is {round_to}: widths "
        f"between multiples of {block} buy no latency here; consider --round-to {block} (or --target x86_64-avx512)"
    )


def local_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def bench_threads(threads: int | None, target: Target, latency_from: str = "local") -> int:
    """Benchmark threads: the user's; else the target's default, as it is on a board over SSH, and on this
    machine capped to leave one core free. Every core busy timing measures contention, not the model: on a
    2-core VM a MobileNetV3 pick's speedup read 0.1-0.15x apart between protocols at 2 threads and moved
    0.05x between repeats, while at 1 thread the protocols agreed within 0.03x
    (benchmarks/results/timing_protocol.md)."""
    if threads:
        return threads
    if latency_from.startswith("ssh://"):
        return target.threads
    return max(1, min(target.threads, local_cores() - 1))


def threads_note(threads: int | None, target: Target, used: int) -> str | None:
    """The report's line when the default thread count was capped on this machine (None when it was not)."""
    if threads or used >= target.threads:
        return None
    return (
        f"latency timed at {used} thread(s), not the target's {target.threads}: this machine has {local_cores()} "
        "core(s) and one is left free (timing on every core measures contention); pass --threads to choose"
    )

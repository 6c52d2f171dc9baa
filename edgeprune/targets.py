"""Target profiles: what a deployment CPU prefers, kept as data (``targets.json``), not if-chains."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from .errors import EdgepruneError


@dataclass(frozen=True)
class Target:
    name: str
    arch: str  # "x86_64" or "aarch64", as `uname -m` prints it
    description: str
    threads: int  # default onnxruntime intra-op threads for benchmarks
    round_to: int  # preferred channel multiple for structured pruning
    int8_format: str  # "qdq_s8s8" | "qdq_u8s8_reduce_range" | "qdq_u8u8"
    int8_worth_it: bool  # whether INT8 is the default for this target
    opset: int

    def to_dict(self) -> dict:
        return asdict(self)


def _builtin() -> dict[str, dict]:
    text = resources.files("edgeprune").joinpath("targets.json").read_text()
    return json.loads(text)


def available_targets(extra_file: str | Path | None = None) -> dict[str, Target]:
    """All target profiles: the built-in ones plus those in ``extra_file`` (same JSON shape)."""
    table = _builtin()
    if extra_file is not None:
        path = Path(extra_file)
        try:
            table.update(json.loads(path.read_text()))
        except FileNotFoundError:
            raise EdgepruneError(f"target file not found: {path}") from None
        except (json.JSONDecodeError, AttributeError) as exc:
            raise EdgepruneError(f"target file {path} is not a JSON object of profiles: {exc}") from None
    targets = {}
    for name, fields in table.items():
        try:
            targets[name] = Target(name=name, **fields)
        except TypeError as exc:
            raise EdgepruneError(f"target profile '{name}' is malformed: {exc}") from None
    return targets


def get_target(name: str, extra_file: str | Path | None = None) -> Target:
    targets = available_targets(extra_file)
    if name not in targets:
        raise EdgepruneError(f"unknown target '{name}'; choose one of: {', '.join(sorted(targets))}")
    return targets[name]

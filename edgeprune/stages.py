"""What every stage of both granularities shares: progress hooks, stage timings, the config record of the report,
and the one reason the sealed test split is opened. A leaf module: the orchestrators (`pipeline`,
`structured.flow`) and the deliver step import it, it imports none of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from .recovery import resolve_device

FINAL_EVALUATION = "final evaluation"  # the one reason the test split is opened for


class Progress:
    """Progress hooks; the CLI supplies a rich implementation, the default is silent."""

    def start(self, stage: str, total: int | None = None) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def finish(self) -> None: ...
    def log(self, message: str) -> None: ...


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def config_dict(
    cfg: Any, *, round_to: int | None = None, threads: int | None = None, finetune_batch: int | None = None
) -> dict:
    """The run's options as report.json records them, for both granularities: what ran, not the defaults'
    names (``device`` resolved; ``round_to``, ``threads`` and ``finetune_batch`` as the run used them when
    given)."""
    d = asdict(cfg)
    d["signals"], d["range_baselines"], d["ssh_options"] = (
        list(cfg.signals),
        list(cfg.range_baselines),
        list(cfg.ssh_options),
    )
    d["device"] = str(resolve_device(cfg.device))
    if round_to is not None:
        d["round_to"] = round_to
    if threads is not None:
        d["threads"] = threads
    if finetune_batch is not None:
        d["finetune_batch"] = finetune_batch
    return d

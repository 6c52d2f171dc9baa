"""Phase 2: the ten Mix-and-Match strategies.

A strategy is a per-layer sparsity vector rho chosen inside each layer's range [rho_min, rho_max]:
rho_l = rho_min + a_l * (rho_max - rho_min), with a_l in [0, 1] given by the strategy. Pure functions:
no model, no data, milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .baselines import Plan


@dataclass(frozen=True)
class LayerStats:
    """What a strategy may look at for one layer."""

    lo: float
    hi: float
    numel: int
    depth: float  # 0 = first prunable layer, 1 = last


Alpha = Callable[[LayerStats, float], float]  # (layer, mean layer size) -> a in [0, 1]


def _const(a: float) -> Alpha:
    return lambda layer, mean_numel: a


STRATEGIES: dict[str, Alpha] = {
    "conservative": _const(0.0),
    "aggressive": _const(1.0),
    "balanced": _const(0.5),
    "p30": _const(0.3),
    "p50": _const(0.5),
    "p70": _const(0.7),
    "p90": _const(0.9),
    # Big layers are redundant: push them toward rho_max, small ones stay near rho_min.
    "param_prop": lambda layer, mean_numel: min(1.0, 0.1 * layer.numel / mean_numel),
    # Late layers and the head toward rho_max / early convs and embeddings toward rho_max.
    "classifier_heavy": lambda layer, mean_numel: layer.depth,
    "feature_heavy": lambda layer, mean_numel: 1.0 - layer.depth,
}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)


def make_plan(strategy: str, layers: Mapping[str, LayerStats]) -> Plan:
    alpha = STRATEGIES[strategy]
    mean_numel = sum(s.numel for s in layers.values()) / max(1, len(layers))
    plan = {}
    for name, s in layers.items():
        a = min(1.0, max(0.0, alpha(s, mean_numel)))
        plan[name] = s.lo + a * (s.hi - s.lo)
    return plan


def make_all_plans(layers: Mapping[str, LayerStats]) -> dict[str, Plan]:
    return {name: make_plan(name, layers) for name in STRATEGY_NAMES}

"""Phase 2: the ten Mix-and-Match strategies.

A strategy is a per-layer sparsity vector rho chosen inside each layer's range [rho_min, rho_max]:
rho_l = rho_min + a_l * (rho_max - rho_min), with a_l in [0, 1] given by the strategy. ``search_plans`` then
shifts each plan to the requested global sparsity (``scale_plan``), so the candidates compare allocations at one
sparsity rather than a sweep of sparsities. Pure functions: no model, no data, milliseconds.
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


# ---- one sparsity, many allocations -------------------------------------------------------------------------
# Unscaled, the ten strategies are a sparsity sweep (VGG at 80 %: 62-90 %), so Mix-and-Match would compare
# sparsities, not allocations. Each plan is therefore shifted to the requested global sparsity before it is
# screened; the unscaled plan is kept beside it only where it is a different point worth screening (below).

TOLERANCE = 0.005  # a scaled plan lands in [target, target + TOLERANCE] of the prunable weights
UNSCALED = "/unscaled"  # name suffix of a strategy's plan as the paper defines it (not shifted)


def global_sparsity(plan: Plan, layers: Mapping[str, LayerStats]) -> float:
    """Fraction of all prunable weights a plan zeros, counted as masking does: round(rho * n) per layer."""
    total = sum(s.numel for s in layers.values())
    return sum(round(plan[name] * s.numel) for name, s in layers.items()) / max(1, total)


def shift_plan(plan: Plan, layers: Mapping[str, LayerStats], offset: float) -> Plan:
    """``offset`` added to every layer's rho, each layer clipped to its own range."""
    return {name: min(s.hi, max(s.lo, plan[name] + offset)) for name, s in layers.items()}


def reachable(layers: Mapping[str, LayerStats]) -> tuple[float, float]:
    """The lowest and highest global sparsity any plan inside the ranges can have (every layer at lo / hi)."""
    return (
        global_sparsity({n: s.lo for n, s in layers.items()}, layers),
        global_sparsity({n: s.hi for n, s in layers.items()}, layers),
    )


def scale_plan(plan: Plan, layers: Mapping[str, LayerStats], target: float) -> Plan:
    """The plan shifted by one shared offset (every layer clipped to its range) so that its global sparsity is
    the smallest at or above ``target``. Global sparsity only grows with the offset, so bisection finds it;
    where the ranges cannot reach ``target`` the result is every layer at its bound (check ``reachable``)."""
    low, high = -1.0, 1.0  # rho and every bound lie in [0, 1): these offsets put every layer at lo / hi
    if global_sparsity(shift_plan(plan, layers, high), layers) < target:
        return shift_plan(plan, layers, high)
    if global_sparsity(shift_plan(plan, layers, low), layers) >= target:
        return shift_plan(plan, layers, low)
    for _ in range(64):  # 2 / 2**64 is below float resolution: the interval cannot shrink further
        mid = (low + high) / 2
        if global_sparsity(shift_plan(plan, layers, mid), layers) >= target:
            high = mid
        else:
            low = mid
    return shift_plan(plan, layers, high)


def search_plans(layers: Mapping[str, LayerStats], target: float, below: bool = False) -> dict[str, Plan]:
    """The strategies' candidate plans for one global target, by name.

    - ``NAME``: strategy NAME scaled to ``target`` (``scale_plan``), kept when it lands within ``TOLERANCE``.
      When the ranges cannot reach ``target`` no strategy lands; the one plan closest to it stands in
      (``aggressive``, every layer at its cap, above the reachable maximum; ``conservative`` below the minimum).
    - ``NAME/unscaled``: the paper's plan, kept only where its sparsity differs from ``target`` by more than
      ``TOLERANCE`` *and* a pick could use it: above the target (a sparser point, it may still win), or below it
      when ``below`` (a --max-drop search, where the sweep is the point). Below-target plans can never be picked
      by a sparsity target, and screening each costs as much as any other candidate.
    - A plan equal to an earlier one is dropped (``p50`` is ``balanced``): screening it again tells nothing.
    """
    out: dict[str, Plan] = {}

    def add(name: str, plan: Plan) -> None:
        if plan not in out.values():
            out[name] = plan

    raw = make_all_plans(layers)
    for name, plan in raw.items():
        scaled = scale_plan(plan, layers, target)
        if target - 1e-12 <= global_sparsity(scaled, layers) <= target + TOLERANCE:
            add(name, scaled)
    if not out:
        lo, hi = reachable(layers)
        name = "aggressive" if hi < target else "conservative"
        add(name, raw[name])
    for name, plan in raw.items():
        s = global_sparsity(plan, layers)
        if s > target + TOLERANCE or (below and s < target - TOLERANCE):
            add(name + UNSCALED, plan)
    return out

"""Pareto front and selection of the candidate to ship. Pure functions over (accuracy, cost) points."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import EdgepruneError


@dataclass(frozen=True)
class Point:
    accuracy: float
    sparsity: float  # higher is better (smaller artifact)


def pareto_mask(points: Sequence[Point]) -> list[bool]:
    """True for points no other point beats on both accuracy and sparsity (ties are not domination)."""
    out = []
    for p in points:
        dominated = any(
            q.accuracy >= p.accuracy
            and q.sparsity >= p.sparsity
            and (q.accuracy > p.accuracy or q.sparsity > p.sparsity)
            for q in points
        )
        out.append(not dominated)
    return out


def select_index(
    points: Sequence[Point],
    *,
    sparsity: float | None = None,
    max_drop: float | None = None,
    dense_accuracy: float | None = None,
) -> tuple[int, str]:
    """Pick one candidate; returns (index, why).

    - ``max_drop`` (points of accuracy): the sparsest candidate within ``max_drop`` of dense.
    - else ``sparsity``: the most accurate candidate with sparsity >= target; if none reaches it,
      the sparsest one (and the reason says so).
    """
    if not points:
        raise EdgepruneError("no candidates to select from")
    if max_drop is not None:
        if dense_accuracy is None:
            raise ValueError("max_drop needs dense_accuracy")
        ok = [i for i, p in enumerate(points) if (dense_accuracy - p.accuracy) * 100 <= max_drop + 1e-9]
        if ok:
            i = max(ok, key=lambda j: (points[j].sparsity, points[j].accuracy))
            return i, f"sparsest candidate within {max_drop:g} points of dense"
        i = max(range(len(points)), key=lambda j: points[j].accuracy)
        return i, f"no candidate within {max_drop:g} points of dense; picked the most accurate"
    target = 0.0 if sparsity is None else sparsity
    ok = [i for i, p in enumerate(points) if p.sparsity >= target - 1e-6]
    if ok:
        i = max(ok, key=lambda j: (points[j].accuracy, points[j].sparsity))
        return i, f"most accurate candidate with sparsity >= {target:.0%}"
    i = max(range(len(points)), key=lambda j: (points[j].sparsity, points[j].accuracy))
    return i, f"no candidate reached {target:.0%} sparsity; picked the sparsest"

"""The Pareto front over (accuracy, a higher-is-better second axis). Pure; imported by selection and the report's
plot alike, so neither reaches into the other."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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

"""From per-group ratios to concrete widths and the units to remove. Pure functions, no model.

Widths are rounded to the target's preferred channel multiple (``round_to``): a pruned group keeps a
multiple of ``round_to`` channels and never fewer than ``round_to`` (a group narrower than that, or
with no smaller multiple, is left alone). Head groups keep whole heads, at least one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import EdgepruneError
from .groups import ChannelGroup

Widths = dict[str, int]  # group name -> units kept


def allowed_keeps(g: ChannelGroup, round_to: int) -> list[int]:
    """Unit counts a group may keep: its full width, or any count whose channels are a multiple of
    ``round_to`` and at least ``round_to``."""
    if round_to < 1:
        raise EdgepruneError(f"round_to must be >= 1, got {round_to}")
    keeps = [k for k in range(1, g.units) if (k * g.unit_size) % round_to == 0 and k * g.unit_size >= round_to]
    return [*keeps, g.units]


def min_keep_units(g: ChannelGroup, round_to: int) -> int:
    return allowed_keeps(g, round_to)[0]


def max_ratio(g: ChannelGroup, round_to: int) -> float:
    """The largest fraction of units a group can lose."""
    return 1.0 - min_keep_units(g, round_to) / g.units


def keep_units(g: ChannelGroup, ratio: float, round_to: int) -> int:
    """Units kept when pruning ``ratio`` of the group: the allowed count nearest to (1 - ratio) * units
    (ties keep more)."""
    if not 0.0 <= ratio < 1.0:
        raise EdgepruneError(f"group {g.name}: pruning ratio {ratio:g} must be in [0, 1); a group cannot be removed")
    target = g.units * (1.0 - ratio)
    return min(allowed_keeps(g, round_to), key=lambda k: (abs(k - target), -k))


def widths_for(groups: list[ChannelGroup], ratios: Mapping[str, float], round_to: int) -> Widths:
    return {g.name: keep_units(g, ratios.get(g.name, 0.0), round_to) for g in groups}


def units_to_remove(
    groups: list[ChannelGroup], widths: Mapping[str, int], scores: Mapping[str, torch.Tensor]
) -> dict[str, list[int]]:
    """The lowest-scoring units of each group, so that ``widths[name]`` units remain."""
    out = {}
    for g in groups:
        n = g.units - widths.get(g.name, g.units)
        if n > 0:
            out[g.name] = sorted(torch.argsort(scores[g.name], stable=True)[:n].tolist())
    return out

"""Group-level sensitivity signals and the single-criterion global-threshold baselines (Phase 1).

The three signals mirror the paper's per-weight ones, scored per *unit* (channel or head) of a group
with torch-pruning's importance criteria over every layer the unit runs through:

- ``magnitude``: group L2 norm of the unit's weights (``GroupMagnitudeImportance(p=2)``, summed, sqrt);
- ``gradient``: first-order Taylor, sum of |w * dL/dw| over the group (``GroupTaylorImportance``), with
  dL/dw accumulated over calibration batches in eval mode;
- ``product``: magnitude x gradient, each divided by its group mean (both must be high to keep a unit).

A head's score is the mean of its channels' scores (as torch-pruning's MetaPruner does).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .groups import ChannelGroup, GroupGraph
from .planning import min_keep_units

GroupScores = dict[str, torch.Tensor]  # group name -> one score per unit (low = pruned first)


def _mean_normalized(t: torch.Tensor) -> torch.Tensor:
    mean = t.mean()
    return t / mean if mean > 0 else torch.ones_like(t)


def accumulate_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128) -> None:
    """Sum dL/dw over (x, y) into every parameter's ``.grad`` (eval mode: running BN statistics)."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    for i in range(0, len(x), batch_size):
        F.cross_entropy(model(x[i : i + batch_size]), y[i : i + batch_size], reduction="sum").backward()
    model.train(was_training)


def _per_unit(g: ChannelGroup, channel_scores: torch.Tensor) -> torch.Tensor:
    s = channel_scores.detach().float().flatten()
    if s.numel() != g.channels:
        raise RuntimeError(f"group {g.name}: {s.numel()} scores for {g.channels} channels")
    return s.view(g.units, g.unit_size).mean(1)


@torch.no_grad()
def group_scores(graph: GroupGraph, with_gradient: bool = True) -> dict[str, GroupScores]:
    """Scores of every unit of every group, per signal. ``with_gradient`` needs ``.grad`` filled
    (``accumulate_gradients``); without it only ``magnitude`` is returned."""
    magnitude_imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
    taylor_imp = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    out: dict[str, GroupScores] = {"magnitude": {}}
    if with_gradient:
        out["gradient"], out["product"] = {}, {}
    for g in graph.groups:
        full = graph.full_group(g.name)
        mag = _per_unit(g, magnitude_imp(full).clamp_min(0).sqrt())
        out["magnitude"][g.name] = mag
        if with_gradient:
            grad = _per_unit(g, taylor_imp(full))
            out["gradient"][g.name] = grad
            out["product"][g.name] = _mean_normalized(mag) * _mean_normalized(grad)
    return out


def global_threshold_ratios(
    groups: list[ChannelGroup], scores: Mapping[str, torch.Tensor], target: float, round_to: int
) -> dict[str, float]:
    """One global threshold over all groups' mean-normalized unit scores, lowest first, until ``target``
    of all channels is removed; no group goes below its minimum width. Returns each group's unit ratio."""
    cap = {g.name: g.units - min_keep_units(g, round_to) for g in groups}
    entries: list[tuple[float, str, int]] = []
    for g in groups:
        norm = _mean_normalized(scores[g.name])
        entries += [(float(v), g.name, g.unit_size) for v in norm]
    entries.sort(key=lambda e: e[0])
    goal = target * sum(g.channels for g in groups)
    removed = {g.name: 0 for g in groups}
    count = 0
    for _, name, size in entries:
        if count >= goal:
            break
        if removed[name] < cap[name]:
            removed[name] += 1
            count += size
    return {g.name: removed[g.name] / g.units for g in groups}

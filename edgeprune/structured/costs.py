"""Latency as a function of group widths, fitted to measurements, and a latency-aware allocation.

Latency is not proportional to MACs: a late stage's convolutions cost more per MAC than an early one's
(smaller images, less work per call), a depthwise layer costs little per MAC, an attention block's
matmuls are not in the MAC count at all. The model here:

    ms(widths) = dense_ms - scale * sum over conv/linear layers l of ms_l * (1 - prod_{g in G_l} kept_g)

where ``G_l`` are the groups whose channels layer ``l``'s MACs scale with (its input and output
groups), ``kept_g`` the fraction of group ``g`` kept, and ``ms_l`` the layer's MACs times a ms-per-MAC
rate measured per group: each group narrowed alone, timed next to dense. The product term is what a
sum of per-group savings misses: a convolution between two narrowed groups shrinks once, not twice.
``scale`` then matches the narrowest model (every group narrowed at once), timed the same way.

``latency_allocation`` is a Mix-and-Match strategy that looks at latency: inside each group's ratio range
it removes, round_to-block by block, the units with the least score per millisecond saved (the saving
recomputed as widths change), until the model says the goal is reached.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .groups import ROOT_TYPES, ChannelGroup
from .planning import Widths, allowed_keeps, keep_units
from .signals import mean_normalized

LayerMacs = dict[str, float]  # conv/linear layer name -> MACs for one input


@torch.no_grad()
def layer_macs(model: nn.Module, example: torch.Tensor) -> LayerMacs:
    """MACs of every conv/linear layer for one input (output elements x inputs per output element)."""
    out: LayerMacs = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, ROOT_TYPES):
            fan_in = m.in_features if isinstance(m, nn.Linear) else m.weight[0].numel()

            def hook(mod, args, y, name=name, fan_in=fan_in):
                out[name] = out.get(name, 0.0) + y[:1].numel() * fan_in

            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        model(example[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return out


@dataclass(frozen=True)
class LatencyModel:
    """Predicted latency from the kept fraction of each group (see the module docstring)."""

    dense_ms: float
    layers: tuple[tuple[float, tuple[str, ...]], ...]  # (ms attributable to the layer at dense, its groups)
    scale: float = 1.0

    def saving(self, kept: Mapping[str, float]) -> float:
        total = 0.0
        for ms, gs in self.layers:
            f = 1.0
            for g in gs:
                f *= kept.get(g, 1.0)
            total += ms * (1.0 - f)
        return self.scale * total

    def ms(self, kept: Mapping[str, float]) -> float:
        return self.dense_ms - self.saving(kept)


def fit_latency_model(
    dense_macs: LayerMacs,
    narrowed_macs: Mapping[str, LayerMacs],
    dense_ms: float,
    narrowed_ms: Mapping[str, float],
    floor_rate: float,
) -> LatencyModel:
    """Fit the model to dense and each group narrowed alone (its layers' MACs ``narrowed_macs[g]``, its
    latency ``narrowed_ms[g]``). A layer belongs to the groups whose narrowing shrank its MACs; a group's
    ms-per-MAC is its measured saving over the MACs it removed, at least ``floor_rate`` (noise must not
    make a group free); a layer's rate is the mean of its groups'."""
    touches: dict[str, list[str]] = {name: [] for name in dense_macs}
    rate: dict[str, float] = {}
    for g, macs in narrowed_macs.items():
        removed = 0.0
        for name, m in dense_macs.items():
            if macs.get(name, 0.0) < m * (1.0 - 1e-9):
                touches[name].append(g)
                removed += m - macs.get(name, 0.0)
        if removed > 0:
            rate[g] = max((dense_ms - narrowed_ms[g]) / removed, floor_rate)
    layers = []
    for name, gs in touches.items():
        gs = [g for g in gs if g in rate]
        if gs:
            layers.append((dense_macs[name] * sum(rate[g] for g in gs) / len(gs), tuple(gs)))
    return LatencyModel(dense_ms, tuple(layers))


def calibrated(model: LatencyModel, kept: Mapping[str, float], measured_ms: float) -> LatencyModel:
    """The model scaled so that it predicts ``measured_ms`` at ``kept`` (e.g. the narrowest model)."""
    predicted = model.saving(kept) / model.scale
    if predicted <= 0 or measured_ms >= model.dense_ms:
        return model
    return LatencyModel(model.dense_ms, model.layers, (model.dense_ms - measured_ms) / predicted)


def latency_allocation(
    groups: list[ChannelGroup],
    scores: Mapping[str, torch.Tensor],
    model: LatencyModel,
    goal_ms: float,
    ranges: Mapping[str, tuple[float, float]],
    round_to: int,
) -> Widths:
    """Start every group at the low end of its ratio range (``ranges``: Phase 1's, clipped by the rules),
    then narrow groups one allowed width at a time, each time taking the step whose removed units have the
    least mean-normalized score per millisecond it saves, until ``model`` predicts ``goal_ms`` or every
    group is at the high end of its range. Returns the widths; the units follow from the scores."""
    order = {g.name: torch.sort(mean_normalized(scores[g.name].float())).values for g in groups}
    widths, keeps = {}, {}
    for g in groups:
        lo, hi = ranges.get(g.name, (0.0, 0.0))
        widths[g.name] = keep_units(g, lo, round_to)
        keeps[g.name] = [k for k in allowed_keeps(g, round_to) if k >= g.units * (1.0 - hi) - 1e-9]

    def kept(w: Mapping[str, int]) -> dict[str, float]:
        return {g.name: w[g.name] / g.units for g in groups}

    ms = model.ms(kept(widths))
    while ms > goal_ms:
        best = None
        for g in groups:
            smaller = [k for k in keeps[g.name] if k < widths[g.name]]
            if not smaller:
                continue
            k = smaller[-1]
            trial = {**widths, g.name: k}
            saved = ms - model.ms(kept(trial))
            lost = float(order[g.name][g.units - widths[g.name] : g.units - k].sum())
            if saved > 0 and (best is None or lost / saved < best[0]):
                best = (lost / saved, g.name, k)
        if best is None:
            break
        widths[best[1]] = best[2]
        ms = model.ms(kept(widths))
    return widths

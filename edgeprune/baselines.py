"""Single-criterion baselines. Each turns per-weight scores (or layer shapes) into a *plan*:
``{layer name: sparsity}`` plus the scores used to pick which weights to mask.

Global-threshold methods (MAG, SNIP, GraSP, LAMP) rank all prunable weights together and prune the lowest
``sparsity`` fraction; the per-layer sparsity they leave behind is what Phase 1 of Mix-and-Match records.
Layer-wise allocators (ERK, uniform, random) fix each layer's sparsity from its shape alone.

All functions are pure: tensors and dicts in, dicts out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .inventory import Layer
from .sensitivity import Sensitivity

Plan = dict[str, float]
Scores = dict[str, torch.Tensor]


def at_least(sparsity: float, n: int) -> int:
    """The fewest of ``n`` weights to zero for a sparsity of at least ``sparsity``.

    Not round(): half a weight below the target is below it, and selection (``sparsity >= target``) would drop
    a baseline candidate that zeroed round(0.8 * N) weights when 0.8 * N ends in .4. The 1e-6 absorbs float
    noise in the product (0.8 * 20 is 16.000000000000004)."""
    return min(n, max(0, math.ceil(sparsity * n - 1e-6)))


def whole_counts(plan: Plan, numel: dict[str, int], sparsity: float) -> Plan:
    """A layer-wise allocation in whole weights: each layer's count rounded down, then the remaining weights
    of ``at_least(sparsity, N)`` to the layers with the largest remainders; masks then hit the target exactly."""
    exact = {n: min(numel[n], plan[n] * numel[n]) for n in plan}
    counts = {n: math.floor(v + 1e-9) for n, v in exact.items()}
    deficit = at_least(sparsity, sum(numel.values())) - sum(counts.values())
    for n in sorted(exact, key=lambda n: counts[n] - exact[n])[: max(0, deficit)]:
        counts[n] = min(numel[n], counts[n] + 1)
    return {n: counts[n] / numel[n] for n in plan}


def global_threshold_plan(scores: Scores, sparsity: float) -> Plan:
    """Prune exactly at_least(sparsity, N) lowest-scoring weights across all layers; return per-layer sparsity."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().float() for n in names])
    k = at_least(sparsity, flat.numel())
    owner = torch.cat([torch.full((scores[n].numel(),), i, dtype=torch.long) for i, n in enumerate(names)])
    if k == 0:
        return dict.fromkeys(names, 0.0)
    lowest = torch.topk(flat, k, largest=False, sorted=False).indices
    counts = torch.bincount(owner[lowest], minlength=len(names))
    return {n: counts[i].item() / scores[n].numel() for i, n in enumerate(names)}


def lamp_scores(weights: dict[str, torch.Tensor]) -> Scores:
    """LAMP (Lee et al. 2021): w_i^2 / sum of w_j^2 over the weights of the layer at least as large as w_i."""
    out = {}
    for name, w in weights.items():
        sq = w.detach().flatten().float() ** 2
        sorted_sq, order = torch.sort(sq)  # ascending
        tail = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])  # sum of >= current
        score = torch.empty_like(sq)
        score[order] = sorted_sq / tail.clamp_min(1e-12)
        out[name] = score.view_as(w)
    return out


def erk_plan(layers: list[Layer], sparsity: float) -> Plan:
    """Erdős–Rényi-Kernel allocation: density_l ∝ sum(shape)/prod(shape), scaled to the global target."""
    numel = {layer.name: layer.numel for layer in layers}
    raw = {layer.name: sum(layer.shape) / layer.numel for layer in layers}
    budget = (1.0 - sparsity) * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in numel if n not in dense]
        remaining = budget - sum(numel[n] for n in dense)
        scale = remaining / max(1e-12, sum(raw[n] * numel[n] for n in free))
        over = [n for n in free if raw[n] * scale > 1.0]
        if not over:
            break
        dense.update(over)
    return {n: 0.0 if n in dense else max(0.0, 1.0 - raw[n] * scale) for n in numel}


def uniform_plan(layers: list[Layer], sparsity: float) -> Plan:
    return {layer.name: sparsity for layer in layers}


@dataclass(frozen=True)
class Baseline:
    """A baseline method: which per-weight scores it ranks by, and how it allocates sparsity per layer."""

    name: str
    scores: Callable[[list[Layer], Sensitivity | None, int], Scores]
    allocate: str  # "global" (one threshold over `scores`) or "erk" / "uniform" (from shapes)
    needs: str = "weights"  # "weights" | "gradient" | "hessian"
    # The Mix-and-Match signal that orders each layer's weights exactly as `scores` does (None: none does).
    # A Mix-and-Match candidate with this baseline's plan and that signal is the baseline run itself.
    ranks_like: str | None = None

    def own_ranking(self, signals: tuple[str, ...]) -> str:
        """The ranking under which a Mix-and-Match candidate with this baseline's plan is this baseline's own run
        (``<ranking>/baseline:<name>``): the signal that ranks as it does when the search has it, else its own."""
        return self.ranks_like if self.ranks_like in signals else self.name

    def plan(self, layers: list[Layer], sens: Sensitivity | None, sparsity: float, seed: int = 0) -> Plan:
        if self.allocate == "global":
            return global_threshold_plan(self.scores(layers, sens, seed), sparsity)
        plan = erk_plan(layers, sparsity) if self.allocate == "erk" else uniform_plan(layers, sparsity)
        return whole_counts(plan, {layer.name: layer.numel for layer in layers}, sparsity)


def _magnitude(layers: list[Layer], sens: Sensitivity | None, seed: int) -> Scores:
    return {layer.name: layer.weight.detach().abs() for layer in layers}


def _snip(layers: list[Layer], sens: Sensitivity | None, seed: int) -> Scores:
    assert sens is not None
    return {layer.name: (layer.weight.detach() * sens.abs_grad[layer.name]).abs() for layer in layers}


def _grasp(layers: list[Layer], sens: Sensitivity | None, seed: int) -> Scores:
    # GraSP removes the weights with the largest -w·Hg, i.e. keeps the largest w·Hg.
    assert sens is not None and sens.hess_grad is not None
    return {layer.name: layer.weight.detach() * sens.hess_grad[layer.name] for layer in layers}


def _lamp(layers: list[Layer], sens: Sensitivity | None, seed: int) -> Scores:
    return lamp_scores({layer.name: layer.weight for layer in layers})


def _random(layers: list[Layer], sens: Sensitivity | None, seed: int) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    return {layer.name: torch.rand(layer.shape, generator=gen) for layer in layers}


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline("mag", _magnitude, "global", ranks_like="magnitude"),
        Baseline("snip", _snip, "global", needs="gradient"),
        Baseline("grasp", _grasp, "global", needs="hessian"),
        # LAMP's score is monotone in |w| inside a layer but float ties can order differently: its own scores.
        Baseline("lamp", _lamp, "global"),
        Baseline("erk", _magnitude, "erk", ranks_like="magnitude"),
        Baseline("uniform", _magnitude, "uniform", ranks_like="magnitude"),
        Baseline("random", _random, "uniform"),
    )
}

# Phase 1 of Mix-and-Match: the single-criterion runs whose per-layer sparsities give the ranges, and whose own
# plans at the target join the candidates. The paper used MAG, SNIP and GraSP; LAMP and ERK are the allocations
# that beat it on the CNNs (paper_notes.md §0), so a search without them could not contain its best baseline.
RANGE_BASELINES: tuple[str, ...] = ("mag", "snip", "grasp", "lamp", "erk")

"""Layer-wise masking: rank the weights of each layer by a score and zero the lowest fraction.

The seam is the same as torch.ao.pruning's BaseSparsifier: *computing* a mask (``layer_mask``, pure) is
separate from *applying* it — either once, in place (screening), or as a parametrization that re-applies it
after every optimizer step (fine-tuning), folded back into the plain weight before export (``squash_masks``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .baselines import Plan, Scores

Masks = dict[str, torch.Tensor]  # layer name -> bool tensor, True = keep


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that zeros exactly round(sparsity * n) lowest-scoring entries (ties broken by position)."""
    n = scores.numel()
    k = int(round(sparsity * n))
    keep = torch.ones(n, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(scores.detach().flatten().float(), k, largest=False, sorted=False).indices] = False
    return keep.view_as(scores)


def build_masks(scores: Scores, plan: Plan) -> Masks:
    return {name: layer_mask(scores[name], rho) for name, rho in plan.items()}


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Masks) -> None:
    """Zero the masked weights in place (for zero-shot screening; nothing stops later updates). Masks are
    built on the CPU; each is moved to its weight's device (screening may run on ``--device``)."""
    for name, keep in masks.items():
        weight = model.get_submodule(name).weight
        weight.mul_(keep.to(device=weight.device, dtype=weight.dtype))


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask``: masked weights stay zero through any number of updates."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", keep.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.keep


def attach_masks(model: nn.Module, masks: Masks) -> None:
    for name, keep in masks.items():
        parametrize.register_parametrization(model.get_submodule(name), "weight", WeightMask(keep))


def squash_masks(model: nn.Module) -> None:
    """Fold every WeightMask into its plain weight tensor (what export and `torch.save` should see)."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

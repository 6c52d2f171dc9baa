"""Evaluation: accuracy, exact sparsity, parameters and MACs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .inventory import Layer


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(1, len(x))


@dataclass
class SparsityCount:
    zeros: int
    total: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def weight_sparsity(model: nn.Module, layers: list[Layer]) -> tuple[SparsityCount, dict[str, float]]:
    """Global (zeros / prunable weights, biases excluded) and per-layer sparsity, counted from the weights."""
    zeros = total = 0
    per_layer = {}
    for layer in layers:
        if not layer.prunable:
            continue
        w = model.get_submodule(layer.name).weight
        z = int((w == 0).sum().item())
        zeros += z
        total += w.numel()
        per_layer[layer.name] = z / w.numel()
    return SparsityCount(zeros, total), per_layer


def params_and_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Dense parameter count and MACs for one input, from torch-pruning's counter."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example[:1])
    return int(params), int(macs)

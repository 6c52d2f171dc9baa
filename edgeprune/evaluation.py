"""Evaluation: accuracy, exact sparsity, parameters and MACs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .inventory import Layer


def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256, channels_last: bool | None = None
) -> float:
    """Top-1 accuracy in eval mode, on the device the model's parameters are on (`right_answers`' mean)."""
    return float(right_answers(model, x, y, batch_size, channels_last).mean()) if len(x) else 0.0


def accuracy_and_loglik(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> tuple[float, float]:
    """Top-1 accuracy and the mean log-probability of the right class, in one pass (`per_image`).

    Recorded beside top-1 after recovery as a diagnostic, not a ranking: ranking recovered plans by it (less
    sampling noise than top-1) was measured worse on test than top-1 on the reference models (it prefers the
    better-calibrated plan, not the more accurate one: benchmarks/results/paper_protocol_loglik_pick/)."""
    if not len(x):
        return 0.0, 0.0
    right, logp = per_image(model, x, y, batch_size)
    return float(right.mean()), float(logp.mean())


def right_answers(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256, channels_last: bool | None = None
) -> np.ndarray:
    """Per image, whether the model's top-1 answer is right (a bool array; screening pairs candidates on it)."""
    return per_image(model, x, y, batch_size, channels_last)[0]


def per_image(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256, channels_last: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per image, whether the model's top-1 answer is right (bool) and the log-probability of the right class.

    For conv nets the channels-last layout (oneDNN's native one: no reorder around every convolution)
    and batches of 256: ~2.1x on a 4 M-parameter MobileNetV3 at 64 px on 2 CPU cores, same counts.
    ``channels_last``: None picks it for a model with 2-D convolutions on 4-D input; a forward that cannot
    take it (a ``view`` of a conv output) runs in the contiguous layout. The model leaves in the layout
    and training mode it came in. ``no_grad``, not ``inference_mode``: modules that cache a tensor in an
    eval forward (timm's LeViT / EfficientViT attention biases) must not hand an inference tensor to a
    later gradient pass, and layout conversions happen outside it so parameters stay ordinary tensors.
    """
    was_training = model.training
    model.eval()
    use_cl = _wants_channels_last(model, x) if channels_last is None else channels_last
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_contiguous = bool(convs) and convs[0].is_contiguous()
    try:
        if not use_cl:
            return _answers(model, x, y, batch_size, torch.contiguous_format)
        model.to(memory_format=torch.channels_last)
        try:
            return _answers(model, x, y, batch_size, torch.channels_last)
        except RuntimeError:
            # e.g. ``.view`` on a conv output needs contiguous strides: this model runs in its own layout
            model.to(memory_format=torch.contiguous_format)
            return _answers(model, x, y, batch_size, torch.contiguous_format)
    finally:
        if use_cl and was_contiguous:
            model.to(memory_format=torch.contiguous_format)
        model.train(was_training)


def _wants_channels_last(model: nn.Module, x: torch.Tensor) -> bool:
    return x.dim() == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules())


@torch.no_grad()
def _answers(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, layout: torch.memory_format
) -> tuple[np.ndarray, np.ndarray]:
    device = next(model.parameters(), torch.empty(0)).device
    right, logp = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device).contiguous(memory_format=layout)
        yb = y[i : i + batch_size].to(device)
        out = model(xb).float()
        right.append((out.argmax(1) == yb).cpu().numpy())
        logp.append(torch.log_softmax(out, 1).gather(1, yb[:, None])[:, 0].cpu().numpy())
    if not right:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.float32)
    return np.concatenate(right), np.concatenate(logp)


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

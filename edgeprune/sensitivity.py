"""Sensitivity signals: how much each weight matters, computed once per run and reused by every strategy.

- ``magnitude``: |w|
- ``gradient``: |dL/dw| accumulated over the calibration batches, normalized per output filter and per
  input channel (``filter_normalized``), then by its layer mean so that layers are comparable
- ``product``: |w| * normalized |dL/dw|

Why per filter and channel, not only per layer: a weight's gradient is a sum of (output gradient x input
activation), so |g| is set mostly by how active its filter and its input channel are. Ranked raw, the
low-|g| weights cluster in whole filters/channels and masking removes them outright (measured on the demo
ResNet at MAG's 80 % plan: 100 of 730 filters emptied vs 27 by magnitude). Dividing out the filter and
channel levels keeps the within-filter information; product at 90 % went from 32.9 to 74.0 % accuracy
(benchmarks/results/paper_notes.md §1).

GraSP's Hessian-gradient product (for the GraSP baseline) is computed here too, since it needs the same
calibration batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .inventory import Layer

SIGNALS: tuple[str, ...] = ("magnitude", "gradient", "product")


@dataclass
class Sensitivity:
    """Per-layer raw material for every score: |grad| (accumulated) and, optionally, GraSP's H·g."""

    abs_grad: dict[str, torch.Tensor]
    hess_grad: dict[str, torch.Tensor] | None = None


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


def compute_sensitivity(
    model: nn.Module,
    layers: list[Layer],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 128,
    with_hessian: bool = True,
) -> Sensitivity:
    """Accumulate |dL/dw| over (x, y); with ``with_hessian`` also GraSP's H·g (one double-backward pass).

    The model is run in eval mode (BatchNorm uses its running statistics, dropout is off) so the
    gradients describe the trained model, not a training-mode variant of it.
    """
    prunable = [layer for layer in layers if layer.prunable]
    params = [layer.weight for layer in prunable]
    was_training = model.training
    model.eval()
    abs_grad = [torch.zeros_like(p) for p in params]
    grad_sum = [torch.zeros_like(p) for p in params]
    for xb, yb in _batches(x, y, batch_size):
        loss = F.cross_entropy(model(xb), yb)
        grads = torch.autograd.grad(loss, params)
        for acc, tot, g in zip(abs_grad, grad_sum, grads):
            acc += g.abs()
            tot += g
    hess_grad = None
    if with_hessian:
        g_fixed = [g.detach() for g in grad_sum]
        try:
            hg = _hessian_grad_exact(model, params, g_fixed, x, y, batch_size)
        except RuntimeError:
            # Some activations (e.g. hardsigmoid in MobileNetV3) have no double backward: use a finite difference.
            hg = _hessian_grad_fd(model, params, g_fixed, grad_sum, x, y, batch_size)
        hess_grad = {layer.name: h for layer, h in zip(prunable, hg)}
    model.train(was_training)
    return Sensitivity(abs_grad={layer.name: g for layer, g in zip(prunable, abs_grad)}, hess_grad=hess_grad)


def _hessian_grad_exact(model, params, g_fixed, x, y, batch_size) -> list[torch.Tensor]:
    """GraSP's H·g as the gradient of (g_fixed · g(w)): one double-backward pass per batch."""
    hg = [torch.zeros_like(p) for p in params]
    for xb, yb in _batches(x, y, batch_size):
        # Fused attention kernels have no double-backward on CPU; the math kernel does.
        with sdpa_kernel(SDPBackend.MATH):
            loss = F.cross_entropy(model(xb), yb)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * gf).sum() for g, gf in zip(grads, g_fixed))
        for acc, h in zip(hg, torch.autograd.grad(dot, params)):
            acc += h.detach()
    return hg


def _hessian_grad_fd(model, params, g_fixed, grad_sum, x, y, batch_size, rel_step: float = 1e-4) -> list[torch.Tensor]:
    """H·g ≈ (∇L(w + εg) − ∇L(w)) / ε with first-order gradients only; ε scaled to a small relative step."""
    norm = torch.sqrt(sum((g * g).sum() for g in g_fixed)).item()
    w_norm = torch.sqrt(sum((p.detach() * p.detach()).sum() for p in params)).item()
    eps = rel_step * w_norm / max(norm, 1e-12)
    with torch.no_grad():
        for p, g in zip(params, g_fixed):
            p.add_(g, alpha=eps)
    try:
        shifted = [torch.zeros_like(p) for p in params]
        for xb, yb in _batches(x, y, batch_size):
            for acc, g in zip(shifted, torch.autograd.grad(F.cross_entropy(model(xb), yb), params)):
                acc += g
    finally:
        with torch.no_grad():
            for p, g in zip(params, g_fixed):
                p.sub_(g, alpha=eps)
    return [(s - g0) / eps for s, g0 in zip(shifted, grad_sum)]


def normalized(t: torch.Tensor) -> torch.Tensor:
    """Divide by the layer mean so scores of different layers are comparable."""
    mean = t.mean()
    return t / mean if mean > 0 else t


def filter_normalized(g: torch.Tensor) -> torch.Tensor:
    """|g| over what its output filter and input channel predict: g[o, i, ...] * mean / (mean_o * mean_i).

    ``mean_o`` and ``mean_i`` are the mean |g| of filter o and of input channel i (the product of the two over
    the layer mean is the level an independent filter and channel factor would give). Tensors with fewer
    than two dimensions are returned as they are.
    """
    if g.dim() < 2:
        return g
    dims = tuple(range(g.dim()))
    per_out = g.mean(dim=dims[1:], keepdim=True)
    per_in = g.mean(dim=(0, *dims[2:]), keepdim=True)
    mean = g.mean()
    if mean <= 0:
        return g
    tiny = torch.finfo(g.dtype).tiny
    return g * mean / (per_out.clamp_min(tiny) * per_in.clamp_min(tiny))


def signal_scores(signal: str, weight: torch.Tensor, abs_grad: torch.Tensor | None) -> torch.Tensor:
    """Importance of each weight of one layer: low scores are pruned first."""
    w = weight.detach().abs()
    if signal == "magnitude":
        return w
    if abs_grad is None:
        raise ValueError(f"signal '{signal}' needs gradients")
    g = normalized(filter_normalized(abs_grad))
    if signal == "gradient":
        return g
    if signal == "product":
        return w * g
    raise ValueError(f"unknown signal '{signal}'; choose from {', '.join(SIGNALS)}")

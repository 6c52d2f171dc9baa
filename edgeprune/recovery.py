"""Recovery after masking: BatchNorm re-calibration (seconds) and masked fine-tuning (minutes).

Pruning shifts the activation statistics that BatchNorm's running mean/var were trained on; recomputing
them on a few calibration batches recovers most of the zero-shot loss on CNNs. Fine-tuning then trains the
surviving weights with the masks enforced as parametrizations (`masking.attach_masks`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .evaluation import accuracy
from .masking import Masks, attach_masks, squash_masks

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, BN_TYPES) for m in model.modules())


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 128, max_batches: int = 8) -> None:
    """Recompute BatchNorm running statistics as an exact average over up to ``max_batches`` batches."""
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    if not bns:
        return
    was_training = model.training
    model.eval()
    saved_momentum = []
    for bn in bns:
        bn.reset_running_stats()
        saved_momentum.append(bn.momentum)
        bn.momentum = None  # cumulative moving average = exact mean over the batches seen
        bn.train()
    for b, i in enumerate(range(0, len(x), batch_size)):
        if b >= max_batches:
            break
        model(x[i : i + batch_size])
    for bn, momentum in zip(bns, saved_momentum):
        bn.momentum = momentum
    model.train(was_training)
    model.eval()


@dataclass
class FinetuneResult:
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    history: list[float]  # validation accuracy after each epoch


def finetune(
    model: nn.Module,
    masks: Masks,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 5,
    lr: float = 1e-4,
    batch_size: int = 128,
    patience: int = 3,
    val_fraction: float = 0.1,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Fine-tune in place with masks enforced (paper: Adam, early stopping). Keeps the best epoch's weights.

    ``x, y`` are the user's calibration data; ``val_fraction`` of it is held out for early stopping.
    On return the masks are folded into the weights (no parametrizations remain).
    """
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    n_val = max(1, int(len(x) * val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    xv, yv = x[val_idx], y[val_idx]
    attach_masks(model, masks)
    try:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        best = (accuracy(model, xv, yv), -1, copy.deepcopy(model.state_dict()))
        history: list[float] = []
        stale = 0
        for epoch in range(epochs):
            model.train()
            perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
            for i in range(0, len(perm), batch_size):
                idx = perm[i : i + batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on a single sample
                    continue
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
            val = accuracy(model, xv, yv)
            history.append(val)
            if on_epoch:
                on_epoch(epoch, val)
            if val > best[0]:
                best, stale = (val, epoch, copy.deepcopy(model.state_dict())), 0
            else:
                stale += 1
                if stale >= patience:
                    break
        model.load_state_dict(best[2])
    finally:
        squash_masks(model)
        model.eval()
    return FinetuneResult(len(history), best[1], best[0], history)

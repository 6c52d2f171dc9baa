"""Recovery after masking: BatchNorm re-calibration (seconds) and masked fine-tuning (minutes).

Pruning shifts the activation statistics that BatchNorm's running mean/var were trained on; recomputing
them on a few calibration batches recovers most of the zero-shot loss on CNNs. Fine-tuning then trains the
surviving weights with the masks enforced as parametrizations (`masking.attach_masks`).

Fine-tuning recipes (`RECIPES`, data like the rules): ``paper`` is the paper's (Adam at a constant rate,
cross-entropy); ``distill`` also learns from the dense model's logits on the very view the student sees
(knowledge distillation, the dense model run on each shifted batch), translates inputs by a few pixels and
anneals the rate (one-cycle); ``distill-once`` uses logits of the unshifted images computed once
(`teacher_logits`). Channel pruning removes capacity that the paper's short recipe does not win back;
distillation does most of it. The batch (`finetune_batch`) is sized for enough optimizer steps per epoch.

Fine-tuning trains on the calibration split and stops early on the selection split (`finetune(val=...)`);
its result says how many optimizer steps it took and whether it beat the start weights at all.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import EdgepruneError
from .evaluation import accuracy_and_loglik
from .masking import Masks, attach_masks, squash_masks

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """The torch device for the forward-heavy stages: ``cpu``, ``cuda`` (must be visible) or ``auto`` (cuda
    when visible).

    Screening (the dense and every candidate's evaluation), BN re-calibration and recovery (fine-tuning, the
    teacher's logits) move there, each returning the model where it was; sensitivity signals, the sealed test
    split's figures and export stay on the CPU, where the exported model will run.
    """
    if name not in DEVICES:
        raise EdgepruneError(f"unknown --device '{name}'; choose from {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EdgepruneError("--device cuda: torch sees no CUDA GPU (CPU-only wheel or no driver); use --device cpu")
    return torch.device(name)


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device | str | None) -> Iterator[torch.device]:
    """Run a block with ``model`` on ``device`` (None: where it is) and put it back where it was after."""
    home = next(model.parameters(), torch.empty(0)).device
    dev = torch.device(device) if device is not None else home
    if dev == home:
        yield dev
        return
    model.to(dev)
    try:
        yield dev
    finally:
        model.to(home)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, BN_TYPES) for m in model.modules())


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, x: torch.Tensor, batch_size: int = 128, max_batches: int = 8, device: torch.device | None = None
) -> None:
    """Recompute BatchNorm running statistics as an exact average over up to ``max_batches`` batches."""
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    if not bns:
        return
    x = x[: batch_size * max_batches]
    # Training-mode BatchNorm needs 2+ values per channel: one image whose features shrink to 1x1 (or a last
    # batch of one) fails deep inside torch, after the statistics were reset. Refuse before touching them.
    if len(x) < 2:
        raise EdgepruneError(
            f"BatchNorm re-calibration needs at least 2 calibration images, got {len(x)}; "
            "raise --calib-size or pass --no-bn-recal"
        )
    with on_device(model, device) as dev:
        _recalibrate(model, bns, x.to(dev), max(2, batch_size))


def _recalibrate(model: nn.Module, bns: list[nn.Module], x: torch.Tensor, batch_size: int) -> None:
    # Contiguous layout, unlike `accuracy`: training-mode BatchNorm on channels-last input accumulates its
    # statistics ~100x less exactly on this CPU (max relative error against float64 1.2e-4 vs 9e-7 on the
    # demo ResNet) for at most 1.3x (0.9x-1.36x measured on 2 loaded cores), so it is not worth the drift.
    was_training = model.training
    model.eval()
    saved_momentum = []
    for bn in bns:
        bn.reset_running_stats()
        saved_momentum.append(bn.momentum)
        bn.momentum = None  # cumulative moving average = exact mean over the batches seen
        bn.train()
    starts = list(range(0, len(x), batch_size))
    if len(x) - starts[-1] == 1 and len(starts) > 1:
        starts.pop()  # a last batch of one image joins the one before (see recalibrate_bn)
    for i, j in zip(starts, [*starts[1:], len(x)]):
        model(x[i:j])
    for bn, momentum in zip(bns, saved_momentum):
        bn.momentum = momentum
    model.train(was_training)
    model.eval()


@dataclass(frozen=True)
class Recipe:
    """How fine-tuning trains."""

    name: str
    distill: float = 0.0  # weight of the KL term to the dense model's softened logits (0: cross-entropy only)
    temperature: float = 4.0  # softening of both logit sets in the KL term
    shift: float = 0.0  # random translation, up to this fraction of the image side (zero fill)
    schedule: str = "constant"  # "constant" or "onecycle" (warm-up 10 %, cosine annealing to ~0)
    # True: the dense model labels the very view the student sees (its logits on each shifted batch, one extra
    # forward pass a step); False: its logits on the unshifted images, computed once (`teacher_logits`).
    consistent: bool = False
    description: str = field(default="", compare=False)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("paper", description="Adam at a constant rate, cross-entropy (the paper's)"),
        # The dense model labels the very view the student trains on ("consistent" teaching, Beyer et al. 2022):
        # on the demo, +0.2 to +1.2 points over logits of the unshifted images at every level and batch measured,
        # and the only recipe that does not lose to no fine-tuning at all on a lightly pruned model
        # (benchmarks/results/recovery_recipes_demo.md), for one extra forward pass a step.
        Recipe(
            "distill",
            distill=0.7,
            shift=1 / 14,
            schedule="onecycle",
            consistent=True,
            description="distillation from the dense model (weight 0.7, T 4) on the same ±7 %-shifted view the "
            "student sees, one-cycle Adam",
        ),
        Recipe(
            "distill-once",
            distill=0.7,
            shift=1 / 14,
            schedule="onecycle",
            description="distill with the dense model's logits of the unshifted images, computed once (cheaper; "
            "the default before 2026-12-07)",
        ),
    )
}


@torch.no_grad()
def teacher_logits(
    model: nn.Module, x: torch.Tensor, batch_size: int = 256, device: torch.device | None = None
) -> torch.Tensor:
    """The dense model's logits on the calibration images (on the CPU), computed once and shared by every
    candidate."""
    was_training = model.training
    model.eval()
    with on_device(model, device) as dev:
        out = torch.cat([model(x[i : i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def teacher_logits_if_distilling(
    recipe: Recipe, model: nn.Module, x: torch.Tensor, batch_size: int = 256, device: torch.device | None = None
) -> torch.Tensor | None:
    """`teacher_logits` when ``recipe`` distills from fixed logits, else None (no forward pass; a consistent
    recipe labels each view during training instead)."""
    return teacher_logits(model, x, batch_size, device) if recipe.distill > 0 and not recipe.consistent else None


def random_shift(x: torch.Tensor, max_fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Translate a batch by one random offset of up to ``max_fraction`` of its side, zero filled."""
    h, w = x.shape[-2:]
    mh, mw = int(round(h * max_fraction)), int(round(w * max_fraction))
    if mh == 0 and mw == 0:
        return x
    dy, dx = (int(torch.randint(-m, m + 1, (1,), generator=gen)) for m in (mh, mw))
    padded = F.pad(x, (mw, mw, mh, mh))
    return padded[..., mh - dy : mh - dy + h, mw - dx : mw - dx + w]


def recovery_loss(logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None, recipe: Recipe) -> torch.Tensor:
    """Cross-entropy, mixed with the distillation term (Hinton et al.: KL at temperature T, scaled by T²)."""
    ce = F.cross_entropy(logits, y)
    if teacher is None or recipe.distill <= 0:
        return ce
    t = recipe.temperature
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True)
    return (1 - recipe.distill) * ce + recipe.distill * kl * t * t


# The paper's fine-tuning rates (Adam): transformers take a smaller step than CNNs.
PAPER_LR: dict[str, float] = {"cnn": 1e-4, "transformer": 5e-5}
# Sub-modules that mark self-attention, beside torch's MultiheadAttention: timm's Attention and Swin's
# WindowAttention (qkv), Hugging Face's (query, key, value), EVA-style and others (q_proj, k_proj, v_proj).
ATTENTION_PROJECTIONS: tuple[tuple[str, ...], ...] = (
    ("qkv",),
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
)


def is_attention(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return True
    return any(
        all(isinstance(getattr(module, name, None), nn.Module) for name in names) for names in ATTENTION_PROJECTIONS
    )


def model_kind(model: nn.Module) -> str:
    """'transformer' when any module is self-attention (hybrids included), else 'cnn': a key of PAPER_LR."""
    return "transformer" if any(is_attention(m) for m in model.modules()) else "cnn"


# Compaction (channel mode) removes whole channels and heads, and no one rate suits every model: the paper's
# masked-fine-tuning rate barely moves a depthwise MobileNetV3 at 1.5x (23 % test; 72.7 % at 3e-3) while
# ResNet-18 at 1.5x recovers better at it (88.0 vs 86.7 %; benchmarks/results/channel_goals.md). So channel
# mode races both and keeps, per candidate, the one the selection split prefers. Transformers: half the CNN rate.
COMPACTED_LR: dict[str, float] = {"cnn": 3e-3, "transformer": 1.5e-3}


def default_lr(model: nn.Module) -> float:
    """The paper's fine-tuning rate for `model`: 1e-4 for CNNs, 5e-5 for transformers."""
    return PAPER_LR[model_kind(model)]


def default_lrs(model: nn.Module, compacted: bool = False) -> tuple[float, ...]:
    """The rates recovery tries when none is given: the paper's for a masked model; for one whose channels
    were removed, the paper's and `COMPACTED_LR` (low first)."""
    kind = model_kind(model)
    return (PAPER_LR[kind], COMPACTED_LR[kind]) if compacted else (PAPER_LR[kind],)


# Fine-tuning is starved of steps, not of compute, on the small calibration splits edgeprune is given: 3 epochs
# of 1000 images at batch 128 are 24 optimizer steps. At batch 32 (the same images, the same wall time on the
# CPU) the demo's compacted models recover 5 points more and LAMP's 90 % masks 2 points more
# (benchmarks/results/recovery_recipes_demo.md); batch 16 adds little for twice the time. So the fine-tuning batch is
# chosen for at least this many steps an epoch, a power of two between MIN_FINETUNE_BATCH and the --batch-size.
FINETUNE_STEPS_PER_EPOCH = 32
MIN_FINETUNE_BATCH = 16


def finetune_batch(train_images: int, batch_size: int = 128) -> int:
    """The fine-tuning batch for ``train_images``: the power of two nearest ``train_images /
    FINETUNE_STEPS_PER_EPOCH``, at least `MIN_FINETUNE_BATCH` (and 2) and at most ``batch_size``
    (1000 images: 32; 2000: 64; 60 000: ``batch_size``)."""
    want = max(train_images / FINETUNE_STEPS_PER_EPOCH, 1.0)
    power = 2 ** round(math.log2(want))
    return int(max(2, min(batch_size, max(MIN_FINETUNE_BATCH, power))))


def one_cycle(opt: torch.optim.Optimizer, lr: float, planned: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """One-cycle annealing over ``planned`` steps: 10 % warm-up (at least 2 steps), cosine to ~0. torch's
    OneCycleLR divides by zero when the warm-up is exactly one step (10 planned), so it gets two; under 4 planned
    steps there is nothing to anneal and the rate stays constant (None)."""
    if planned < 4:
        return None
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=planned, pct_start=max(0.1, 2 / planned))


@dataclass
class FinetuneResult:
    epochs_run: int
    best_epoch: int  # -1: no epoch beat the start weights, which are what the model holds now
    best_val_accuracy: float
    history: list[float]  # validation accuracy after each epoch
    steps: int  # optimizer steps taken
    start_accuracy: float  # validation accuracy before training
    improved: bool  # False: recovery did not improve on the start weights (best_epoch == -1)
    lr: float  # the (peak) learning rate used
    train_images: int
    val_images: int  # the images early stopping judged on: `val`, or the held-out part of x
    # the kept weights' mean log-probability of the right class on the validation images (a diagnostic beside
    # top-1: ranking by it was measured worse, benchmarks/results/paper_protocol_loglik_pick/)
    best_val_loglik: float = 0.0


def finetune(
    model: nn.Module,
    masks: Masks,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    epochs: int = 5,
    lr: float | None = None,
    batch_size: int = 128,
    patience: int = 3,
    val_fraction: float = 0.1,
    seed: int = 0,
    recipe: Recipe = RECIPES["paper"],
    teacher: torch.Tensor | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    device: torch.device | None = None,
    teacher_model: nn.Module | None = None,
) -> FinetuneResult:
    """Fine-tune in place with masks enforced (Adam, early stopping). Keeps the best epoch's weights.

    ``x, y`` are the calibration data. ``val``: the selection split's images and labels, on which early
    stopping judges; all of ``x`` then trains. Without it, ``val_fraction`` of ``x`` is held out instead.
    ``lr``: None takes `default_lr` (the paper's rate for the model's kind).
    ``teacher``: the dense model's logits on ``x`` (`teacher_logits`), used when the recipe distills.
    ``teacher_model``: the dense model itself, which a ``consistent`` recipe runs (in eval mode) on every view it
    trains on.
    ``device``: where to train (default: where the model is); the model comes back where it was.
    On return the masks are folded into the weights (no parametrizations remain).
    """
    if teacher is not None and len(teacher) != len(x):
        raise ValueError(f"teacher logits for {len(teacher)} images, but {len(x)} calibration images")
    if val is not None and (len(val[0]) != len(val[1]) or len(val[0]) == 0):
        raise ValueError(f"val needs as many labels as images, at least one: got {len(val[0])} and {len(val[1])}")
    if recipe.consistent and recipe.distill > 0 and teacher_model is None:
        raise ValueError(f"recipe '{recipe.name}' labels each view with the dense model: pass teacher_model")
    lr = default_lr(model) if lr is None else float(lr)
    labels_views = recipe.consistent and teacher_model is not None
    if labels_views:
        teacher_model.eval()  # a teacher in training mode would move its BatchNorm statistics with every batch
    label = on_device(teacher_model, device) if labels_views else contextlib.nullcontext()
    with on_device(model, device) as dev, label:
        # the data moves once (60 k Fashion-MNIST images: 190 MB), not per batch
        x, y = x.to(dev), y.to(dev)
        teacher = None if teacher is None else teacher.to(dev)
        masks = {name: keep.to(dev) for name, keep in masks.items()}
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(x), generator=gen).to(dev)  # CPU generator: same order on every device
        if val is None:
            n_val = max(1, int(len(x) * val_fraction))
            val_idx, train_idx = order[:n_val], order[n_val:]
            xv, yv = x[val_idx], y[val_idx]
        else:
            train_idx = order
            xv, yv = val[0].to(dev), val[1].to(dev)
        attach_masks(model, masks)
        try:
            fused = dev.type == "cuda"  # one kernel per step instead of a few per tensor
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, fused=fused)
            planned = epochs * -(-len(train_idx) // batch_size)
            sched = one_cycle(opt, lr, planned) if recipe.schedule == "onecycle" else None
            start, start_ll = accuracy_and_loglik(model, xv, yv)
            best = (start, -1, copy.deepcopy(model.state_dict()), start_ll)
            history: list[float] = []
            stale = steps = 0
            for epoch in range(epochs):
                model.train()
                perm = train_idx[torch.randperm(len(train_idx), generator=gen).to(dev)]
                for i in range(0, len(perm), batch_size):
                    idx = perm[i : i + batch_size]
                    if len(idx) < 2:  # BatchNorm cannot train on a single sample
                        continue
                    xb = random_shift(x[idx], recipe.shift, gen)  # unchanged when the shift is under a pixel
                    if labels_views:
                        with torch.no_grad():
                            tb = teacher_model(xb)
                    else:
                        tb = None if teacher is None else teacher[idx]
                    opt.zero_grad(set_to_none=True)
                    recovery_loss(model(xb), y[idx], tb, recipe).backward()
                    opt.step()
                    steps += 1
                    if sched is not None:
                        sched.step()
                score, ll = accuracy_and_loglik(model, xv, yv)
                history.append(score)
                if on_epoch:
                    on_epoch(epoch, score)
                if score > best[0]:
                    best, stale = (score, epoch, copy.deepcopy(model.state_dict()), ll), 0
                else:
                    stale += 1
                    if stale >= patience:
                        break
            model.load_state_dict(best[2])
        finally:
            squash_masks(model)
            model.eval()
        return FinetuneResult(
            epochs_run=len(history),
            best_epoch=best[1],
            best_val_accuracy=best[0],
            history=history,
            steps=steps,
            start_accuracy=start,
            improved=best[1] >= 0,
            lr=lr,
            train_images=len(train_idx),
            val_images=len(yv),
            best_val_loglik=best[3],
        )

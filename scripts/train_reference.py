"""Train the edgeprune zoo models from scratch on Fashion-MNIST and save their weights.

    PYTHONPATH=. python scripts/train_reference.py --models fmnist_resnet,fmnist_vgg --epochs 30 \
        --device cuda --out edgeprune/assets

For each model: trains on the 60k training images, evaluates once on the 10k test images after the
last epoch (no checkpoint is picked on test accuracy), and writes `OUT/<model>.pt` (a plain fp32
state_dict) and `OUT/<model>.json` (accuracy, recipe, timings, versions, seed, the command).

All images stay on the device as one uint8 tensor; batches are cut, augmented (random 2-px shift,
horizontal flip) and normalized there, so there is no DataLoader and a GPU is not starved.
`--epochs` takes one number or per-model overrides: `--epochs 30,fmnist_vit=60`.

Imports only torch, timm, numpy and edgeprune.zoo / edgeprune.data (both light), so it runs from a
repository checkout with `PYTHONPATH=.` and no edgeprune install.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

# Allow `python scripts/train_reference.py` from the repository root without PYTHONPATH.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edgeprune.zoo  # noqa: E402,F401  (registers the fmnist_* names in timm)
from edgeprune.data import FMNIST_MEAN, FMNIST_STD, read_fashion_mnist, resize_images  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    optimizer: str  # "sgd" (Nesterov, momentum 0.9) or "adamw"
    lr: float  # peak of the one-cycle schedule
    weight_decay: float
    batch_size: int = 256  # 235 steps an epoch: on a GPU these small models are bound by launch overhead
    warmup: float = 0.15  # fraction of steps spent warming up


# CNNs with BatchNorm train best with SGD; transformers and the depthwise MobileNet with AdamW.
_SGD = Recipe("sgd", lr=0.1, weight_decay=5e-4)
_ADAMW_CNN = Recipe("adamw", lr=3e-3, weight_decay=0.01)
_ADAMW_VIT = Recipe("adamw", lr=1.5e-3, weight_decay=0.05, warmup=0.1)
RECIPES: dict[str, Recipe] = {
    "fmnist_resnet": _SGD,
    "fmnist_resnet18": _SGD,
    "fmnist_vgg": _SGD,
    "fmnist_mobilenetv3": _ADAMW_CNN,
    "fmnist_vit": _ADAMW_VIT,
    "fmnist_swin": _ADAMW_VIT,
}
DEFAULT_EPOCHS = 30
SHIFT_PX = 2


def parse_epochs(text: str, models: list[str]) -> dict[str, int]:
    """'30' or '30,fmnist_vit=60' → epochs per model."""
    default, per_model = DEFAULT_EPOCHS, {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" in part:
            name, value = part.split("=", 1)
            per_model[name.strip()] = int(value)
        else:
            default = int(part)
    unknown = set(per_model) - set(models)
    if unknown:
        raise SystemExit(f"--epochs names models not in --models: {sorted(unknown)}")
    return {m: per_model.get(m, default) for m in models}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to SHIFT_PX pixels (zero padding, i.e. a padded random crop) and horizontal flip."""
    n, c, h, w = x.shape
    padded = F.pad(x, (SHIFT_PX, SHIFT_PX, SHIFT_PX, SHIFT_PX))
    dy = torch.randint(0, 2 * SHIFT_PX + 1, (n,), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * SHIFT_PX + 1, (n,), device=x.device, generator=gen)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    shifted = padded[batch, chan, rows, cols]
    flip = torch.rand(n, device=x.device, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], shifted.flip(3), shifted)


def prepare(images: torch.Tensor, image_size: int, in_chans: int) -> torch.Tensor:
    """uint8 or [0, 1] float (N, 1, 28, 28) → normalized, resized, channel-repeated, as edgeprune.data does."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    x = resize_images((x - FMNIST_MEAN[0]) / FMNIST_STD[0], image_size)
    return x.expand(-1, in_chans, -1, -1) if in_chans != 1 else x


@torch.inference_mode()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, size: int, chans: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 1000):
        logits = model(prepare(images[i : i + 1000], size, chans))
        correct += int((logits.argmax(1) == labels[i : i + 1000]).sum())
    return correct / len(images)


def make_optimizer(model: torch.nn.Module, recipe: Recipe, fused: bool) -> torch.optim.Optimizer:
    # No weight decay on norms, biases, position embeddings and tokens (1-D tensors and *_token / pos_embed).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) or "relative_position" in name
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=0.9, nesterov=True, fused=fused or None)
    return torch.optim.AdamW(groups, lr=recipe.lr, fused=fused or None)


def train_one(
    name: str,
    epochs: int,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    seed: int,
    out: Path,
    command: str,
    threads: int,
    overrides: dict,
) -> dict:
    recipe = RECIPES.get(name, _SGD)
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    torch.manual_seed(seed)
    model = timm.create_model(name).to(device)
    in_chans, image_size, _ = model.pretrained_cfg["input_size"]
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    train_x, train_y = train
    n = len(train_x)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    optimizer = make_optimizer(model, recipe, fused=device.type == "cuda")  # fused: one kernel per step
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=recipe.lr,
        total_steps=max(1, epochs * steps_per_epoch),
        pct_start=recipe.warmup,
        anneal_strategy="cos",
        div_factor=25.0,
        final_div_factor=1e3,
    )
    history = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(n, device=device, generator=gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for i in range(0, n, recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            # Augment before normalizing so the shift pads with black, the images' background.
            x = prepare(augment(train_x[idx].float() / 255.0, gen), image_size, in_chans)
            y = train_y[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
        row = {
            "epoch": epoch,
            "train_loss": round(float(loss_sum) / n, 5),
            "train_accuracy": round(int(correct) / n, 5),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        history.append(row)
        print(
            f"{name} epoch {epoch}/{epochs}: loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} "
            f"({row['seconds']:.1f} s)",
            flush=True,
        )
    train_seconds = time.perf_counter() - start
    accuracy = evaluate(model, test[0], test[1], image_size, in_chans)
    print(f"{name}: test accuracy {accuracy:.4f} after {epochs} epochs, {train_seconds:.0f} s", flush=True)

    state = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}.pt"
    tmp = out / f".{name}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, weights)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, {threads} threads)"
    meta = {
        "model": name,
        "test_accuracy": round(accuracy, 5),
        "test_images": len(test[0]),
        "train_images": n,
        "epochs": epochs,
        "recipe": asdict(recipe),
        "augmentation": f"random shift ±{SHIFT_PX} px (zero pad), horizontal flip",
        "input_size": list(model.pretrained_cfg["input_size"]),
        "params": sum(p.numel() for p in model.parameters()),
        "history": history,
        "train_seconds": round(train_seconds, 1),
        "device": device_name,
        "seed": seed,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "command": command,
    }
    tmp_json = out / f".{name}.json.tmp"
    tmp_json.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_json, out / f"{name}.json")
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train edgeprune's Fashion-MNIST reference models.")
    parser.add_argument("--models", default="fmnist_resnet", help="comma-separated zoo names")
    parser.add_argument("--epochs", default=str(DEFAULT_EPOCHS), help="N, or N,model=M,… per-model overrides")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("edgeprune/assets"))
    parser.add_argument("--fmnist-dir", default=None, help="IDX folder (default $EDGEPRUNE_FASHION_MNIST or Debian's)")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N training images (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default=None, help="override the model's recipe")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's peak learning rate")
    parser.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    missing = [m for m in models if m not in timm.list_models("fmnist_*")]
    if missing:
        raise SystemExit(f"unknown model(s) {missing}; zoo models: {timm.list_models('fmnist_*')}")
    epochs = parse_epochs(args.epochs, models)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: the transformers' linears, ~2x faster

    train_images, train_labels = read_fashion_mnist("train", args.fmnist_dir)
    test_images, test_labels = read_fashion_mnist("test", args.fmnist_dir)
    if args.limit:
        train_images, train_labels = train_images[: args.limit], train_labels[: args.limit]

    def to_device(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(images).unsqueeze(1).to(device), torch.from_numpy(labels).to(device)

    train = to_device(train_images, train_labels)
    test = to_device(test_images, test_labels)
    command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])
    threads = torch.get_num_threads()
    overrides = {"optimizer": args.optimizer, "lr": args.lr, "batch_size": args.batch_size}
    results = [
        train_one(m, epochs[m], train, test, device, args.seed, args.out, command, threads, overrides) for m in models
    ]
    for r in results:
        print(f"{r['model']:22s} {r['test_accuracy']:.4f}  {r['epochs']:3d} epochs  {r['train_seconds']:7.0f} s")


if __name__ == "__main__":
    main()

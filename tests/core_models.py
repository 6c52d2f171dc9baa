"""Small real timm models and data shared by the core tests (random init, small inputs)."""

from __future__ import annotations

import timm
import torch


def tiny_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=10, in_chans=1).eval()


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=32, patch_size=8, depth=2
    ).eval()


def batch(n: int = 64, size: int = 32, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)

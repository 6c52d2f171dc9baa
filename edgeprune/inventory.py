"""Layer inventory: every weight tensor of the model with its *role*.

Roles are the vocabulary the rules files speak (``edgeprune/rules/*.json``). They come from a small,
ordered table of (role, module kind, name pattern) plus two structural facts that names cannot tell:
which layer is the classifier (timm's ``get_classifier``) and which conv is grouped/depthwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

# Normalization layers are listed (the paper's rule keeps them dense) but never masked.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# First match wins. (role, kinds it applies to, regex searched in the module's dotted name)
NAME_ROLES: list[tuple[str, tuple[str, ...], str]] = [
    ("patch_embed", ("conv", "linear"), r"(^|\.)patch_embed(\.|$)"),
    ("qkv", ("linear", "conv"), r"(^|\.)(qkv|q|k|v|to_qkv)$"),
    ("attn_proj", ("linear", "conv"), r"(^|\.)attn\.proj$"),
    ("mlp_fc1", ("linear", "conv"), r"(^|\.)mlp\.fc1$"),
    ("mlp_fc2", ("linear", "conv"), r"(^|\.)mlp\.fc2$"),
    ("se", ("conv", "linear"), r"(^|\.)se\.(conv_reduce|conv_expand|fc1|fc2)$"),
    ("downsample", ("conv", "linear"), r"(^|\.)(downsample|shortcut)(\.|$)"),
    ("stem", ("conv",), r"^(stem|conv_stem|conv1)(\.|$)"),
    ("head", ("conv", "linear"), r"^(conv_head|head\.fc|pre_logits)(\.|$)"),
]

ROLES: tuple[str, ...] = (
    "norm", "classifier", "patch_embed", "qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "se", "downsample",
    "stem", "head", "depthwise", "conv", "linear",
)  # fmt: skip

STAGE_PATTERN = re.compile(r"(?:^|\.)(?:layer|layers\.|stages\.|stage)(\d+)(?:\.|$)")


@dataclass
class Layer:
    """One weight tensor. ``index``/``depth`` give its position among the prunable layers."""

    name: str
    role: str
    kind: str  # "conv" | "linear" | "norm"
    shape: tuple[int, ...]
    numel: int
    prunable: bool
    index: int = -1
    depth: float = 0.0  # 0 = first prunable layer, 1 = last
    stage: int | None = None
    module: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def weight(self) -> torch.Tensor:
        assert self.module is not None
        return self.module.weight


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, NORM_TYPES):
        return "norm" if getattr(module, "weight", None) is not None else None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _classifier_modules(model: nn.Module) -> set[int]:
    """ids of the classifier layer(s): timm's get_classifier(), else the last Linear."""
    ids: set[int] = set()
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001 - some custom models implement it differently
            head = None
        if isinstance(head, nn.Module):
            ids |= {id(m) for m in head.modules() if isinstance(m, PRUNABLE_TYPES)}
    if not ids:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if linears:
            ids.add(id(linears[-1]))
    return ids


def _role(name: str, kind: str, module: nn.Module, classifier_ids: set[int], first_conv: bool) -> str:
    if kind == "norm":
        return "norm"
    if id(module) in classifier_ids:
        return "classifier"
    for role, kinds, pattern in NAME_ROLES:
        if kind in kinds and re.search(pattern, name):
            return role
    if kind == "conv" and module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    if kind == "conv" and first_conv:
        return "stem"
    return kind


def build_inventory(model: nn.Module, include_norm: bool = True) -> list[Layer]:
    """All conv/linear weights (prunable) and, optionally, norm weights (never pruned), in module order."""
    classifier_ids = _classifier_modules(model)
    layers: list[Layer] = []
    seen_conv = False
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None or (kind == "norm" and not include_norm):
            continue
        first_conv = kind == "conv" and not seen_conv
        seen_conv = seen_conv or kind == "conv"
        weight = module.weight
        stage = STAGE_PATTERN.search(name)
        layers.append(
            Layer(
                name=name,
                role=_role(name, kind, module, classifier_ids, first_conv),
                kind=kind,
                shape=tuple(weight.shape),
                numel=weight.numel(),
                prunable=kind != "norm",
                stage=int(stage.group(1)) if stage else None,
                module=module,
            )
        )
    prunable = [layer for layer in layers if layer.prunable]
    for i, layer in enumerate(prunable):
        layer.index = i
        layer.depth = i / max(1, len(prunable) - 1)
    return layers


def prunable_layers(model: nn.Module) -> list[Layer]:
    return build_inventory(model, include_norm=False)

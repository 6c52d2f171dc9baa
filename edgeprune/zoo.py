"""Small timm models for 28 px Fashion-MNIST, registered in timm's model registry.

Importing this module registers the names below, after which ``timm.create_model("fmnist_resnet")``
works like any other timm name. Every model is built from timm's own classes (``ResNet``, ``VGG``,
``VisionTransformer``, ``SwinTransformer``, ``MobileNetV3``) with reduced widths and depths, so layer
names, module types and pruning roles are exactly those of the full-size timm families.

All take ``num_classes`` (default 10), ``in_chans`` (default 1) and ``pretrained`` (True loads the
weights bundled in ``edgeprune/assets/<name>.pt``); ViT and Swin also take ``img_size``. Sizes at the
default 1×28×28 input and 10 classes (MACs counted by torch-pruning); test accuracy of the bundled weights
on the 10k Fashion-MNIST test set (trained from scratch by ``scripts/train_reference.py``; recipe, epochs,
device and versions in ``edgeprune/assets/<name>.json``):

| name                 | timm class        | params | MMACs | test acc | layout                                   |
|----------------------|-------------------|--------|-------|----------|------------------------------------------|
| `fmnist_resnet`      | ResNet            | 0.309M | 13.2  | 93.84 %  | BasicBlock [1,1,1,1], 16-32-64-128, 3×3 stem |
| `fmnist_resnet18`    | ResNet            | 0.701M | 28.9  | 94.60 %  | BasicBlock [2,2,2,2], 16-32-64-128, 3×3 stem |
| `fmnist_vgg`         | VGG               | 0.942M | 8.9   | 93.57 %  | VGG-11-BN, 16-32-64²-128⁴, 3×3 ConvMlp to 256 |
| `fmnist_vit`         | VisionTransformer | 0.206M | 12.0  | 90.17 %  | patch 4 (7×7 tokens + cls), dim 64, depth 6 |
| `fmnist_swin`        | SwinTransformer   | 0.395M | 13.9  | 91.91 %  | patch 2, window 7, dim 32, depths (2,2,2)  |
| `fmnist_mobilenetv3` | MobileNetV3       | 0.252M | 2.5   | 92.51 %  | MobileNetV3 blocks (SE, hard-swish), stride 8 |

The table is checked by ``tests/test_models.py`` (params and MACs to ±2 %, accuracy against the JSON).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.layers import ClassifierHead
from timm.models import register_model
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnet import BasicBlock, ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vgg import VGG, ConvMlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from edgeprune.errors import EdgepruneError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)

# Keyword arguments timm.create_model always passes to an entrypoint; ours have no hub weights.
_TIMM_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _cfg(name: str, model: nn.Module, input_size: int, first_conv: str, classifier: str) -> dict[str, Any]:
    """A timm-style pretrained_cfg, so tools that read `model.pretrained_cfg` get the right input."""
    return {
        "architecture": name,
        "num_classes": model.num_classes,
        "input_size": (model.in_chans if hasattr(model, "in_chans") else 1, input_size, input_size),
        "mean": FMNIST_MEAN,
        "std": FMNIST_STD,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "first_conv": first_conv,
        "classifier": classifier,
    }


def bundled_weights(name: str) -> Path | None:
    """Path of the weights shipped for zoo model `name`, or None when none are bundled."""
    path = ASSETS_DIR / f"{name}.pt"
    return path if path.is_file() else None


def _finish(
    name: str,
    model: nn.Module,
    *,
    in_chans: int,
    input_size: int,
    first_conv: str,
    classifier: str,
    pretrained: bool,
    kwargs: dict[str, Any],
) -> nn.Module:
    for key in _TIMM_FACTORY_KWARGS:
        kwargs.pop(key, None)
    if kwargs:
        raise TypeError(f"{name}: unexpected arguments {sorted(kwargs)}")
    model.in_chans = in_chans
    cfg = _cfg(name, model, input_size, first_conv, classifier)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    if pretrained:
        _load_bundled(name, model)
    return model


def _load_bundled(name: str, model: nn.Module) -> None:
    path = bundled_weights(name)
    if path is None:
        raise EdgepruneError(
            f"no bundled weights for {name}; train them with "
            f"`python scripts/train_reference.py --models {name} --out edgeprune/assets` "
            "or pass --checkpoint"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise EdgepruneError(
            f"bundled weights {path.name} do not fit {name} with these arguments "
            "(they are for 1 input channel and 10 classes); drop --pretrained or use the defaults"
        ) from exc


def _small_resnet(
    name: str, layers: tuple[int, ...], channels: tuple[int, ...], pretrained: bool, kwargs: dict[str, Any]
) -> ResNet:
    num_classes = kwargs.pop("num_classes", 10)
    in_chans = kwargs.pop("in_chans", 1)
    drop_rate = kwargs.pop("drop_rate", 0.0)
    model = ResNet(
        BasicBlock,
        list(layers),
        num_classes=num_classes,
        in_chans=in_chans,
        channels=channels,
        # A "deep" stem has stem_width * 2 output channels (the plain one is fixed at 64); it is replaced below,
        # this only sizes bn1 and the first stage's input to channels[0].
        stem_type="deep",
        stem_width=channels[0] // 2,
        drop_rate=drop_rate,
        # timm zero-initializes each block's last BN by default; at init every block is then the identity and
        # the net is only the stem plus strided 1×1 shortcuts, which learned ~2× slower in the first epoch
        # here (train accuracy 0.54 vs 0.76 after 60 Adam steps), too slow for short CPU schedules.
        zero_init_last=False,
    )
    # timm's ImageNet stems (stride-2 conv(s) + max-pool) would shrink 28 px to 7 px before the first block;
    # a single 3×3 stride-1 conv keeps the resolution, as CIFAR-style ResNets do. bn1/act1 stay as built.
    model.conv1 = nn.Conv2d(in_chans, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    for info in model.feature_info:
        info["reduction"] = max(1, info["reduction"] // 4)
    return _finish(
        name,
        model,
        in_chans=in_chans,
        input_size=28,
        first_conv="conv1",
        classifier="fc",
        pretrained=pretrained,
        kwargs=kwargs,
    )


@register_model
def fmnist_resnet(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """The demo model: ResNet with one BasicBlock per stage (ResNet-10 layout), 16-32-64-128 channels."""
    return _small_resnet("fmnist_resnet", (1, 1, 1, 1), (16, 32, 64, 128), pretrained, kwargs)


@register_model
def fmnist_resnet18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 layout (BasicBlock [2,2,2,2]) at a quarter of the width, 3×3 stem."""
    return _small_resnet("fmnist_resnet18", (2, 2, 2, 2), (16, 32, 64, 128), pretrained, kwargs)


@register_model
def fmnist_vgg(pretrained: bool = False, **kwargs: Any) -> VGG:
    """VGG-11 with BatchNorm (8 convs) at a quarter width; three max-pools take 28 px to 3 px."""
    num_classes = kwargs.pop("num_classes", 10)
    in_chans = kwargs.pop("in_chans", 1)
    drop_rate = kwargs.pop("drop_rate", 0.0)
    cfg: list[Any] = [16, "M", 32, "M", 64, 64, "M", 128, 128, 128, 128]
    # Built on the meta device: timm's VGG head is a 7×7 ConvMlp to 4096 features (42 M weights here) that
    # would take seconds to initialize only to be replaced below.
    model = VGG(
        cfg, num_classes=num_classes, in_chans=in_chans, norm_layer=nn.BatchNorm2d, drop_rate=drop_rate, device="meta"
    )
    # The last map is 3×3 (timm's ConvMlp would up-sample it to 7×7), so the same ConvMlp with a 3×3 kernel and
    # 256 features gives VGG's fc6/fc7 as convolutions at a size that fits the model.
    hidden = 256
    model.pre_logits = ConvMlp(model.num_features, hidden, kernel_size=3, drop_rate=drop_rate, device="meta")
    model.head = ClassifierHead(hidden, num_classes, pool_type="avg", drop_rate=drop_rate, device="meta")
    model.head_hidden_size = hidden
    model.to_empty(device="cpu")
    model._initialize_weights()  # timm's VGG init (Kaiming convs, unit BN, N(0, 0.01) linear)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
    return _finish(
        "fmnist_vgg",
        model,
        in_chans=in_chans,
        input_size=28,
        first_conv="features.0",
        classifier="head.fc",
        pretrained=pretrained,
        kwargs=kwargs,
    )


def _transformer(name: str, cls: type, classifier: str, pretrained: bool, kwargs: dict[str, Any], **arch: Any):
    """A timm ViT/Swin at 28 px: the zoo's I/O defaults (1 channel, 10 classes), ``arch`` the rest."""
    num_classes = kwargs.pop("num_classes", 10)
    in_chans = kwargs.pop("in_chans", 1)
    img_size = kwargs.pop("img_size", 28)
    model = cls(
        img_size=img_size,
        in_chans=in_chans,
        num_classes=num_classes,
        drop_rate=kwargs.pop("drop_rate", 0.0),
        drop_path_rate=kwargs.pop("drop_path_rate", 0.0),
        **arch,
    )
    return _finish(
        name,
        model,
        in_chans=in_chans,
        input_size=img_size,
        first_conv="patch_embed.proj",
        classifier=classifier,
        pretrained=pretrained,
        kwargs=kwargs,
    )


@register_model
def fmnist_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT with 4×4 patches (7×7 tokens + class token at 28 px), width 64, 6 blocks, 4 heads."""
    arch = dict(patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0)
    return _transformer("fmnist_vit", VisionTransformer, "head", pretrained, kwargs, **arch)


@register_model
def fmnist_swin(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Swin with 2×2 patches and 7×7 windows at 28 px, width 32, depths (2,2,2), heads (2,4,8).

    Token grids are 14×14 (2×2 windows, shifted by 3 in every second block, as in Swin-T's early stages),
    then 7×7 (one window, like Swin-T's last stage at 224 px), then 4×4 (the merge pads 7 to 8).
    """
    arch = dict(patch_size=2, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=7, mlp_ratio=2.0)
    return _transformer("fmnist_swin", SwinTransformer, "head.fc", pretrained, kwargs, **arch)


@register_model
def fmnist_mobilenetv3(pretrained: bool = False, **kwargs: Any) -> MobileNetV3:
    """MobileNetV3 blocks (depthwise-separable, inverted residuals, SE, hard-swish) with total stride 8."""
    num_classes = kwargs.pop("num_classes", 10)
    in_chans = kwargs.pop("in_chans", 1)
    # MobileNetV3-Small's block types, but only two stride-2 stages after the stride-2 stem (28→14→7→4);
    # ImageNet's stride 32 would leave a 1×1 map at 28 px.
    arch_def = [
        ["ds_r1_k3_s1_e1_c16_nre"],  # 14×14
        ["ir_r1_k3_s2_e4_c24_nre", "ir_r1_k3_s1_e3_c24_nre"],  # 7×7
        ["ir_r1_k5_s2_e4_c40_se0.25", "ir_r1_k5_s1_e6_c40_se0.25"],  # 4×4
        ["ir_r2_k5_s1_e4_c64_se0.25"],
        ["cn_r1_k1_s1_c192"],
    ]
    model = MobileNetV3(
        block_args=decode_arch_def(arch_def),
        num_classes=num_classes,
        in_chans=in_chans,
        stem_size=16,
        num_features=256,
        head_bias=True,
        act_layer=nn.Hardswish,
        round_chs_fn=round_channels,
        se_layer=partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU, rd_round_fn=round_channels),
        drop_rate=kwargs.pop("drop_rate", 0.0),
        drop_path_rate=kwargs.pop("drop_path_rate", 0.0),
    )
    return _finish(
        "fmnist_mobilenetv3",
        model,
        in_chans=in_chans,
        input_size=28,
        first_conv="conv_stem",
        classifier="classifier",
        pretrained=pretrained,
        kwargs=kwargs,
    )


ZOO_MODELS: tuple[str, ...] = (
    "fmnist_resnet",
    "fmnist_resnet18",
    "fmnist_vgg",
    "fmnist_vit",
    "fmnist_swin",
    "fmnist_mobilenetv3",
)

from collections import Counter

import pytest
import timm

from edgeprune.inventory import ROLES, build_inventory
from edgeprune.models import load_model


def roles(model) -> dict[str, str]:
    return {layer.name: layer.role for layer in build_inventory(model)}


def test_resnet_roles():
    r = roles(timm.create_model("resnet18", num_classes=10))
    assert r["conv1"] == "stem" and r["fc"] == "classifier"
    assert r["layer2.0.downsample.0"] == "downsample" and r["layer1.0.conv1"] == "conv"
    assert r["bn1"] == "norm"


def test_vit_roles():
    r = roles(timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2))
    assert r["patch_embed.proj"] == "patch_embed" and r["head"] == "classifier"
    assert r["blocks.0.attn.qkv"] == "qkv" and r["blocks.0.attn.proj"] == "attn_proj"
    assert r["blocks.1.mlp.fc1"] == "mlp_fc1" and r["blocks.1.mlp.fc2"] == "mlp_fc2"
    assert r["blocks.0.norm1"] == "norm"


def test_swin_and_mobilenet_roles():
    swin = roles(load_model("fmnist_swin"))
    assert Counter(swin.values())["qkv"] == 6 and swin["head.fc"] == "classifier"
    assert any(n.startswith("layers.1.downsample") and r == "downsample" for n, r in swin.items())
    mb = roles(timm.create_model("mobilenetv3_small_100", num_classes=10))
    assert mb["conv_stem"] == "stem" and mb["classifier"] == "classifier" and mb["conv_head"] == "head"
    assert "depthwise" in mb.values() and "se" in mb.values()


@pytest.mark.parametrize("name", ["fmnist_resnet", "fmnist_vgg", "fmnist_vit", "fmnist_mobilenetv3"])
def test_every_zoo_model_has_known_roles_and_positions(name):
    layers = build_inventory(load_model(name))
    assert {layer.role for layer in layers} <= set(ROLES)
    prunable = [layer for layer in layers if layer.prunable]
    assert prunable[0].depth == 0.0 and prunable[-1].depth == 1.0
    assert sum(layer.role == "classifier" for layer in layers) >= 1

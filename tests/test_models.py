"""Model loading: zoo models, the demo model and its weights, checkpoints, factories, bad input."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch_pruning as tp
import torchvision
from torch import nn

import edgeprune.zoo as zoo
from edgeprune.data import DataBundle
from edgeprune.errors import EdgepruneError
from edgeprune.models import load_checkpoint, load_model, model_family, read_checkpoint

torch.set_num_threads(1)

FAMILY = {
    "fmnist_resnet": "resnet",
    "fmnist_resnet18": "resnet",
    "fmnist_vgg": "vgg",
    "fmnist_vit": "vit",
    "fmnist_swin": "swin",
    "fmnist_mobilenetv3": "mobilenetv3",
}


def _doc_table() -> dict[str, tuple[float, float, float]]:
    """{name: (params, MACs, test accuracy)} from the table in edgeprune.zoo's docstring."""
    row = r"\| `(\w+)`\s*\|[^|]*\|\s*([\d.]+)M\s*\|\s*([\d.]+)\s*\|\s*([\d.]+) %\s*\|"
    rows = re.findall(row, zoo.__doc__ or "")
    return {name: (float(p) * 1e6, float(m) * 1e6, float(a) / 100) for name, p, m, a in rows}


def test_zoo_is_registered_and_documented():
    assert set(timm.list_models("fmnist_*")) == set(zoo.ZOO_MODELS) == set(FAMILY) == set(_doc_table())


@pytest.mark.parametrize("name", zoo.ZOO_MODELS)
def test_zoo_model_forward_size_and_family(name: str):
    model = timm.create_model(name).eval()
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert model(x).shape == (3, 10)
    macs, params = tp.utils.count_ops_and_params(model, x[:1])
    doc_params, doc_macs, _ = _doc_table()[name]
    assert params == pytest.approx(doc_params, rel=0.02) and macs == pytest.approx(doc_macs, rel=0.02)
    assert macs < 30e6  # cheap enough to screen 30 candidates on 2 cores
    assert model_family(model) == FAMILY[name]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == (FAMILY[name] not in ("vit", "swin"))


@pytest.mark.parametrize("name", ["fmnist_resnet", "fmnist_vgg", "fmnist_vit", "fmnist_mobilenetv3"])
def test_zoo_model_takes_classes_and_channels(name: str):
    model = timm.create_model(name, num_classes=5, in_chans=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 28, 28)).shape == (2, 5)
    assert model.pretrained_cfg["input_size"][0] == 3


def test_demo_stem_keeps_resolution():
    model = timm.create_model("fmnist_resnet").eval()
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.kernel_size == (3, 3)
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 1, 28, 28)).shape == (1, 128, 4, 4)


def test_demo_model_is_accurate_on_demo_data():
    weights = Path(zoo.__file__).parent / "assets" / "fmnist_resnet.pt"
    assert weights.is_file() and weights.stat().st_size <= 10 * 2**20
    model = load_model("demo")
    assert not model.training and next(model.parameters()).device.type == "cpu"
    from edgeprune.data import load_data

    data = load_data("demo", calib_size=1000, eval_size=2000)
    with torch.no_grad():
        acc = (model(data.eval_x).argmax(1) == data.eval_y).float().mean().item()
    assert acc >= 0.92  # issue 2: the demo model reaches ≥ 92 % (94.3 % on this split, 93.8 % on the test set)


@pytest.mark.parametrize("name", zoo.ZOO_MODELS)
def test_bundled_reference_weights(name: str, demo_data: DataBundle):
    meta = json.loads((zoo.ASSETS_DIR / f"{name}.json").read_text())
    assert meta["model"] == name and meta["train_images"] == 60000 and meta["test_images"] == 10000
    assert _doc_table()[name][2] == pytest.approx(meta["test_accuracy"], abs=1e-4)
    model = load_model(name, pretrained=True)
    with torch.no_grad():
        acc = (model(demo_data.eval_x).argmax(1) == demo_data.eval_y).float().mean().item()
    # 400 images: within 4 points of the test-set accuracy recorded when the weights were trained.
    assert acc >= meta["test_accuracy"] - 0.04


def test_demo_model_adapts_stem_to_rgb(demo_data: DataBundle):
    grey, rgb = load_model("demo"), load_model("demo", in_chans=3)
    x = demo_data.eval_x[:8]
    with torch.no_grad():
        assert torch.allclose(rgb(x.expand(-1, 3, -1, -1)), grey(x), atol=1e-4)


def test_demo_model_refuses_other_class_count():
    with pytest.raises(EdgepruneError, match="10 Fashion-MNIST classes"):
        load_model("demo", num_classes=5)


def test_timm_names_with_and_without_prefix():
    cnn = load_model("timm:resnet18", num_classes=7, in_chans=1, img_size=32)  # CNN: img_size dropped
    vit = load_model("vit_tiny_patch16_224", num_classes=7, img_size=32)  # ViT: img_size used
    with torch.no_grad():
        assert cnn(torch.randn(1, 1, 32, 32)).shape == (1, 7)
        assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert model_family(cnn) == "resnet" and model_family(vit) == "vit"
    assert not cnn.training


def test_unknown_timm_name_suggests_close_matches():
    with pytest.raises(EdgepruneError, match=r"unknown model 'resnet81'.*resnet18"):
        load_model("resnet81")
    with pytest.raises(EdgepruneError, match="unknown model 'fmnist_resnt'.*fmnist_resnet"):
        load_model("timm:fmnist_resnt")


def test_pretrained_hub_failure_is_one_line(monkeypatch: pytest.MonkeyPatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(EdgepruneError, match="Hugging Face hub") as info:
        load_model("resnet18", pretrained=True)
    assert "\n" not in str(info.value)


def test_zoo_pretrained_without_bundled_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(zoo, "ASSETS_DIR", tmp_path)
    with pytest.raises(EdgepruneError, match="train_reference.py --models fmnist_vit"):
        load_model("fmnist_vit", pretrained=True)


# ----------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_wrappers(tmp_path: Path):
    src = timm.create_model("fmnist_vgg").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = src(x)
    torch.save(src.state_dict(), tmp_path / "raw.pt")
    ddp = {"module." + k: v for k, v in src.state_dict().items()}
    torch.save({"model_state_dict": ddp, "epoch": 7, "optimizer": {"lr": 0.1}}, tmp_path / "wrapped.pth")
    for name in ("raw.pt", "wrapped.pth"):
        model = load_model("fmnist_vgg", checkpoint=tmp_path / name)
        with torch.no_grad():
            assert torch.equal(model(x), expected), name


def test_safetensors_checkpoint(tmp_path: Path):
    from safetensors.torch import save_file

    src = timm.create_model("fmnist_mobilenetv3")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert torch.equal(read_checkpoint(tmp_path / "w.safetensors")["conv_stem.weight"], src.conv_stem.weight)


def test_missing_checkpoint(tmp_path: Path):
    with pytest.raises(EdgepruneError, match="checkpoint not found"):
        load_model("fmnist_resnet", checkpoint=tmp_path / "nope.pt")


@pytest.mark.parametrize("content", [b"", b"garbage" * 20, b"PK\x03\x04 truncated zip"])
def test_corrupt_checkpoint(tmp_path: Path, content: bytes):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(EdgepruneError, match="not a PyTorch checkpoint"):
        load_model("fmnist_resnet", checkpoint=tmp_path / "bad.pt")


def test_pickled_module_is_refused(tmp_path: Path):
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(EdgepruneError, match="state_dict"):
        read_checkpoint(tmp_path / "module.pt")
    torch.save({"epoch": 3}, tmp_path / "notensors.pt")
    with pytest.raises(EdgepruneError, match="no state_dict"):
        read_checkpoint(tmp_path / "notensors.pt")


def test_checkpoint_for_other_classes_suggests_num_classes(tmp_path: Path):
    torch.save(timm.create_model("fmnist_resnet", num_classes=100).state_dict(), tmp_path / "c100.pt")
    with pytest.raises(EdgepruneError) as info:
        load_model("fmnist_resnet", checkpoint=tmp_path / "c100.pt", num_classes=10)
    msg = str(info.value)
    assert "2 of" in msg and "fc.weight: checkpoint [100, 128] vs model [10, 128]" in msg
    assert "--num-classes 100" in msg


def test_checkpoint_for_other_channels_suggests_in_chans(tmp_path: Path):
    torch.save(timm.create_model("fmnist_resnet", in_chans=3).state_dict(), tmp_path / "rgb.pt")
    with pytest.raises(EdgepruneError, match="--in-chans 3"):
        load_model("fmnist_resnet", checkpoint=tmp_path / "rgb.pt")


def test_checkpoint_for_other_architecture(tmp_path: Path):
    torch.save(timm.create_model("fmnist_vgg").state_dict(), tmp_path / "vgg.pt")
    with pytest.raises(EdgepruneError, match=r"does not fit fmnist_resnet: \d+ of \d+ keys mismatch"):
        load_model("fmnist_resnet", checkpoint=tmp_path / "vgg.pt")
    model = timm.create_model("fmnist_resnet18")
    with pytest.raises(EdgepruneError, match="another architecture"):
        load_checkpoint(model, tmp_path / "vgg.pt")


def test_demo_with_user_checkpoint(tmp_path: Path):
    src = timm.create_model("fmnist_resnet", num_classes=4)
    torch.save(src.state_dict(), tmp_path / "mine.pt")
    model = load_model("demo", checkpoint=tmp_path / "mine.pt", num_classes=4)
    assert torch.equal(model.fc.weight, src.fc.weight)


# ----------------------------------------------------------------------------------------------- factories


def test_factory_gets_only_the_arguments_it_accepts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            def small(num_classes=2):
                return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))

            def anything(**kwargs):
                return nn.Sequential(nn.Flatten(), nn.Linear(kwargs["in_chans"] * 4, kwargs["num_classes"]))

            def broken():
                raise ValueError("boom")

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_models", None)
    model = load_model("my_models:small", num_classes=6, in_chans=1, img_size=28)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 6) and model_family(model) == "generic"
    assert load_model("my_models:anything", num_classes=3, in_chans=2)(torch.randn(1, 2, 2, 2)).shape == (1, 3)
    by_path = load_model(f"{tmp_path / 'my_models.py'}:small", num_classes=4)
    assert by_path[1].out_features == 4
    with pytest.raises(EdgepruneError, match="boom"):
        load_model("my_models:broken")
    with pytest.raises(EdgepruneError, match="not callable"):
        load_model("my_models:NOT_CALLABLE")
    with pytest.raises(EdgepruneError, match="has no attribute 'missing'"):
        load_model("my_models:missing")
    with pytest.raises(EdgepruneError, match="cannot import 'no_such_pkg.mod'"):
        load_model("no_such_pkg.mod:f")
    with pytest.raises(EdgepruneError, match="model file not found"):
        load_model(f"{tmp_path / 'nope.py'}:f")


def test_factory_from_torchvision():
    model = load_model("torchvision.models:mobilenet_v3_small", num_classes=10)
    assert model_family(model) == "mobilenetv3" and model.classifier[-1].out_features == 10


def test_model_family_generic_and_subclass():
    class MyResNet(torchvision.models.ResNet):
        pass

    assert model_family(MyResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])) == "resnet"
    assert model_family(nn.Sequential(nn.Linear(2, 2))) == "generic"

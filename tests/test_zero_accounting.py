"""Zero accounting: each PyTorch prunable weight followed into the ONNX graph, zero by zero.

Small real models, random init, real exports: folded BatchNorm, a Linear stored transposed, a shared
weight, a zero BN scale; then damaged graphs (a lost zero, an added zero, merged branches) must fail
naming the layer.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import timm
import torch
from edgeprune.export import export_onnx
from edgeprune.export.onnx_export import _prepare, _torch_export
from edgeprune.export.sparsity import account_zeros, torch_weight_sparsity
from onnx import numpy_helper
from torch import nn

torch.set_num_threads(1)


class Folded(nn.Module):
    """Conv+BN (folded at export), a BN with one zero scale, a Linear applied twice (one shared weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x))).mean((2, 3))
        return self.head(self.shared(torch.relu(self.shared(x))))


def _sparse_folded() -> nn.Module:
    torch.manual_seed(0)
    model = Folded()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_((torch.rand_like(m.weight) > 0.5).float())
        model.bn2.weight[3] = 0.0  # folding zeroes conv2's row 3: zeros gained there are expected
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _sparse_folded()
    path = tmp_path_factory.mktemp("acc") / "m.onnx"
    result = export_onnx(model, torch.randn(2, 3, 8, 8), path, simplify=False)
    counted = torch_weight_sparsity(_prepare(model), torch.randn(1, 3, 8, 8))
    return result, onnx.load(str(path)), counted


def test_faithful_export_accounts_every_weight(exported):
    result, graph, counted = exported
    account = account_zeros(graph, counted)
    assert account.ok, account.problem
    assert account.problem == ""
    by_layer = {entry.layer: entry for entry in account.layers}
    assert set(by_layer) == {"conv1.weight", "conv2.weight", "shared.weight", "head.weight"}
    # BN folded into the convs: found by per-channel scale, zeros at the same positions.
    assert by_layer["conv1.weight"].how.startswith("scaled")
    assert by_layer["conv2.weight"].how.startswith("scaled")
    # The zero BN scale adds exactly conv2's row-3 non-zeros, and they are not "gained" zeros.
    row3 = int((counted.weights[1].values[3] != 0).sum())
    assert row3 > 0 and counted.bn_fold_extra_zeros == row3
    assert by_layer["conv2.weight"].zeros_onnx == by_layer["conv2.weight"].zeros_torch + row3
    assert all(entry.lost == 0 and entry.gained == 0 for entry in account.layers)
    # The shared Linear is one PyTorch weight, counted once.
    assert counted.names.count("shared.weight") == 1
    assert result.zeros_torch == counted.zeros


def _graph_with(graph: onnx.ModelProto, name: str, change) -> onnx.ModelProto:
    damaged = onnx.ModelProto()
    damaged.CopyFrom(graph)
    for init in damaged.graph.initializer:
        if init.name == name:
            array = numpy_helper.to_array(init).copy()
            change(array)
            init.CopyFrom(numpy_helper.from_array(array, name))
            return damaged
    raise AssertionError(f"no initializer {name}")


def _set_first(array: np.ndarray, where: np.ndarray, value: float) -> None:
    array[tuple(np.argwhere(where)[0])] = value


@pytest.mark.parametrize("layer", ["conv1.weight", "conv2.weight", "head.weight"])
def test_a_lost_zero_fails_naming_the_layer(exported, layer):
    _, graph, counted = exported
    entry = next(e for e in account_zeros(graph, counted).layers if e.layer == layer)
    name = entry.onnx[0]
    torch_zero = next(w for w in counted.weights if w.name == layer).values == 0
    stored = numpy_helper.to_array(next(i for i in graph.graph.initializer if i.name == name))
    # The zero to damage, in the stored layout (a Linear may be stored transposed).
    stored_zero = torch_zero.T if stored.shape != torch_zero.shape else torch_zero
    stored_zero = stored_zero & (stored == 0)
    damaged = _graph_with(graph, name, lambda a: _set_first(a, stored_zero, 1.0))
    account = account_zeros(damaged, counted)
    assert not account.ok
    assert f"lost 1 of the {entry.zeros_torch} zeros of layer {layer}" in account.problem
    assert "\n" not in account.problem


def test_an_added_zero_fails_naming_the_layer(exported):
    _, graph, counted = exported
    entry = next(e for e in account_zeros(graph, counted).layers if e.layer == "head.weight")
    damaged = _graph_with(graph, entry.onnx[0], lambda a: _set_first(a, a != 0, 0.0))
    account = account_zeros(damaged, counted)
    assert not account.ok
    assert "head.weight" in account.problem and "\n" not in account.problem


class Branches(nn.Module):
    """RepVGG-style block: 3×3 and 1×1 branches summed."""

    def __init__(self) -> None:
        super().__init__()
        self.k3 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.k1 = nn.Conv2d(4, 4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k3(x) + self.k1(x)


def test_merged_branches_fail_naming_a_branch():
    torch.manual_seed(0)
    branchy = Branches().eval()
    with torch.no_grad():
        branchy.k3.weight.mul_((torch.rand_like(branchy.k3.weight) > 0.5).float())
    merged = nn.Conv2d(4, 4, 3, padding=1, bias=False).eval()
    with torch.no_grad():
        merged.weight.copy_(branchy.k3.weight + nn.functional.pad(branchy.k1.weight, (1, 1, 1, 1)))
    x = torch.randn(1, 4, 6, 6)
    assert torch.allclose(branchy(x), merged(x), atol=1e-5)  # the same function, one tensor
    counted = torch_weight_sparsity(branchy, x)
    account = account_zeros(_torch_export(_prepare(merged), x, 17, True, 1), counted)
    assert not account.ok
    assert account.problem.startswith("layer k3.weight (and 1 more) is not in the exported graph")
    assert "merged branches are not supported" in account.problem


def test_levit_linear_batchnorm_is_counted_without_crashing():
    # LeViT's LinearNorm feeds a flattened Linear output into BatchNorm1d; the fold tracker once
    # paired it with a freed conv output that had the same id() and indexed past the conv's rows.
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, img_size=64, num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.zero_()  # a wrong pairing now shows as extra zeros (or the old IndexError)
    prunable = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for batch in (1, 2, 3):  # id() reuse depends on the allocator: several passes, several chances
        counted = torch_weight_sparsity(model, torch.randn(batch, 3, 64, 64))
        assert counted.total == sum(w.numel() for w in prunable)
        # A BatchNorm1d after a Linear is never folded into a conv: it adds no zeros.
        assert counted.bn_fold_extra_zeros == 0


def test_a_per_channel_factor_folded_by_a_simplifier_is_matched_by_fit(exported):
    # onnxsim folds FastViT's layer scale (a per-channel Mul after the conv) into the weight: the factor
    # is not the BatchNorm's, so it is fitted from the graph, and a lost zero is still reported.
    _, graph, counted = exported
    entry = next(e for e in account_zeros(graph, counted).layers if e.layer == "conv1.weight")
    factor = np.linspace(2.0, 3.0, 8, dtype=np.float32).reshape(8, 1, 1, 1)
    rescaled = _graph_with(graph, entry.onnx[0], lambda a: np.multiply(a, factor, out=a))
    account = account_zeros(rescaled, counted)
    assert account.ok, account.problem
    assert next(e for e in account.layers if e.layer == "conv1.weight").how == "scaled (fitted)"

    def rescale_and_lose_a_zero(a: np.ndarray) -> None:
        np.multiply(a, factor, out=a)
        _set_first(a, a == 0, 1.0)

    damaged = account_zeros(_graph_with(graph, entry.onnx[0], rescale_and_lose_a_zero), counted)
    assert "zeros of layer conv1.weight" in damaged.problem and "lost 1 of" in damaged.problem

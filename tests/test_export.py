"""ONNX export: zeros survive export + simplification, outputs match PyTorch, failures leave no file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import timm
import torch
from edgeprune.export import export_onnx, onnx_weight_sparsity, prunable_onnx_weights
from torch import nn
from torch.nn.utils import parametrize

from edgeprune.errors import EdgepruneError

torch.set_num_threads(1)


def _zero_fraction(model: nn.Module, fraction: float, types=(nn.Conv2d, nn.Linear)) -> None:
    """Zero the smallest-magnitude ``fraction`` of every conv/linear weight (unstructured, per layer)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, types):
                w = module.weight
                k = int(fraction * w.numel())
                if k:
                    threshold = w.abs().flatten().kthvalue(k).values
                    w[w.abs() <= threshold] = 0


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and non-zero scales, so BN folding really changes the conv weights."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _count_torch(model: nn.Module) -> tuple[int, int]:
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)


@pytest.fixture(scope="module")
def sparse_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    _randomize_bn(model)
    _zero_fraction(model, 0.8, types=(nn.Conv2d,))
    return model.eval()


def test_cnn_keeps_every_zero_and_matches_pytorch(sparse_cnn, tmp_path):
    zeros, total = _count_torch(sparse_cnn)
    assert zeros / total > 0.75  # the fixture really is sparse
    example = torch.randn(1, 3, 32, 32)
    check = torch.randn(6, 3, 32, 32)  # another batch size: the batch axis must be dynamic
    result = export_onnx(sparse_cnn, example, tmp_path / "m.onnx", check_inputs=check)

    assert result.path.exists() and result.onnx_bytes == result.path.stat().st_size
    assert result.simplified
    assert (result.zeros_torch, result.prunable_torch) == (zeros, total)
    assert result.zeros_onnx == result.zeros_torch
    assert result.prunable_onnx == result.prunable_torch
    assert onnx_weight_sparsity(result.path) == (zeros, total)
    assert result.parity_max_abs_diff <= 1e-4
    # BN was folded: no BatchNormalization left, and the Conv weights are no longer the raw PyTorch ones.
    graph = onnx.load(str(result.path)).graph
    assert "BatchNormalization" not in {n.op_type for n in graph.node}
    assert result.opset >= 17
    onnx.checker.check_model(str(result.path))
    assert not list(tmp_path.glob("*.tmp"))


def test_vit_keeps_every_zero_and_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10).eval()
    _zero_fraction(model, 0.5)
    zeros, total = _count_torch(model)
    result = export_onnx(
        model, torch.randn(1, 3, 32, 32), tmp_path / "vit.onnx", check_inputs=torch.randn(3, 3, 32, 32)
    )
    assert (result.zeros_onnx, result.prunable_onnx) == (zeros, total)
    assert result.parity_max_abs_diff <= 1e-4
    # every Linear of the ViT shows up as a prunable ONNX weight
    assert len(prunable_onnx_weights(result.path)) == sum(
        isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()
    )


def test_zero_scale_batchnorm_adds_expected_zeros(tmp_path):
    # timm zero-initialises the last BN of each residual block: folding it zeroes the conv rows before it.
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10).eval()
    result = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", simplify=False)
    dead_rows = sum(
        int((blk.conv2.weight[blk.bn2.weight == 0] != 0).sum())
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
        for blk in stage
    )
    assert dead_rows > 0
    assert result.bn_fold_extra_zeros == dead_rows
    assert result.zeros_onnx == result.zeros_torch + dead_rows
    assert not result.simplified


def test_caller_model_untouched_and_masks_folded(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))

    class Mask(nn.Module):
        def __init__(self, mask: torch.Tensor):
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, w):
            return w * self.mask

    mask = (torch.rand(4, 8 * 6 * 6) > 0.7).float()
    parametrize.register_parametrization(model[3], "weight", Mask(mask))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    assert model.training  # still in train mode
    assert parametrize.is_parametrized(model[3])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.zeros_onnx == int((mask == 0).sum()) + int((model[0].weight == 0).sum())
    # only plain initializers in the graph: the mask was folded into the weight
    weights = prunable_onnx_weights(result.path)
    assert len(weights) == 2
    assert any(
        np.array_equal(w == 0, (mask == 0).numpy()) or np.array_equal(w.T == 0, (mask == 0).numpy())
        for w in weights.values()
    )


class _Unfaithful(nn.Module):
    """Adds a random number read through ``.item()``: tracing freezes it, so ONNX != PyTorch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.flatten(1)) + float(torch.rand(()).item()) + 1.0


def test_parity_failure_raises_and_leaves_no_file(tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(EdgepruneError, match="differs from PyTorch"):
        export_onnx(_Unfaithful(), torch.randn(2, 3, 2, 2), out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_artifact_survives_a_failed_export(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous good artifact")
    with pytest.raises(EdgepruneError):
        export_onnx(_Unfaithful(), torch.randn(2, 3, 2, 2), out)
    assert out.read_bytes() == b"previous good artifact"


def test_unwritable_output_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(EdgepruneError, match="cannot write"):
        export_onnx(model, torch.randn(1, 3, 2, 2), blocker / "sub" / "m.onnx")


def test_metadata_and_opset_are_written(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    result = export_onnx(model, torch.randn(1, 3, 2, 2), tmp_path / "m.onnx", opset=18, metadata={"k": "v"})
    loaded = onnx.load(str(result.path))
    props = {p.key: p.value for p in loaded.metadata_props}
    assert props["edgeprune.k"] == "v"  # un-namespaced keys are edgeprune's
    assert props["edgeprune.precision"] == "fp32" and len(props["edgeprune.weights_sha256"]) == 64
    assert max(o.version for o in loaded.opset_import if o.domain in ("", "ai.onnx")) == 18
    with pytest.raises(EdgepruneError, match="opset"):
        export_onnx(model, torch.randn(1, 3, 2, 2), tmp_path / "old.onnx", opset=13)


def test_fixed_batch_export_is_checked_and_verifiable(tmp_path):
    from edgeprune.export import verify_artifact

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()
    result = export_onnx(
        model, torch.randn(1, 3, 6, 6), tmp_path / "b1.onnx", check_inputs=torch.randn(5, 3, 6, 6), dynamic_batch=False
    )
    dims = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1  # really a fixed batch of one
    assert result.parity_max_abs_diff <= 1e-4
    assert verify_artifact(result.path, model=model, inputs=torch.randn(3, 3, 6, 6)).ok

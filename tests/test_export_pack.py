"""Sparse packing (int32-index sparse initializers), ORT format, and the sizes they reach at 90 % sparsity."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from edgeprune.export import (
    describe_artifact,
    export_onnx,
    onnx_weight_sparsity,
    pack_sparse,
    read_metadata,
    to_ort_format,
    unpack_dense,
    weights_digest,
)
from edgeprune.export.ship import ship_artifacts
from torch import nn

import edgeprune.zoo  # noqa: F401  (registers fmnist_resnet, the demo architecture, in timm)

from .test_export import _randomize_bn, _zero_fraction

torch.set_num_threads(1)


def _run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def shipped90(demo_data, tmp_path_factory):
    """The demo architecture, dense and 90 %-sparse (every conv/linear), shipped as INT8 + sparse-packed."""
    folder = tmp_path_factory.mktemp("pack")
    torch.manual_seed(0)
    model = timm.create_model("fmnist_resnet").eval()
    _randomize_bn(model)  # no zero BN scales: sparsity is exactly the pruned 90 %
    x = demo_data.eval_x
    export_onnx(model, x[:1], folder / "dense.onnx", check_inputs=x[:16])
    _zero_fraction(model, 0.9)
    export_onnx(model, x[:1], folder / "model.onnx", check_inputs=x[:16])
    dense_stored = folder / "dense_stored"
    dense_stored.mkdir()
    ship_artifacts(folder / "model.onnx", target="arm64", quantize="int8", calibration=demo_data.calib_x[:64])
    for name in ("model.onnx", "model.int8.onnx"):  # keep the dense-stored versions for comparison
        (dense_stored / name).write_bytes((folder / name).read_bytes())
    shipped = ship_artifacts(
        folder / "model.onnx",
        target="arm64",
        quantize="int8",
        pack="sparse",
        ort_format=True,
        calibration=demo_data.calib_x[:64],
        baseline=folder / "dense.onnx",
    )
    return folder, dense_stored, shipped


def test_packed_outputs_equal_dense_stored(shipped90, demo_data):
    folder, dense_stored, _ = shipped90
    x = demo_data.eval_x[:64].numpy()
    for name in ("model.onnx", "model.int8.onnx"):
        packed = onnx.load(str(folder / name))
        assert len(packed.graph.sparse_initializer) > 0
        assert all(s.indices.data_type == onnx.TensorProto.INT32 for s in packed.graph.sparse_initializer)
        np.testing.assert_array_equal(_run(folder / name, x), _run(dense_stored / name, x))  # bit for bit
        # same weights: the densified twin has the dense-stored file's zeros, and passes the checker
        assert onnx_weight_sparsity(packed) == onnx_weight_sparsity(dense_stored / name)
        onnx.checker.check_model(unpack_dense(packed))
        meta = read_metadata(packed)
        assert meta["packing"] == "sparse" and meta["weights_sha256"] == weights_digest(packed)


def test_size_targets_at_90_percent(shipped90):
    folder, _, shipped = shipped90
    zeros, total = onnx_weight_sparsity(folder / "model.onnx")
    assert abs(zeros / total - 0.9) < 0.001
    fp32, int8 = shipped.sizes["model.onnx"], shipped.sizes["model.int8.onnx"]
    assert shipped.baseline_bytes == (folder / "dense.onnx").stat().st_size
    assert fp32.bytes == (folder / "model.onnx").stat().st_size
    # issue targets, as fractions of the dense FP32 dense.onnx: packed FP32 <= 22 %, packed INT8 <= 14 %
    assert fp32.ratio <= 0.22, fp32
    assert int8.ratio <= 0.14, int8
    # floors: 8 and 5 bytes per nonzero (20 % / 12.5 % at 90 %); nothing packs below them
    assert 0.19 < fp32.floor_ratio < fp32.ratio and 0.12 < int8.floor_ratio < int8.ratio
    assert fp32.gzip_bytes < fp32.bytes and int8.gzip_bytes < int8.bytes


def test_ort_format_files_run_and_match(shipped90, demo_data):
    folder, dense_stored, shipped = shipped90
    assert [p.name for p in shipped.ort] == ["model.ort", "model.int8.ort"]
    x = demo_data.eval_x[:32].numpy()
    np.testing.assert_allclose(_run(folder / "model.ort", x), _run(dense_stored / "model.onnx", x), atol=1e-5)
    # INT8 kernels may be fused differently in the saved ORT graph: same predictions, outputs close
    a, b = _run(folder / "model.int8.ort", x), _run(dense_stored / "model.int8.onnx", x)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95 and np.abs(a - b).max() < 0.1 * np.abs(b).max()
    assert folder.joinpath("model.ort").read_bytes()[4:8] == b"ORTM"  # the ORT flatbuffer identifier
    assert read_metadata(folder / "model.ort")["precision"] == "fp32"
    assert describe_artifact(folder / "model.ort")["format"] == "ort"


def test_packing_a_vit_keeps_outputs(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10).eval()
    _zero_fraction(model, 0.9)
    x = torch.randn(3, 3, 32, 32)
    export_onnx(model, x[:1], tmp_path / "vit.onnx")
    result = pack_sparse(tmp_path / "vit.onnx", tmp_path / "vit.packed.onnx")
    assert result.packed_tensors == sum(isinstance(m, nn.Linear) for m in model.modules()) + 1  # + patch conv
    assert result.ratio < 0.25
    np.testing.assert_array_equal(_run(tmp_path / "vit.packed.onnx", x.numpy()), _run(tmp_path / "vit.onnx", x.numpy()))
    info = describe_artifact(tmp_path / "vit.packed.onnx")
    assert info["packing"] == "sparse" and info["checks"]["weights_sha256_ok"]


def test_ort_conversion_refuses_a_broken_file(tmp_path):
    from edgeprune.errors import EdgepruneError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(EdgepruneError):
        to_ort_format(bad, tmp_path / "bad.ort")
    assert not (tmp_path / "bad.ort").exists()

"""Artifact metadata round-trips, and `describe_artifact` recounts sparsity from the weights."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from edgeprune.export import build_metadata, describe_artifact, export_onnx, read_metadata, weights_digest
from edgeprune.export.metadata import reference_inputs, reference_mismatch
from onnx import numpy_helper
from torch import nn

from edgeprune import __version__
from edgeprune.errors import EdgepruneError

from .test_export import _zero_fraction

torch.set_num_threads(1)


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()  # fmt: skip


@pytest.fixture()
def artifact(tmp_path):
    model = _small_cnn()
    _zero_fraction(model, 0.6)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    layers = {"0": 0.6, "2": 0.6, "6": 0.6}
    meta = build_metadata(
        source_model="pkg.mod:small_cnn",
        strategy="p50",
        signal="product",
        global_sparsity=sparsity,
        layer_sparsity=layers,
        target="arm64",
        calibration_size=123,
    )
    result = export_onnx(model, torch.randn(1, 1, 8, 8), tmp_path / "model.onnx", metadata=meta)
    return result, layers, sparsity


def test_metadata_round_trips(artifact):
    result, layers, sparsity = artifact
    meta = read_metadata(result.path)
    assert meta["version"] == __version__
    assert meta["source_model"] == "pkg.mod:small_cnn"
    assert (meta["strategy"], meta["signal"], meta["target"]) == ("p50", "product", "arm64")
    assert meta["global_sparsity"] == pytest.approx(sparsity, abs=1e-6) and 0.59 < sparsity <= 0.6
    assert meta["layer_sparsity"] == layers
    assert meta["calibration_size"] == 123
    assert meta["precision"] == "fp32" and meta["packing"] == "dense"
    assert meta["reference"]["shape"] == [2, 1, 8, 8] and meta["reference"]["source"] == "pytorch"
    # every value is a plain string in the file itself (what other tools see)
    raw = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert json.loads(raw["edgeprune.layer_sparsity"]) == layers


def test_describe_recounts_sparsity_from_the_weights(artifact):
    result, _, sparsity = artifact
    info = describe_artifact(result.path)
    assert info["recount"]["zeros"] == result.zeros_onnx and info["recount"]["prunable"] == result.prunable_onnx
    assert [layer["shape"] for layer in info["recount"]["layers"]] == [[8, 1, 3, 3], [8, 8, 3, 3], [5, 8]]
    assert all(abs(layer["sparsity"] - 0.6) < 0.02 for layer in info["recount"]["layers"])
    assert info["checks"] == {
        "weights_sha256_ok": True,
        "sparsity_recorded": pytest.approx(sparsity, abs=1e-6),
        "sparsity_ok": True,
    }
    assert info["inputs"][0]["shape"] == ["batch", 1, 8, 8] and info["precision"] == "fp32"
    assert info["bytes"] == result.onnx_bytes and 0 < info["gzip_bytes"] < info["bytes"]


def test_describe_notices_tampered_weights(artifact, tmp_path):
    result, _, sparsity = artifact
    model = onnx.load(str(result.path))
    init = next(i for i in model.graph.initializer if len(i.dims) == 4)
    w = numpy_helper.to_array(init).copy()
    w[w == 0] = 0.5  # fill in the pruned weights, leave the metadata alone
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(tmp_path / "tampered.onnx"))
    info = describe_artifact(tmp_path / "tampered.onnx")
    assert info["checks"]["weights_sha256_ok"] is False
    assert info["checks"]["sparsity_ok"] is False  # fewer zeros than recorded
    assert weights_digest(model) != read_metadata(result.path)["weights_sha256"]


def test_reference_outputs_are_reproducible(artifact):
    import onnxruntime as ort

    result, _, sparsity = artifact
    ref = read_metadata(result.path)["reference"]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": reference_inputs(ref["shape"])})
    assert reference_mismatch(ref, out) <= 1.0
    assert reference_mismatch(ref, [o + 1.0 for o in out]) > 1.0
    assert reference_mismatch(ref, out + out) == float("inf")


def test_missing_or_damaged_artifact_is_a_user_error(tmp_path):
    with pytest.raises(EdgepruneError, match="not found"):
        describe_artifact(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(EdgepruneError, match="not a readable ONNX model"):
        read_metadata(bad)

"""`edgeprune export` end to end: checkpoint in, verified FP32 / INT8 / packed / ORT artifacts out."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from edgeprune.export import onnx_weight_sparsity, read_metadata

import edgeprune.zoo  # noqa: F401  (registers fmnist_resnet in timm)
from edgeprune.data import load_data
from edgeprune.outdir import MANIFEST, read_manifest

from .test_export import _randomize_bn, _zero_fraction
from .test_export_verify import run_cli

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 80 %-sparse fmnist_resnet state_dict, as a user's pruned checkpoint would be."""
    torch.manual_seed(0)
    model = timm.create_model("fmnist_resnet")
    _randomize_bn(model)
    _zero_fraction(model, 0.8)
    path = tmp_path_factory.mktemp("ckpt") / "pruned.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_export_writes_every_verified_artifact(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["export", "--model", "fmnist_resnet", "--checkpoint", str(checkpoint), "--out", str(out)]
    args += ["--calib-size", "64", "--eval-size", "100", "--quantize", "int8", "--pack", "sparse", "--ort-format"]
    assert run_cli([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    names = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    assert names == ["model.int8.onnx", "model.int8.ort", "model.onnx", "model.ort"]  # nothing half-written
    assert read_manifest(out) == names  # the published set, as edgeprune/outdir.py records it

    assert summary["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert summary["parity_max_abs_diff"] <= 1e-4 and summary["zeros_onnx"] == summary["zeros_torch"]
    assert summary["quantize"]["int8_format"] == "qdq_s8s8"  # the arm64 profile's format
    assert summary["quantize"]["zeros_int8"] >= summary["quantize"]["zeros_fp32"]
    assert 0.0 <= summary["int8_accuracy"] <= 1.0 and 0.0 <= summary["fp32_accuracy"] <= 1.0
    sizes = summary["sizes"]
    assert sizes["model.onnx"]["bytes"] == (out / "model.onnx").stat().st_size
    assert sizes["model.onnx"]["ratio"] < 0.5 and sizes["model.int8.onnx"]["ratio"] < sizes["model.onnx"]["ratio"]

    meta = read_metadata(out / "model.int8.onnx")
    assert meta["packing"] == "sparse" and meta["precision"] == "int8" and meta["target"] == "arm64"
    assert meta["source_model"] == "fmnist_resnet (pruned.pth)" and meta["calibration_size"] == 64
    assert onnx_weight_sparsity(out / "model.onnx")[0] == summary["zeros_onnx"]

    # the artifact computes what the checkpoint computes
    model = timm.create_model("fmnist_resnet")
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    x = load_data("demo", calib_size=8, eval_size=16).eval_x
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model.eval()(x).numpy(), atol=1e-4)

    assert run_cli(["verify", str(out / "model.onnx")]) == 0
    assert run_cli(["verify", str(out / "model.ort")]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quantize", "int4"], "--quantize must be int8 or none"),
        (["--pack", "zip"], "--pack must be dense or sparse"),
        (["--target", "sparc"], "unknown target"),
        (["--checkpoint", "/nonexistent/ckpt.pth"], "checkpoint"),
        (["--opset", "11"], "opset"),
    ],
)
def test_export_bad_input_is_one_line_and_leaves_nothing(extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["export", "--model", "fmnist_resnet", "--out", str(out), "--calib-size", "16", "--eval-size", "16"]
    assert run_cli([*args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeprune: error:") and message in err and "\n" not in err
    assert not out.exists() or not any(out.iterdir())

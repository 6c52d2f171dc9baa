"""The verification gate on this machine: good artifacts pass, damaged ones fail with the check named."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from edgeprune.export import export_onnx, require_ok, verify_artifact
from onnx import numpy_helper

from edgeprune.cli import main
from edgeprune.errors import EdgepruneError

from .test_export_metadata import _small_cnn

torch.set_num_threads(1)


def run_cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


@pytest.fixture()
def good(tmp_path):
    model = _small_cnn()
    export_onnx(model, torch.randn(1, 1, 8, 8), tmp_path / "model.onnx")
    return model, tmp_path / "model.onnx"


def tamper_weights(src, dst) -> None:
    """A valid ONNX file whose first conv weight was changed after export (metadata untouched)."""
    model = onnx.load(str(src))
    init = next(i for i in model.graph.initializer if len(i.dims) == 4)
    w = numpy_helper.to_array(init).copy()
    w.flat[:5] *= -3.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(dst))


def tamper_graph(src, dst) -> None:
    """Same weights, one ReLU swapped for a Sigmoid: the digest still matches, the outputs do not."""
    model = onnx.load(str(src))
    next(n for n in model.graph.node if n.op_type == "Relu").op_type = "Sigmoid"
    onnx.save(model, str(dst))


def statuses(report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def test_good_artifact_passes_every_check(good):
    model, path = good
    report = verify_artifact(path, model=model, inputs=torch.randn(5, 1, 8, 8))
    assert report.ok and report.precision == "fp32"
    assert statuses(report) == {
        "readable": "ok",
        "onnx.checker": "ok",
        "weights": "ok",
        "sparsity": "ok",
        "onnxruntime": "ok",
        "reference": "ok",
        "pytorch": "ok",
    }
    assert report.pytorch_max_abs_diff <= 1e-4
    assert require_ok(report) is report


def test_tampered_weights_fail(good, tmp_path):
    _, path = good
    tamper_weights(path, tmp_path / "bad.onnx")
    report = verify_artifact(tmp_path / "bad.onnx")
    assert not report.ok
    s = statuses(report)
    assert s["weights"] == "FAILED" and s["reference"] == "FAILED" and s["onnx.checker"] == "ok"
    with pytest.raises(EdgepruneError, match="weights"):
        require_ok(report)


def test_tampered_graph_fails_on_outputs(good, tmp_path):
    model, path = good
    tamper_graph(path, tmp_path / "bad.onnx")
    report = verify_artifact(tmp_path / "bad.onnx", model=model)
    s = statuses(report)
    assert s["weights"] == "ok" and s["reference"] == "FAILED" and s["pytorch"] == "FAILED"


def test_truncated_file_fails_to_read(good, tmp_path):
    _, path = good
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    report = verify_artifact(tmp_path / "cut.onnx")
    assert statuses(report) == {"readable": "FAILED"}


def test_foreign_onnx_is_checked_without_edgeprune_metadata(good, tmp_path):
    _, path = good
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "plain.onnx"))
    report = verify_artifact(tmp_path / "plain.onnx", inputs=np.zeros((2, 1, 8, 8), np.float32))
    s = statuses(report)
    assert report.ok and s["weights"] == "skipped" and s["reference"] == "skipped"


def test_verify_cli_exit_codes(good, tmp_path, capsys):
    _, path = good
    assert run_cli(["verify", str(path), "--target", "x86_64"]) == 0
    assert "ok" in capsys.readouterr().out
    tamper_weights(path, tmp_path / "bad.onnx")
    assert run_cli(["verify", str(tmp_path / "bad.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeprune: error:") and "failed verification" in err and "\n" not in err
    assert run_cli(["verify", str(tmp_path / "missing.onnx")]) == 2
    assert "artifact not found" in capsys.readouterr().err
    assert run_cli(["verify", str(path), "--target", "sparc"]) == 2
    assert "unknown target" in capsys.readouterr().err

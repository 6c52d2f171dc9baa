"""INT8 (static QDQ, per-channel) through onnxruntime: accuracy kept, zeros kept, format from the target."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from edgeprune.export import (
    INT8_FORMATS,
    NumpyCalibrationReader,
    export_onnx,
    onnx_accuracy,
    prunable_onnx_weights,
    quantize_int8,
)
from edgeprune.export.ship import ship_artifacts
from onnx import numpy_helper

from edgeprune.errors import EdgepruneError
from edgeprune.models import load_model
from edgeprune.recovery import recalibrate_bn

from .test_export import _zero_fraction

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sparse_demo(demo_data, tmp_path_factory):
    """The bundled demo model with half of every conv/linear weight zeroed (BN re-calibrated), as FP32 ONNX."""
    model = load_model("demo")
    _zero_fraction(model, 0.5)
    recalibrate_bn(model, demo_data.calib_x)
    model.eval()
    path = tmp_path_factory.mktemp("int8") / "model.onnx"
    export_onnx(model, demo_data.eval_x[:1], path, check_inputs=demo_data.eval_x[:32])
    return path


def _zero_masks_kept(fp32_path, int8_path) -> int:
    """Assert every FP32 zero dequantizes to exactly 0.0 in the INT8 graph; return how many were compared."""
    before = prunable_onnx_weights(onnx.load(str(fp32_path)))
    after = prunable_onnx_weights(onnx.load(str(int8_path)))
    assert len(after) == len(before)
    # INT8 weights are stored as <name>_quantized (names may change in pre-processing: match by shape order).
    compared = 0
    by_shape: dict[tuple, list[np.ndarray]] = {}
    for w in after.values():
        by_shape.setdefault(w.shape, []).append(w)
    for w in before.values():
        candidates = by_shape[w.shape]
        # the INT8 twin is the one whose nonzero pattern contains this weight's nonzeros
        match = [c for c in candidates if np.all((c != 0) <= (w != 0))]
        assert match, "a weight lost zeros in quantization"
        compared += int((w == 0).sum())
    return compared


def test_demo_int8_keeps_accuracy_and_zeros(sparse_demo, demo_data, tmp_path):
    out = tmp_path / "model.int8.onnx"
    result = quantize_int8(
        sparse_demo, out, demo_data.calib_x, int8_format="qdq_s8s8", check_inputs=demo_data.eval_x[:200]
    )
    acc32 = onnx_accuracy(sparse_demo, demo_data.eval_x, demo_data.eval_y)
    acc8 = onnx_accuracy(out, demo_data.eval_x, demo_data.eval_y)
    assert acc32 > 0.8  # the demo model is trained; half-pruned it still classifies
    assert abs(acc8 - acc32) <= 0.01, (acc32, acc8)
    assert result.top1_agreement >= 0.97
    # zeros: the quantizer's own count and an independent look at the dequantized weights
    assert result.zeros_int8 >= result.zeros_fp32 > 0.45 * result.prunable
    assert _zero_masks_kept(sparse_demo, out) == result.zeros_fp32
    graph = onnx.load(str(out))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["edgeprune.precision"] == "int8" and meta["edgeprune.int8_format"] == "qdq_s8s8"
    assert meta["edgeprune.calibration_size"] == str(len(demo_data.calib_x))


@pytest.mark.parametrize("fmt", sorted(INT8_FORMATS))
def test_each_format_stores_its_types_per_channel(fmt, sparse_demo, demo_data, tmp_path):
    out = tmp_path / f"{fmt}.onnx"
    result = quantize_int8(sparse_demo, out, demo_data.calib_x[:64], int8_format=fmt)
    assert result.zeros_int8 >= result.zeros_fp32
    graph = onnx.load(str(out)).graph
    inits = {i.name: i for i in graph.initializer}
    act_type, weight_type, reduce_range = INT8_FORMATS[fmt]
    want_act = onnx.TensorProto.INT8 if act_type.name == "QInt8" else onnx.TensorProto.UINT8
    want_w = onnx.TensorProto.INT8 if weight_type.name == "QInt8" else onnx.TensorProto.UINT8
    q_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert q_nodes and all(inits[n.input[2]].data_type == want_act for n in q_nodes)
    weights = [inits[n] for n in inits if n.endswith("_quantized") and inits[n].dims and len(inits[n].dims) >= 2]
    assert weights and all(w.data_type == want_w for w in weights)
    conv_w = next(w for w in weights if len(w.dims) == 4)
    dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == conv_w.name)
    scale = numpy_helper.to_array(inits[dq.input[1]])
    assert scale.shape == (conv_w.dims[0],)  # one scale per output channel
    q = numpy_helper.to_array(conv_w).astype(np.int32)
    zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int32).reshape(-1, 1, 1, 1)
    if reduce_range:  # 7-bit weights: |q - zp| <= 64 so AVX2 without VNNI cannot saturate
        assert np.abs(q - zp).max() <= 64
    else:
        assert np.abs(q - zp).max() > 64


def test_target_profile_picks_the_format(sparse_demo, demo_data, tmp_path):
    import shutil

    for target, fmt in (("x86_64", "qdq_u8s8_reduce_range"), ("arm64", "qdq_s8s8")):
        folder = tmp_path / target
        folder.mkdir()
        shutil.copy(sparse_demo, folder / "model.onnx")
        shipped = ship_artifacts(folder / "model.onnx", target=target, calibration=demo_data.calib_x[:32])
        assert shipped.quantize is not None and shipped.quantize.int8_format == fmt
        assert (folder / "model.int8.onnx").exists()
    # rpi4's profile says INT8 is not worth it there: no INT8 by default
    folder = tmp_path / "rpi4"
    folder.mkdir()
    shutil.copy(sparse_demo, folder / "model.onnx")
    assert ship_artifacts(folder / "model.onnx", target="rpi4").int8 is None
    assert not (folder / "model.int8.onnx").exists()


def test_calibration_reader_feeds_every_image_then_rewinds():
    images = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    reader = NumpyCalibrationReader(images, "input", batch_size=4)
    batches = list(iter(reader.get_next, None))
    assert [len(b["input"]) for b in batches] == [4, 4, 2] and len(reader) == 3
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), images)
    reader.rewind()
    assert reader.get_next()["input"].shape == (4, 2)


def test_bad_requests_fail_before_writing(sparse_demo, demo_data, tmp_path):
    out = tmp_path / "q.onnx"
    with pytest.raises(EdgepruneError, match="unknown INT8 format"):
        quantize_int8(sparse_demo, out, demo_data.calib_x[:8], int8_format="int4")
    with pytest.raises(EdgepruneError, match="calibration images"):
        quantize_int8(sparse_demo, out, np.zeros((0, 1, 28, 28), np.float32))
    with pytest.raises(EdgepruneError, match="calibration images"):
        ship_artifacts(sparse_demo, target="arm64", quantize="int8", calibration=None)
    assert not out.exists() and not list(tmp_path.iterdir())

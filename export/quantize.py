"""INT8 post-training quantization with onnxruntime: static, QDQ, per-channel weights, zeros kept.

The format comes from the target profile (``Target.int8_format``):

- ``qdq_s8s8``: int8 activations and weights (what Arm NEON / dot-product kernels want);
- ``qdq_u8s8_reduce_range``: uint8 activations, 7-bit int8 weights, so x86 AVX2 without VNNI does not
  saturate its 16-bit intermediate sums (``vpmaddubsw``);
- ``qdq_u8u8``: uint8 activations and weights, the other way around that saturation.

Weights are quantized symmetrically per output channel, so a zero weight is stored as the zero point and
dequantizes to exactly 0.0; `quantize_int8` checks that for every weight before writing anything.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from edgeprune.errors import EdgepruneError

from .metadata import (
    PREFIX,
    REFERENCE_BATCH,
    load_artifact,
    raw_metadata,
    reference_entry,
    reference_inputs,
    set_metadata,
    weights_digest,
)
from .onnx_export import _check_writable, make_session, run_onnx, write_atomic
from .pack import unpack_dense
from .sparsity import prunable_onnx_weights

log = logging.getLogger(__name__)

# format name -> (activation type, weight type, reduce_range)
INT8_FORMATS: dict[str, tuple[QuantType, QuantType, bool]] = {
    "qdq_s8s8": (QuantType.QInt8, QuantType.QInt8, False),
    "qdq_u8s8_reduce_range": (QuantType.QUInt8, QuantType.QInt8, True),
    "qdq_u8u8": (QuantType.QUInt8, QuantType.QUInt8, False),
}


class NumpyCalibrationReader(CalibrationDataReader):
    """Feeds ``images`` (N, C, H, W float32, already normalized) to the calibrator in batches."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int = 16):
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.input_name = input_name
        self.batch_size = max(1, int(batch_size))
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.images):
            return None
        batch = self.images[self._next : self._next + self.batch_size]
        self._next += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size


@dataclass
class QuantizeResult:
    path: Path
    onnx_bytes: int
    int8_format: str
    calibration_size: int
    zeros_fp32: int  # zeros in the FP32 prunable weights
    zeros_int8: int  # zeros in the dequantized INT8 weights (>= zeros_fp32: a tiny weight may round to 0)
    prunable: int
    top1_agreement: float  # fraction of check inputs where INT8 and FP32 pick the same class
    max_abs_diff: float  # max |INT8 - FP32| over the check inputs' outputs
    preprocessed: bool  # whether onnxruntime's quant_pre_process (shape inference + folding) ran


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_zeros_kept(fp32: onnx.ModelProto, int8: onnx.ModelProto) -> tuple[int, int, int]:
    """Every FP32 zero must be an INT8 zero after dequantization. Returns (zeros_fp32, zeros_int8, total)."""
    before = prunable_onnx_weights(fp32)
    after = prunable_onnx_weights(int8)
    zeros_fp32 = sum(int(np.count_nonzero(w == 0)) for w in before.values())
    zeros_int8 = sum(int(np.count_nonzero(w == 0)) for w in after.values())
    total = sum(w.size for w in before.values())
    if sum(w.size for w in after.values()) != total:
        raise EdgepruneError(
            "INT8 quantization changed the set of prunable weights; quantize with --quantize none for this model"
        )
    lost = 0
    for name, w in after.items():
        base = name[: -len("_quantized")] if name.endswith("_quantized") else name
        if base in before and before[base].shape == w.shape:
            lost += int(np.count_nonzero((before[base] == 0) & (w != 0)))
    if lost or zeros_int8 < zeros_fp32:
        raise EdgepruneError(
            f"INT8 quantization lost {max(lost, zeros_fp32 - zeros_int8)} zero weights; the INT8 artifact "
            "would not be sparse; report this model or use --quantize none"
        )
    return zeros_fp32, zeros_int8, total


def top1_agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Fraction of rows whose argmax over the first output agrees (1.0 for non-classifier outputs)."""
    x, y = a[0], b[0]
    if x.ndim != 2 or x.shape != y.shape or len(x) == 0:
        return 1.0 if np.array_equal(x, y) else float("nan")
    return float(np.mean(x.argmax(1) == y.argmax(1)))


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray | torch.Tensor,
    *,
    int8_format: str = "qdq_s8s8",
    check_inputs: np.ndarray | torch.Tensor | None = None,
    batch_size: int = 16,
    metadata: dict[str, str] | None = None,
) -> QuantizeResult:
    """Quantize the FP32 artifact ``fp32_path`` to ``out_path`` (static QDQ, per-channel weights).

    ``calibration``: normalized images (N, C, H, W) from the user's calibration split. ``check_inputs``
    (default: the calibration images) measure INT8/FP32 top-1 agreement. Raises `EdgepruneError` and
    writes nothing if a zero is lost, the graph is invalid, or onnxruntime cannot run it.
    """
    if int8_format not in INT8_FORMATS:
        raise EdgepruneError(f"unknown INT8 format '{int8_format}'; choose one of: {', '.join(INT8_FORMATS)}")
    calib = _as_numpy(calibration)
    if calib.ndim < 2 or len(calib) == 0:
        raise EdgepruneError("INT8 quantization needs calibration images; pass --data with at least one image")
    check = calib if check_inputs is None else _as_numpy(check_inputs)
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    _check_writable(out_path)
    activation_type, weight_type, reduce_range = INT8_FORMATS[int8_format]

    fp32 = unpack_dense(load_artifact(fp32_path))
    input_name = fp32.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix=".edgeprune-int8-", dir=out_path.parent) as tmp:
        src = Path(tmp) / "fp32.onnx"
        onnx.save(fp32, str(src))
        pre = Path(tmp) / "pre.onnx"
        preprocessed = _preprocess(src, pre)
        if not preprocessed:
            pre = src
        q_path = Path(tmp) / "int8.onnx"
        reader = NumpyCalibrationReader(calib, input_name, batch_size)
        try:
            quantize_static(
                str(pre),
                str(q_path),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=activation_type,
                weight_type=weight_type,
                reduce_range=reduce_range,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"WeightSymmetric": True, **_chunking(len(reader))},
            )
        except Exception as exc:  # onnxruntime raises plain Exceptions for unsupported graphs
            raise EdgepruneError(f"INT8 quantization failed: {str(exc)[:300]}; use --quantize none") from exc
        int8 = onnx.load(str(q_path))
        zeros_fp32, zeros_int8, total = _check_zeros_kept(onnx.load(str(pre)), int8)

    try:
        onnx.checker.check_model(int8)
        q_session = make_session(int8)
    except Exception as exc:
        raise EdgepruneError(f"the INT8 graph does not load: {str(exc)[:300]}") from exc
    fp32_session = make_session(fp32)
    got, want = run_onnx(q_session, check), run_onnx(fp32_session, check)
    if not all(np.isfinite(g).all() for g in got):
        raise EdgepruneError("the INT8 model produces NaN or Inf; use --quantize none")
    diff = max(float(np.max(np.abs(g - w), initial=0.0)) for g, w in zip(got, want, strict=True))
    agreement = top1_agreement(got, want)

    shape = [REFERENCE_BATCH, *calib.shape[1:]]
    reference = run_onnx(q_session, reference_inputs(shape))
    scale = max(float(np.max(np.abs(r), initial=0.0)) for r in reference)
    entries = {
        **raw_metadata(fp32),
        **(metadata or {}),
        PREFIX + "precision": "int8",
        PREFIX + "int8_format": int8_format,
        PREFIX + "calibration_size": str(len(calib)),
        PREFIX + "packing": "dense",
        PREFIX + "weights_sha256": weights_digest(int8),
        # INT8 kernels differ across CPUs (VNNI, dot-product, reduce_range): a loose tolerance, in units of
        # the output's scale, that still catches a wrong or damaged graph.
        PREFIX + "reference": reference_entry(shape, reference, atol=0.05 * scale + 1e-3, rtol=0.0, source="ort-int8"),
    }
    set_metadata(int8, entries)
    size = write_atomic(int8, out_path)
    return QuantizeResult(
        path=out_path,
        onnx_bytes=size,
        int8_format=int8_format,
        calibration_size=len(calib),
        zeros_fp32=zeros_fp32,
        zeros_int8=zeros_int8,
        prunable=total,
        top1_agreement=agreement,
        max_abs_diff=diff,
        preprocessed=preprocessed,
    )


def _chunking(n_batches: int) -> dict[str, int]:
    """Have the calibrator merge ranges every few batches, so memory stays bounded on big calibration sets.

    onnxruntime 1.32 fails ("No data is collected") when the batch count is a multiple of the chunk, so
    pick a chunk that does not divide it.
    """
    for chunk in (4, 5, 3, 7, 11):
        if n_batches % chunk:
            return {"CalibMaxIntermediateOutputs": chunk}
    return {}


def _preprocess(src: Path, dst: Path) -> bool:
    """onnxruntime's recommended pre-quantization pass; optional (skipped if it fails)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
        return True
    except Exception as exc:
        log.warning("quant_pre_process failed (%s); quantizing the graph as exported", exc)
        return False


def onnx_hits(
    path_or_model: str | Path | onnx.ModelProto,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    threads: int | None = None,
) -> np.ndarray:
    """Per image, whether an ONNX/ORT artifact's top-1 class (onnxruntime, CPU) is the label: the accuracy
    is its mean; two models' hits on the same images give a paired comparison."""
    source = str(path_or_model) if isinstance(path_or_model, Path) else path_or_model
    session = make_session(source, threads)
    logits = run_onnx(session, _as_numpy(images))[0]
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return logits.argmax(1) == y


def onnx_accuracy(
    path_or_model: str | Path | onnx.ModelProto,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    threads: int | None = None,
) -> float:
    """Top-1 accuracy of an ONNX/ORT artifact through onnxruntime (CPU)."""
    hits = onnx_hits(path_or_model, images, labels, threads)
    return float(np.mean(hits)) if len(hits) else 0.0

"""edgeprune.export: ONNX export with zeroed or compacted weights, simplified, verified, packed, quantized.

Stages, one module each: `onnx_export` (PyTorch -> verified ONNX), `quantize` (INT8 QDQ), `pack` (sparse
initializers, ORT format), `metadata` (what an artifact records about itself), `verify` (the gate, and the
arm64 check under QEMU).
"""

from .metadata import build_metadata, describe_artifact, file_sizes, read_metadata, weights_digest
from .onnx_export import ExportResult, export_onnx
from .pack import PackResult, pack_sparse, to_ort_format, unpack_dense
from .quantize import INT8_FORMATS, NumpyCalibrationReader, QuantizeResult, onnx_accuracy, onnx_hits, quantize_int8
from .sparsity import onnx_layer_sparsity, onnx_weight_sparsity, prunable_onnx_weights, torch_weight_sparsity
from .verify import Check, VerifyReport, require_ok, run_on_arm64, verify_artifact

__all__ = [
    "INT8_FORMATS",
    "Check",
    "ExportResult",
    "NumpyCalibrationReader",
    "PackResult",
    "QuantizeResult",
    "VerifyReport",
    "build_metadata",
    "describe_artifact",
    "export_onnx",
    "file_sizes",
    "onnx_accuracy",
    "onnx_hits",
    "onnx_layer_sparsity",
    "onnx_weight_sparsity",
    "pack_sparse",
    "prunable_onnx_weights",
    "quantize_int8",
    "read_metadata",
    "require_ok",
    "run_on_arm64",
    "to_ort_format",
    "torch_weight_sparsity",
    "unpack_dense",
    "verify_artifact",
    "weights_digest",
]

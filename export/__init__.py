"""edgeprune.export: ONNX export with zeroed or compacted weights, simplified, verified against PyTorch."""

from .onnx_export import ExportResult, export_onnx
from .sparsity import onnx_layer_sparsity, onnx_weight_sparsity, prunable_onnx_weights, torch_weight_sparsity

__all__ = [
    "ExportResult",
    "export_onnx",
    "onnx_layer_sparsity",
    "onnx_weight_sparsity",
    "prunable_onnx_weights",
    "torch_weight_sparsity",
]

"""Counting zeros in the prunable weights of a PyTorch model and of an ONNX graph.

"Prunable" means the weight tensors of convolutions and fully-connected layers (biases excluded), as the
paper counts sparsity. On the ONNX side those are the initializers feeding Conv / ConvTranspose / Gemm /
MatMul, traced back through the nodes a quantizer or exporter puts in between (DequantizeLinear,
Transpose, Identity, Reshape, Cast), so one function counts FP32, INT8 (QDQ) and sparse-packed graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

# ONNX ops whose weight input is a prunable tensor, and which input slots hold it.
_WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
}
# Ops an exporter or quantizer may put between an initializer and its consumer without changing which
# elements are zero.
_PASS_THROUGH = {"DequantizeLinear", "Transpose", "Identity", "Reshape", "Cast", "Squeeze", "Unsqueeze"}

_TORCH_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)
_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class TorchWeightCount:
    """Zeros in the prunable weights a forward pass actually uses."""

    zeros: int
    total: int
    # Extra zeros the exporter will create by folding a BatchNorm whose scale is exactly 0 into the
    # convolution before it (timm zero-initialises the last BN of residual blocks, for instance).
    bn_fold_extra_zeros: int
    names: list[str]


def _load(path_or_model: str | Path | bytes | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    if isinstance(path_or_model, bytes):
        return onnx.load_from_string(path_or_model)
    return onnx.load(str(path_or_model))


def _dense_initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every initializer (dense and sparse) as a dense numpy array, plus Constant node values."""
    arrays: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        arrays[init.name] = numpy_helper.to_array(init)
    for sparse in graph.sparse_initializer:
        arrays[sparse.values.name] = _sparse_to_dense(sparse)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return arrays


def _sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    shape = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(int(np.prod(shape)), dtype=values.dtype)
    if indices.ndim == 2:  # COO [nnz, rank] form: turn into linear indices
        indices = np.ravel_multi_index(tuple(indices.T), shape)
    dense[indices] = values
    return dense.reshape(shape)


def prunable_onnx_weights(path_or_model: str | Path | bytes | onnx.ModelProto) -> dict[str, np.ndarray]:
    """Name -> weight array (dequantized where the graph stores it quantized) for every prunable weight.

    Each source initializer is returned once even when several nodes consume it.
    """
    model = _load(path_or_model)
    graph = model.graph
    arrays = _dense_initializers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    found: dict[str, np.ndarray] = {}
    for node in graph.node:
        for slot in _WEIGHT_SLOTS.get(node.op_type, ()):
            if slot >= len(node.input):
                continue
            name = node.input[slot]
            # Walk back through layout/quantization nodes to the stored tensor.
            chain: list[onnx.NodeProto] = []
            while name not in arrays and name in producer and producer[name].op_type in _PASS_THROUGH:
                chain.append(producer[name])
                name = producer[name].input[0]
            if name not in arrays or name in found:
                continue
            weight = arrays[name]
            if not np.issubdtype(weight.dtype, np.floating) and not any(n.op_type == "DequantizeLinear" for n in chain):
                continue  # integer shape constants fed to MatMul are not weights
            found[name] = _dequantize_through(weight, chain, arrays)
    return found


def _dequantize_through(weight: np.ndarray, chain: list[onnx.NodeProto], arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Apply the DequantizeLinear in ``chain`` (if any) so zeros are judged on real values."""
    for node in chain:
        if node.op_type != "DequantizeLinear":
            continue
        scale = arrays.get(node.input[1])
        zero_point = arrays.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            break
        axis = 1
        for attr in node.attribute:
            if attr.name == "axis":
                axis = attr.i
        q = weight.astype(np.int64)
        zp = np.zeros_like(scale, dtype=np.int64) if zero_point is None else zero_point.astype(np.int64)
        if scale.ndim == 1 and scale.size > 1:  # per-channel
            bshape = [1] * q.ndim
            bshape[axis] = -1
            scale = scale.reshape(bshape)
            zp = zp.reshape(bshape)
        weight = ((q - zp) * scale).astype(np.float32)
    return weight


def onnx_weight_sparsity(path_or_model: str | Path | bytes | onnx.ModelProto) -> tuple[int, int]:
    """(zeros, total) over the Conv/Gemm/MatMul weight initializers of an ONNX model (biases excluded).

    Works on FP32, QDQ-quantized (zeros judged after dequantization) and sparse-packed graphs.
    """
    weights = prunable_onnx_weights(path_or_model)
    zeros = sum(int(np.count_nonzero(w == 0)) for w in weights.values())
    total = sum(int(w.size) for w in weights.values())
    return zeros, total


def onnx_layer_sparsity(path_or_model: str | Path | bytes | onnx.ModelProto) -> dict[str, float]:
    """Initializer name -> fraction of zeros, for every prunable weight of the ONNX model."""
    return {
        name: float(np.count_nonzero(w == 0)) / max(1, w.size)
        for name, w in prunable_onnx_weights(path_or_model).items()
    }


def _torch_weights_of(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    if isinstance(module, _TORCH_PRUNABLE):
        return [("weight", module.weight)]
    if isinstance(module, nn.MultiheadAttention):
        # MHA calls F.multi_head_attention_forward with its tensors directly, so its out_proj Linear
        # never runs its own forward; count its projections here instead.
        names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
        found = [(n, getattr(module, n)) for n in names if getattr(module, n, None) is not None]
        return found + [("out_proj.weight", module.out_proj.weight)]
    return []


@torch.no_grad()
def torch_weight_sparsity(model: nn.Module, example: torch.Tensor) -> TorchWeightCount:
    """Count zeros in the prunable weights that one forward pass on ``example`` uses (model in eval mode).

    Modules that never run (a detached auxiliary head, say) are not in the ONNX graph either, so they are
    left out. Also returns the zeros BatchNorm folding will add (a conv row times a BN scale of 0).
    """
    used: dict[int, tuple[str, nn.Module]] = {}
    conv_by_output: dict[int, nn.Module] = {}
    folds: list[tuple[nn.Module, nn.Module]] = []
    names = {id(m): n for n, m in model.named_modules()}
    hooks = []

    def on_forward(module: nn.Module, inputs: tuple, output: object) -> None:
        used.setdefault(id(module), (names.get(id(module), "?"), module))
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(output, torch.Tensor):
            conv_by_output[id(output)] = module
        if isinstance(module, _TORCH_BN) and inputs and isinstance(inputs[0], torch.Tensor):
            conv = conv_by_output.get(id(inputs[0]))
            if conv is not None:
                folds.append((conv, module))

    for module in model.modules():
        if isinstance(module, _TORCH_PRUNABLE + _TORCH_BN + (nn.MultiheadAttention,)):
            hooks.append(module.register_forward_hook(on_forward))
    try:
        model(example)
    finally:
        for hook in hooks:
            hook.remove()

    seen: set[int] = set()
    zeros = total = 0
    weight_names: list[str] = []
    for name, module in used.values():
        for wname, weight in _torch_weights_of(module):
            if id(weight) in seen:
                continue
            seen.add(id(weight))
            zeros += int((weight == 0).sum())
            total += weight.numel()
            weight_names.append(f"{name}.{wname}")

    extra = 0
    for conv, bn in folds:
        if bn.weight is None:
            continue  # affine=False: the scale 1/sqrt(var+eps) is never 0
        dead = (bn.weight == 0).nonzero().flatten()
        if dead.numel():
            rows = conv.weight[dead]
            extra += int((rows != 0).sum())
    return TorchWeightCount(zeros=zeros, total=total, bn_fold_extra_zeros=extra, names=weight_names)

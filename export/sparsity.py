"""Counting zeros in the prunable weights of a PyTorch model and of an ONNX graph.

"Prunable" means the weight tensors of convolutions and fully-connected layers (biases excluded), as the
paper counts sparsity. On the ONNX side those are the initializers feeding Conv / ConvTranspose / Gemm /
MatMul, traced back through the nodes a quantizer or exporter puts in between (DequantizeLinear,
Transpose, Identity, Reshape, Cast), so one function counts FP32, INT8 (QDQ) and sparse-packed graphs.

`account_zeros` is the export's check: it follows each PyTorch weight to the initializer(s) holding it
(by name, value, transpose or BatchNorm-fold factor) and compares zeros position by position, so legal
rewrites pass and a single lost zero fails naming the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class TorchWeight:
    """One prunable weight as the forward pass used it, in PyTorch's layout (output channels first)."""

    name: str  # "blocks.0.conv_pw.weight"
    values: np.ndarray
    # Output channels whose following BatchNorm has a scale of exactly 0: folding it zeroes the whole row,
    # so zeros gained there are expected (timm zero-initialises the last BN of residual blocks).
    zero_scaled_rows: tuple[int, ...] = ()
    # Per-output-channel factor gamma / sqrt(var + eps) of the eval-mode BatchNorm that reads this conv's
    # output (None: no BatchNorm follows): the exporter folds it in, W' = W * scale[o].
    fold_scale: np.ndarray | None = None


@dataclass
class TorchWeightCount:
    """Zeros in the prunable weights a forward pass actually uses."""

    zeros: int
    total: int
    # Extra zeros the exporter will create by folding a BatchNorm whose scale is exactly 0 into the
    # convolution before it (timm zero-initialises the last BN of residual blocks, for instance).
    bn_fold_extra_zeros: int
    names: list[str]
    weights: list[TorchWeight] = field(default_factory=list)


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

    Each source initializer is returned once even when several nodes consume it, except through an
    Identity alias (the exporter's de-duplication of equal constants), returned under the alias's name.
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
            # An Identity in the chain is an alias the exporter made when it stored equal constants once
            # (two layers pruned to all zeros, say): each alias stands for its own PyTorch weight, so it
            # is counted under its own name, as PyTorch counts both layers.
            aliases = [n.output[0] for n in chain if n.op_type == "Identity"]
            key = aliases[-1] if aliases else name
            if name not in arrays or key in found:
                continue
            weight = arrays[name]
            if not np.issubdtype(weight.dtype, np.floating) and not any(n.op_type == "DequantizeLinear" for n in chain):
                continue  # integer shape constants fed to MatMul are not weights
            found[key] = _dequantize_through(weight, chain, arrays)
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
    left out. Also returns the zeros BatchNorm folding will add (a conv row times a BN scale of 0), and
    each weight's values for `account_zeros`.
    """
    used: dict[int, tuple[str, nn.Module]] = {}
    # id(conv output) -> (conv, that output). The output is held so its id cannot be recycled: with only
    # the id, a later tensor (LeViT's flattened Linear output entering its BatchNorm1d) could land on a
    # freed conv output's address and be taken for it, pairing a 256-channel BN with a 16-channel conv.
    conv_by_output: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    folds: list[tuple[nn.Module, nn.Module]] = []
    names = {id(m): n for n, m in model.named_modules()}
    hooks = []

    def on_forward(module: nn.Module, inputs: tuple, output: object) -> None:
        used.setdefault(id(module), (names.get(id(module), "?"), module))
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(output, torch.Tensor):
            conv_by_output[id(output)] = (module, output)
        if isinstance(module, _TORCH_BN) and inputs and isinstance(inputs[0], torch.Tensor):
            conv, seen_output = conv_by_output.get(id(inputs[0]), (None, None))
            if conv is not None and seen_output is inputs[0] and conv.out_channels == module.num_features:
                folds.append((conv, module))

    for module in model.modules():
        if isinstance(module, _TORCH_PRUNABLE + _TORCH_BN + (nn.MultiheadAttention,)):
            hooks.append(module.register_forward_hook(on_forward))
    try:
        model(example)
    finally:
        for hook in hooks:
            hook.remove()
    conv_by_output.clear()

    dead_rows: dict[int, tuple[int, ...]] = {}
    fold_scales: dict[int, np.ndarray] = {}
    for conv, bn in folds:
        if bn.running_var is None:
            continue  # no running statistics: eval mode normalises by the batch, nothing is folded
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        fold_scales.setdefault(id(conv.weight), (gamma / torch.sqrt(bn.running_var + bn.eps)).float().numpy())
        if bn.weight is None:
            continue  # affine=False: the scale 1/sqrt(var+eps) is never 0
        dead = tuple(int(i) for i in (bn.weight == 0).nonzero().flatten())
        if dead:
            dead_rows[id(conv.weight)] = tuple(sorted(set(dead_rows.get(id(conv.weight), ())) | set(dead)))

    seen: set[int] = set()
    zeros = total = extra = 0
    weights: list[TorchWeight] = []
    for name, module in used.values():
        for wname, weight in _torch_weights_of(module):
            if id(weight) in seen:
                continue
            seen.add(id(weight))
            zeros += int((weight == 0).sum())
            total += weight.numel()
            rows = dead_rows.get(id(weight), ())
            if rows:
                extra += int((weight[list(rows)] != 0).sum())
            values = weight.detach().cpu().float().numpy()
            weights.append(TorchWeight(f"{name}.{wname}", values, rows, fold_scales.get(id(weight))))
    return TorchWeightCount(
        zeros=zeros, total=total, bn_fold_extra_zeros=extra, names=[w.name for w in weights], weights=weights
    )


# --- Zero accounting: each PyTorch weight followed into the ONNX graph ---------------------------------

# A folded weight is PyTorch's times a per-output-channel factor, computed in float32: one rounding per
# element, so 1e-5 relative is generous for a fold and still rejects any other tensor.
_SCALE_RTOL = 1e-5


@dataclass(frozen=True)
class LayerZeros:
    """Where one PyTorch weight went in the ONNX graph and whether its zeros survived."""

    layer: str  # the PyTorch weight ("blocks.0.conv_pw.weight")
    onnx: tuple[str, ...]  # the initializer(s) holding it (more than one: the exporter copied it)
    how: str  # "name", "copy", "transposed copy", "scaled" (a folded BatchNorm) or "scaled transposed"
    zeros_torch: int
    zeros_onnx: int  # zeros at this weight's positions, in the first initializer
    lost: int  # PyTorch zeros that are non-zero in an initializer (the worst copy, named first in ``onnx``)
    gained: int  # zeros in an initializer that PyTorch does not have and no zero BN scale explains


@dataclass
class ZeroAccount:
    """The result of `account_zeros`: every PyTorch weight's fate, and what could not be explained."""

    layers: list[LayerZeros]
    missing: list[str]  # PyTorch weights found nowhere in the graph (not by name, value, transpose or scale)
    extra_onnx: list[str]  # prunable-slot initializers no PyTorch weight explains (constants, not weights)

    @property
    def ok(self) -> bool:
        return not self.missing and all(entry.lost == 0 and entry.gained == 0 for entry in self.layers)

    @property
    def problem(self) -> str:
        """One line naming the first layer that fails, and what to do; "" when `ok`."""
        for entry in self.layers:
            if entry.lost:
                return (
                    f"ONNX export lost {entry.lost} of the {entry.zeros_torch} zeros of layer {entry.layer} "
                    f"(initializer {entry.onnx[0]}); the exported model is not the pruned one: "
                    "this model's layers are not supported"
                )
            if entry.gained:
                return (
                    f"ONNX export added {entry.gained} zeros to layer {entry.layer} (initializer {entry.onnx[0]}) "
                    "that no zero BatchNorm scale explains; this model's layers are not supported"
                )
        if self.missing:
            more = f" (and {len(self.missing) - 1} more)" if len(self.missing) > 1 else ""
            return (
                f"layer {self.missing[0]}{more} is not in the exported graph as itself, a transpose or a "
                "BatchNorm-folded copy (merged branches are not supported); this model's layers are not supported"
            )
        return ""


def _views(array: np.ndarray, shape: tuple[int, ...]) -> list[tuple[str, np.ndarray]]:
    """``array`` seen in PyTorch's ``shape``: as stored, and transposed when it is a matrix (Linear -> MatMul)."""
    if array.size != int(np.prod(shape)):
        return []
    views = [("", array.reshape(shape))]
    squeezed = array.squeeze() if array.ndim > 2 else array
    if squeezed.ndim == 2:  # the values decide which orientation is right (a square one may fit either)
        views.append(("transposed ", np.ascontiguousarray(squeezed.T).reshape(shape)))
    return views


def _scaled_copy(torch_rows: np.ndarray, onnx_rows: np.ndarray, scale: np.ndarray) -> bool:
    """Whether onnx[r] == scale[r] * torch[r] on torch's non-zeros, ``scale`` being PyTorch's own BN factor.

    The factor comes from PyTorch, not from the graph: a factor fitted per row would let any tensor of
    the same shape match when rows are one element long (a 1x1 conv on one input channel, a depthwise
    1x1), and a fitted factor of 0 would let an all-zero tensor match every weight. Judged on PyTorch's
    non-zeros only, so a lost zero still matches and is then reported as lost, not as a missing layer.
    """
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    if s.shape[0] != torch_rows.shape[0]:
        return False
    # Cheap rejection first: most candidates of the same size are other layers and already differ at
    # PyTorch's largest element (one element read, no copies: this runs for every same-size pair).
    r, c = np.unravel_index(int(np.abs(torch_rows).argmax()), torch_rows.shape)
    expected = s[r] * float(torch_rows[r, c])
    if torch_rows[r, c] == 0 or abs(float(onnx_rows[r, c]) - expected) > _SCALE_RTOL * abs(expected) + 1e-30:
        return False
    return _rows_fit(torch_rows.astype(np.float64), onnx_rows.astype(np.float64), s)


def _rows_fit(w: np.ndarray, v: np.ndarray, scale: np.ndarray) -> bool:
    predicted = scale[:, None] * w
    tol = _SCALE_RTOL * np.abs(predicted) + 1e-7 * np.abs(predicted).max(axis=1, keepdims=True)
    return bool(np.all((w == 0) | (np.abs(v - predicted) <= tol)))


def _fitted_scale_match(
    weight: TorchWeight,
    rows: np.ndarray,
    arrays: dict[str, np.ndarray],
    by_size: dict[int, list[str]],
    claimed: set[str],
) -> list[tuple[str, str, np.ndarray]]:
    """Last resort: an unclaimed initializer equal to W times a per-output-channel factor fitted from the graph.

    A simplifier folds per-channel constants PyTorch applies after the layer (FastViT's layer scale) into
    the weight; the factor is then not a BatchNorm's. A fitted factor is evidence only when every row
    PyTorch has non-zeros in has at least two of them, no row scales to 0 outside a zero BN scale, and
    exactly one unclaimed initializer fits; otherwise nothing is matched and the layer is reported.
    """
    live = (rows != 0).sum(axis=1)
    if not live.any() or (live[live > 0] < 2).any():
        return []
    w = rows.astype(np.float64)
    pivot = np.abs(w).argmax(axis=1)
    hits: list[tuple[str, str, np.ndarray]] = []
    for name in by_size.get(int(rows.size), []):
        if name in claimed:
            continue
        for prefix, view in _views(arrays[name], weight.values.shape):
            v = view.reshape(rows.shape).astype(np.float64)
            picked_w, picked_v = w[np.arange(len(w)), pivot], v[np.arange(len(w)), pivot]
            scale = np.where(picked_w != 0, picked_v / np.where(picked_w != 0, picked_w, 1.0), 0.0)
            dead = set(np.flatnonzero((live > 0) & (scale == 0)).tolist())
            if dead - set(weight.zero_scaled_rows):
                continue
            if _scaled_copy(rows, v, scale):
                hits.append((name, "scaled" + (" transposed" if prefix else "") + " (fitted)", view))
                break
    return hits if len(hits) == 1 else []


def _zero_diff(weight: TorchWeight, view: np.ndarray) -> tuple[int, int, int]:
    """(zeros in the ONNX view, PyTorch zeros lost, zeros gained outside zero-scaled rows)."""
    w0 = weight.values == 0
    v0 = view == 0
    gained = v0 & ~w0
    if weight.zero_scaled_rows:
        gained[list(weight.zero_scaled_rows)] = False
    return int(v0.sum()), int((w0 & ~v0).sum()), int(gained.sum())


def account_zeros(path_or_model: str | Path | bytes | onnx.ModelProto, counted: TorchWeightCount) -> ZeroAccount:
    """Follow every PyTorch prunable weight into the ONNX graph and check that each of its zeros is still a zero.

    A PyTorch weight W is found, in this order:

    1. by name: torch.onnx keeps the parameter's name for an initializer it did not rewrite;
    2. by value: an initializer equal to W, or to W transposed (a Linear exported as MatMul), possibly
       stored several times (a weight shared by two nodes, or copied by the exporter); every copy is checked;
    3. by scale: an initializer equal, on W's non-zeros, to W times the factor of the BatchNorm that reads
       W's conv in PyTorch (folded by the exporter: ``W' = W * gamma / sqrt(var + eps)`` per output channel).
       The factor is PyTorch's, never fitted to the graph: a fitted one matches any tensor whose rows
       are one element long.

    Steps 2 and 3 compare on W's non-zeros only, so a weight whose zero was damaged is still found, and
    its lost zero reported against it.

    The rule, per element: a zero of W must be a zero in every initializer holding W (a lost zero fails,
    naming the layer); an initializer may not gain zeros either, except whole output rows whose BatchNorm
    scale is exactly 0 in PyTorch (folding multiplies them by 0). Per-channel folding cannot move a zero
    (the factor multiplies the whole row), so the positions are compared one to one.

    Merged branches (RepVGG/MobileOne re-parameterisation, ``W = W3x3 + pad(W1x1) + I``) are not
    accepted: a merged element is zero only where every branch is zero and the sum does not cancel, so
    only the intersection of the branches' zeros is guaranteed and the pruned count cannot be kept. The
    exporter never merges branches (timm runs them as separate convs until ``reparameterize()``); a graph
    that did would leave the branch weights unmatched and fail naming the first one. The re-parameterise
    step belongs before pruning, where the merged conv is the weight that is pruned.

    Initializers in weight slots that no PyTorch weight explains (constants the exporter folded, say) are
    listed in ``extra_onnx`` and do not fail the check: they hold none of the pruned weights.
    """
    arrays = prunable_onnx_weights(path_or_model)
    by_size: dict[int, list[str]] = {}
    for name, array in arrays.items():
        by_size.setdefault(int(array.size), []).append(name)
    claimed: set[str] = set()
    layers: list[LayerZeros] = []
    missing: list[str] = []
    for weight in counted.weights:
        shape = weight.values.shape
        found: list[tuple[str, str, np.ndarray]] = []  # (initializer, how, view)
        named = arrays.get(weight.name)
        if named is not None and named.size == weight.values.size:
            views = _views(named, shape)
            # A named initializer is this weight; take the orientation whose values fit.
            fit = next((v for v in views if np.array_equal(v[1] != 0, weight.values != 0)), views[0])
            found.append((weight.name, "name", fit[1]))
        else:
            rows = weight.values.reshape(shape[0], -1) if weight.values.ndim else weight.values.reshape(1, -1)
            empty = not rows.any()  # a layer pruned away entirely: any all-zero tensor of its shape holds it
            # Another weight's named initializer may hold this one too: the exporter stores equal
            # constants once (two layers pruned to all zeros share one tensor through Identity nodes).
            for name in by_size.get(int(weight.values.size), []):
                for prefix, view in _views(arrays[name], shape):
                    if empty:
                        if not view.any():
                            found.append((name, prefix + "copy", view))
                        break
                    # Equal on PyTorch's non-zeros (so a damaged zero is found, then reported as lost).
                    if _scaled_copy(rows, view.reshape(rows.shape), np.ones(rows.shape[0])):
                        found.append((name, prefix + "copy", view))
                        break
                    scale = weight.fold_scale
                    if scale is not None and _scaled_copy(rows, view.reshape(rows.shape), scale):
                        found.append((name, "scaled" + (" transposed" if prefix else ""), view))
                        break
            # Prefer initializers no other weight holds; a shared one (equal values) only if none is left.
            unclaimed = [f for f in found if f[0] not in claimed and (f[0] == weight.name or f[0] not in counted.names)]
            found = unclaimed or found[:1]
            if not found:
                found = _fitted_scale_match(weight, rows, arrays, by_size, claimed)
        if not found:
            missing.append(weight.name)
            continue
        claimed.update(f[0] for f in found)
        diffs = [_zero_diff(weight, view) for _, _, view in found]
        # The worst copy first: the message names the initializer that lost (or gained) zeros.
        order = sorted(range(len(found)), key=lambda i: (-diffs[i][1], -diffs[i][2]))
        found, diffs = [found[i] for i in order], [diffs[i] for i in order]
        layers.append(
            LayerZeros(
                layer=weight.name,
                onnx=tuple(f[0] for f in found),
                how=found[0][1],
                zeros_torch=int((weight.values == 0).sum()),
                zeros_onnx=diffs[0][0],
                lost=diffs[0][1],
                gained=max(d[2] for d in diffs),
            )
        )
    extra = [name for name in arrays if name not in claimed]
    return ZeroAccount(layers=layers, missing=missing, extra_onnx=extra)

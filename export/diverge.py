"""Where an unfaithful export goes wrong: the first PyTorch module whose output onnxruntime does not reproduce.

Only run when parity has already failed (it adds every compared tensor as a graph output and runs once). The
TorchScript exporter names each node after its module scope (``/layer2/layer2.0/downsample/downsample.1/Conv``
is module ``layer2.0.downsample.1``); a module's ONNX output is the last node in its scope. Modules the exporter
folds away (BatchNorm into the Conv before it) have no nodes, so the module just before one is not compared:
its PyTorch output is the un-normalized one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

MAX_IMAGES = 8  # enough to see a divergence, cheap to hold every intermediate


@dataclass(frozen=True)
class Divergence:
    module: str
    kind: str  # the module's class
    node: str  # the ONNX node whose output was compared
    max_abs_diff: float
    max_rel_diff: float  # max |diff| / max(1, max |PyTorch output|), as parity measures

    def describe(self) -> str:
        return (
            f"first diverging layer {self.module} ({self.kind}, ONNX node {self.node}): max |diff| "
            f"{self.max_abs_diff:.3g} ({self.max_rel_diff:.3g} relative)"
        )


def scope_module(node_name: str) -> str | None:
    """The module a TorchScript-exported node belongs to, from its scope path; None for the model itself."""
    parts = [p for p in node_name.split("/") if p][:-1]  # the last part is the op (``Conv``, ``Add_1``)
    path: list[str] = []
    for part in parts:
        if path and part.startswith(path[-1] + "."):  # ``layer2`` then ``layer2.0``: the child of a container
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path) or None


def _within(name: str | None, module: str) -> bool:
    return name is not None and (name == module or name.startswith(module + "."))


def _module_outputs(graph: onnx.GraphProto) -> dict[str, tuple[str, str]]:
    """module name -> (node, tensor): the one tensor made inside the module's scope that something outside it
    reads (or the graph returns). Modules with none, or several (a simplifier reordered or fused them), are
    left out rather than guessed."""
    scope = {n.name: scope_module(n.name) for n in graph.node}
    readers: dict[str, list[str | None]] = {}
    for n in graph.node:
        for tensor in n.input:
            readers.setdefault(tensor, []).append(scope[n.name])
    returned = {o.name for o in graph.output}
    found: dict[str, set[tuple[str, str]]] = {}
    for n in graph.node:
        name = scope[n.name]
        if not name:
            continue
        parts = name.split(".")
        for tensor in n.output:
            for k in range(1, len(parts) + 1):
                module = ".".join(parts[:k])
                if tensor in returned or any(not _within(r, module) for r in readers.get(tensor, [])):
                    found.setdefault(module, set()).add((n.name, tensor))
    return {m: next(iter(outs)) for m, outs in found.items() if len(outs) == 1}


def _first_tensor(out: object) -> torch.Tensor | None:
    """A copy of a module's (first) output: an in-place activation after it would change the original."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out.detach().clone() if isinstance(out, torch.Tensor) else None


def first_divergence(net: nn.Module, model: onnx.ModelProto, inputs: torch.Tensor, tol: float) -> Divergence | None:
    """The first module (in the order PyTorch finishes them) whose output differs from its ONNX counterpart by
    more than ``tol`` relative to the output scale, or is not finite there; None when none can be compared or
    none differs (the divergence is then in an op outside any module, e.g. the model's own forward)."""
    x = inputs[:MAX_IMAGES].detach().cpu().float()
    scopes = _module_outputs(model.graph)
    order: list[tuple[str, nn.Module, torch.Tensor]] = []
    names = {m: n for n, m in net.named_modules() if n}
    hooks = [
        m.register_forward_hook(lambda mod, _i, out: order.append((names[mod], mod, _first_tensor(out)))) for m in names
    ]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    norms = [n for n, m in net.named_modules() if n and isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def folds_into_previous(name: str) -> bool:  # the exporter folds a BatchNorm into the Conv/Gemm before it
        return name not in scopes or any(name == b or name.startswith(b + ".") for b in norms)

    compared = []
    for k, (name, mod, out) in enumerate(order):
        folded_next = k + 1 < len(order) and folds_into_previous(order[k + 1][0])
        if out is not None and name in scopes and not folded_next:
            compared.append((name, mod, out))
    if not compared:
        return None
    probe = copy.deepcopy(model)
    present = {o.name for o in probe.graph.output}
    wanted = list(dict.fromkeys(scopes[name][1] for name, _, _ in compared))
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted if t not in present)
    try:  # its own session: the probe's extra outputs are all it differs in from the one parity ran
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - a tensor onnxruntime cannot return (fused away): no diagnosis, no guess
        return None
    values = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {session.get_inputs()[0].name: x.numpy()}))
    )
    for name, mod, out in compared:
        node, tensor = scopes[name]
        got, want = values.get(tensor), out.numpy()
        if got is None or got.shape != want.shape:
            continue
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        worst = float(diff.max()) if diff.size else 0.0
        if not np.isfinite(got).all():
            worst = float("inf")
        scale = max(1.0, float(np.abs(want).max()) if want.size else 0.0)
        if worst / scale > tol:
            return Divergence(name, type(mod).__name__, node, worst, worst / scale)
    return None

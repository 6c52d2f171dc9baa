"""Export integrity: non-finite weights and outputs, crafted artifact metadata, a pickle payload.

Artifacts are built with ``onnx.helper`` (a one-node graph, no torch export), so each case costs
milliseconds before the CLI runs; the checkpoint cases save a real demo-model state_dict.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import Case

PAYLOAD_FILE = "payload-ran.txt"


def _graph(s: Path, *, dims: list, meta: dict[str, str] | None = None, op: str = "Relu", name: str = "m") -> str:
    """A valid one-op ONNX file (input dims as given, strings symbolic) with crafted metadata_props."""
    import onnx
    from onnx import TensorProto, helper

    if op == "SqrtOfNegative":  # NaN wherever |x| > 0: sqrt(-|x| - 1)
        one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
        nodes = [
            helper.make_node("Abs", ["input"], ["a"]),
            helper.make_node("Neg", ["a"], ["n"]),
            helper.make_node("Sub", ["n", "one"], ["m"]),
            helper.make_node("Sqrt", ["m"], ["logits"]),
        ]
        inits = [one]
    else:
        nodes, inits = [helper.make_node(op, ["input"], ["logits"])], []
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, dims)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (meta or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path = s / f"{name}.onnx"
    onnx.save(model, str(path))
    return str(path)


def _reference(**fields) -> dict[str, str]:
    ref = {"seed": 0, "shape": [2, 4], "atol": 1e-4, "rtol": 1e-5, "source": "pytorch", "outputs": [[0.0] * 8]}
    ref.update(fields)
    for key in [k for k, v in fields.items() if v is None]:
        del ref[key]
    return {"edgeprune.reference": json.dumps(ref)}


def _verify(s: Path, **graph) -> list[str]:
    return ["verify", _graph(s, **graph)]


def _demo_checkpoint(s: Path, name: str, poison) -> str:
    """The demo model's state_dict with ``poison(state)`` applied, saved as a plain tensor checkpoint."""
    import torch

    from edgeprune.models import load_model

    state = load_model("demo").state_dict()
    poison(state)
    path = s / name
    torch.save(state, path)
    return str(path)


def _nan3(state) -> None:
    state["layer1.0.conv1.weight"].view(-1)[:3] = float("nan")


def _inf2(state) -> None:
    state["fc.weight"].view(-1)[:2] = float("inf")


def _float64_overflow(state) -> None:
    # Finite as float64; the cast to the model's float32 makes it Inf.
    for key in list(state):
        if state[key].is_floating_point():
            state[key] = state[key].double()
    state["conv1.weight"].view(-1)[0] = 1e300


class _Payload:
    """Unpickling this would call ``open(path, "w")``: a file appears only if the unpickler runs it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_payload(s: Path) -> list[str]:
    import torch

    from edgeprune.models import load_model

    state = load_model("demo").state_dict()
    torch.save({"state_dict": state, "extra": _Payload(s / PAYLOAD_FILE)}, s / "evil.pth")
    assert not (s / PAYLOAD_FILE).exists()  # saving only records the call
    return ["compress", "--model", "demo", "--checkpoint", str(s / "evil.pth"), "--out", str(s / "out"), "-q"]


def _payload_never_ran(s: Path) -> None:
    assert not (s / PAYLOAD_FILE).exists(), "the pickle payload ran while loading the checkpoint"


def _factory(s: Path, body: str) -> str:
    (s / "factory.py").write_text("import torch\nfrom torch import nn\n\n" + body)
    return str(s / "factory.py") + ":make"


NAN_WEIGHTS = """
def make():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        model[1].weight[0, :5] = float("nan")
    return model
"""

NAN_FORWARD = """
class Sqrt(nn.Module):  # finite weights, NaN outputs: sqrt of a very negative number
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return torch.sqrt(self.fc(x.flatten(1)) - 1e6)


def make():
    return Sqrt()
"""


def _export(s: Path, model: str, *extra: str) -> list[str]:
    return ["export", "--model", model, *extra, "--eval-size", "64", "--quantize", "none", "--out", str(s / "out")]


CASES = [
    Case(
        name="integrity-nan-checkpoint",
        what="`compress --checkpoint` with 3 NaN values in one conv weight",
        expect="tensor 'layer1.0.conv1.weight' has 3 NaN values",
        argv=lambda s: [
            "compress",
            "--model",
            "demo",
            "--checkpoint",
            _demo_checkpoint(s, "nan.pth", _nan3),
            "--out",
            str(s / "out"),
            "-q",
        ],
    ),
    Case(
        name="integrity-inf-checkpoint",
        what="`export --checkpoint` with Inf in the classifier weight",
        expect="tensor 'fc.weight' has 2 Inf values",
        argv=lambda s: _export(s, "demo", "--checkpoint", _demo_checkpoint(s, "inf.pth", _inf2)),
    ),
    Case(
        name="integrity-float64-overflow-checkpoint",
        what="a float64 checkpoint whose 1e300 weight overflows to Inf in the float32 model",
        expect="tensor 'conv1.weight' has 1 Inf value;",
        argv=lambda s: _export(s, "demo", "--checkpoint", _demo_checkpoint(s, "f64.pth", _float64_overflow)),
    ),
    Case(
        name="integrity-pickle-payload",
        what="a `.pth` whose unpickling would call open() on a scratch file (a `__reduce__` payload)",
        expect="holds pickled Python objects",
        argv=_pickle_payload,
        after=_payload_never_ran,
    ),
    Case(
        name="integrity-factory-nan-weights",
        what="a `file.py:factory` model built with NaN weights (no checkpoint)",
        expect="tensor '1.weight' has 5 NaN values",
        argv=lambda s: _export(s, _factory(s, NAN_WEIGHTS)),
    ),
    Case(
        name="integrity-export-nan-outputs",
        what="`export` of a model with finite weights whose outputs are NaN",
        expect="PyTorch output 0 ('logits') has",
        argv=lambda s: _export(s, _factory(s, NAN_FORWARD)),
    ),
    Case(
        name="integrity-verify-nan-outputs",
        what="`verify` of an ONNX graph that outputs NaN (no metadata)",
        expect="onnxruntime output 0 ('logits') has",
        argv=lambda s: _verify(s, dims=["batch", 4], op="SqrtOfNegative"),
    ),
    Case(
        name="integrity-verify-huge-reference-shape",
        what="`verify`: metadata reference shape [2, 100000, 100000, 100000] (petabytes if allocated)",
        expect="too large",
        argv=lambda s: _verify(s, dims=["batch", "c", "h", "w"], meta=_reference(shape=[2, 100000, 100000, 100000])),
    ),
    Case(
        name="integrity-verify-huge-graph-input",
        what="`verify`: a graph whose fixed input is 1x100000x100000x100000, no metadata",
        expect="too large",
        argv=lambda s: _verify(s, dims=[1, 100000, 100000, 100000]),
    ),
    Case(
        name="integrity-verify-reference-shape-misfit",
        what="`verify`: metadata reference shape [2, 3, 8, 8] for a graph that takes (batch, 4)",
        expect="does not fit the graph's input",
        argv=lambda s: _verify(s, dims=["batch", 4], meta=_reference(shape=[2, 3, 8, 8])),
    ),
    Case(
        name="integrity-verify-missing-atol",
        what="`verify`: metadata reference without `atol`",
        expect="has no 'atol' tolerance",
        argv=lambda s: _verify(s, dims=["batch", 4], meta=_reference(atol=None)),
    ),
    Case(
        name="integrity-verify-text-atol",
        what='`verify`: metadata reference with `"atol": "tiny"`',
        expect="'atol' is 'tiny', not a finite number",
        argv=lambda s: _verify(s, dims=["batch", 4], meta=_reference(atol="tiny")),
    ),
    Case(
        name="integrity-verify-reference-not-json",
        what="`verify`: `edgeprune.reference` that is not JSON",
        expect="is not valid JSON",
        argv=lambda s: _verify(s, dims=["batch", 4], meta={"edgeprune.reference": "{oops"}),
    ),
    Case(
        name="integrity-verify-reference-nan-outputs",
        what="`verify`: recorded reference outputs that hold NaN",
        expect="holds NaN or Inf",
        argv=lambda s: _verify(s, dims=["batch", 4], meta=_reference(outputs=[[float("nan")] * 8])),
    ),
    Case(
        name="integrity-verify-text-sparsity",
        what="`verify`: `edgeprune.global_sparsity` = 'lots'",
        expect="global_sparsity 'lots' is not a number",
        argv=lambda s: _verify(s, dims=["batch", 4], meta={"edgeprune.global_sparsity": "lots"}),
    ),
]

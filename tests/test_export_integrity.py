"""Export integrity: NaN/Inf never pass a comparison, parity is scale-relative, weights are finite on load,
and crafted artifact metadata is refused in one line (issues 18 and 19)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from edgeprune.export import describe_artifact, export_onnx, read_metadata, verify_artifact
from edgeprune.export.metadata import MAX_INPUT_VALUES, check_input_shape, parse_reference, reference_mismatch
from edgeprune.export.onnx_export import _prepare, compare_outputs, float32_error, max_abs_diff, parity_check
from edgeprune.export.verify import ARM_INT8_TOL
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgeprune.cli import main
from edgeprune.data import load_data
from edgeprune.errors import EdgepruneError
from edgeprune.models import load_checkpoint, load_model
from edgeprune.recovery import recalibrate_bn

torch.set_num_threads(1)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


class _Twice(nn.Module):
    """Two outputs, both the flattened input: the PyTorch side of a hand-built two-output graph."""

    def forward(self, x):
        return x.flatten(1), x.flatten(1)


def _two_output_graph(second: str) -> onnx.ModelProto:
    """input (batch, 4) -> output0 = input, output1 = input (``same``), NaN (``nan``) or +-Inf (``inf``)."""
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [helper.make_node("Identity", ["input"], ["output0"])]
    if second == "same":
        nodes.append(helper.make_node("Identity", ["input"], ["output1"]))
    elif second == "nan":  # sqrt(-|x| - 1)
        nodes += [
            helper.make_node("Abs", ["input"], ["a"]),
            helper.make_node("Neg", ["a"], ["n"]),
            helper.make_node("Sub", ["n", "one"], ["m"]),
            helper.make_node("Sqrt", ["m"], ["output1"]),
        ]
    else:  # x / 0
        nodes.append(helper.make_node("Div", ["input", "zero"], ["output1"]))
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("output0", "output1")]
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        info,
        initializer=[zero, one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


X4 = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------- NaN / Inf never pass


def test_identical_graph_passes_parity():
    result = parity_check(_Twice(), _two_output_graph("same"), X4, 1e-4)
    assert result.max_abs_diff == 0.0 and result.max_rel_diff == 0.0 and not result.problem


@pytest.mark.parametrize("kind, word", [("nan", "NaN"), ("inf", "Inf")])
def test_nonfinite_onnx_output_fails_parity_naming_it(kind, word):
    with pytest.raises(EdgepruneError) as err:
        parity_check(_Twice(), _two_output_graph(kind), X4, 1e-4)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"onnxruntime output 1 ('output1') has 24 {word} values" in msg and "not faithful" in msg


def test_nonfinite_pytorch_side_is_named_as_the_model():
    got = [np.zeros((2, 3), np.float32)]
    want = [np.array([[0, np.nan, np.inf], [0, 0, 0]], np.float32)]
    diff = compare_outputs(got, want, names=["logits"])
    assert diff.problem == "PyTorch output 0 ('logits') has 1 NaN and 1 Inf values"
    assert diff.nonfinite_side == "PyTorch" and not diff.within(1e9)
    both = compare_outputs(want, want, names=["logits"])
    assert both.problem.endswith("(onnxruntime's too)")


def test_max_abs_diff_no_longer_hides_nan():
    a = [np.array([1.0, np.nan], np.float32)]
    # The old helper returned max(0.0, nan) == 0.0: a NaN output passed every `diff <= tol` gate.
    assert max_abs_diff(a, [np.array([1.0, 2.0], np.float32)]) == float("inf")
    assert max_abs_diff([np.ones(3)], [np.ones(3)]) == 0.0
    assert max_abs_diff([np.ones(3)], [np.ones(4)]) == float("inf")


def test_verify_pytorch_check_fails_on_nan_naming_the_output(tmp_path):
    path = tmp_path / "nan.onnx"
    onnx.save(_two_output_graph("nan"), str(path))
    report = verify_artifact(path, model=_Twice(), inputs=X4)
    checks = {c.name: c for c in report.checks}
    assert checks["pytorch"].ok is False and "onnxruntime output 1 ('output1') has" in checks["pytorch"].detail
    assert checks["reference"].ok is False and "NaN" in checks["reference"].detail  # no metadata: still caught
    assert report.pytorch_max_abs_diff == float("inf")


# ------------------------------------------------------------------------------- scale-relative parity


def _linear(scale: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        model[1].weight.mul_(scale)
        model[1].bias.mul_(scale)
    return model


def _perturbed(path, factor: float = 1.0, shift: float = 0.0) -> onnx.ModelProto:
    """The exported graph with every float initializer scaled by ``factor`` and its bias shifted by ``shift``."""
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init).astype(np.float32)
        w = w * np.float32(factor) + (np.float32(shift) if w.ndim == 1 else 0)
        init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
    return model


def test_big_logits_pass_with_small_relative_error(tmp_path):
    model = _linear(300.0)
    x = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    result = export_onnx(model, x[:1], tmp_path / "big.onnx", check_inputs=x)
    with torch.no_grad():
        assert model(x).abs().max() > 500  # logits really are O(1e3)
    assert result.parity_max_rel_diff <= 1e-4
    assert result.parity_max_rel_diff <= result.parity_max_abs_diff or result.parity_max_abs_diff == 0
    # The same graph with its weights off by 2e-6 relative: abs error far above 1e-4, relative far below.
    diff = parity_check(_prepare(model), _perturbed(result.path, factor=1 + 2e-6), x, 1e-4)
    assert diff.max_abs_diff > 1e-4 > 2e-5 > diff.max_rel_diff
    report = verify_artifact(_write(tmp_path / "p.onnx", _perturbed(result.path, 1 + 2e-6)), model=model, inputs=x)
    assert {c.name: c.status for c in report.checks}["pytorch"] == "ok" and report.pytorch_max_rel_diff < 2e-5


def _write(path, model: onnx.ModelProto):
    onnx.save(model, str(path))
    return path


def test_order_one_outputs_keep_the_absolute_tolerance(tmp_path):
    model = _linear(0.05)
    x = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert model(x).abs().max() < 1  # O(1): relative == absolute
    result = export_onnx(model, x[:1], tmp_path / "small.onnx", check_inputs=x)
    with pytest.raises(EdgepruneError, match=r"differs from PyTorch by 0.0005 \(0.0005 relative"):
        parity_check(_prepare(model), _perturbed(result.path, shift=5e-4), x, 1e-4)


def test_relative_rule_per_output():
    big = np.full((2, 3), 1000.0, np.float32)
    small = np.full((2, 3), 0.5, np.float32)
    diff = compare_outputs([big + 0.05, small + 5e-5], [big, small])
    # 0.05 / 1000 on the logits, 5e-5 / 1 on the O(1) output: the worst relative one is the small output's.
    assert diff.max_abs_diff == pytest.approx(0.05, rel=1e-3)
    assert diff.max_rel_diff == pytest.approx(5e-5, rel=1e-2) and diff.within(1e-4)
    assert not compare_outputs([small + 2e-4], [small]).within(1e-4)
    # INT8 (arm64 check): 2 % of the output's max |value|, as before, floored at 0.02 absolute below 1.
    assert compare_outputs([big + 19.0], [big]).within(ARM_INT8_TOL)
    assert not compare_outputs([big + 21.0], [big]).within(ARM_INT8_TOL)


def test_both_numbers_are_recorded(tmp_path, capsys):
    result = export_onnx(_linear(1.0), torch.randn(1, 1, 4, 4), tmp_path / "m.onnx")
    parity = read_metadata(result.path)["parity"]
    assert parity["max_abs_diff"] == pytest.approx(result.parity_max_abs_diff, rel=1e-3, abs=1e-12)
    assert parity["max_rel_diff"] == pytest.approx(result.parity_max_rel_diff, rel=1e-3, abs=1e-12)
    assert parity["tol"] == 1e-4 and parity["precision"] == "fp32"
    report = verify_artifact(result.path, model=_linear(1.0), inputs=torch.randn(3, 1, 4, 4))
    assert report.ok and report.pytorch_max_rel_diff is not None and report.pytorch_max_abs_diff is not None
    assert "relative to the output scale" in {c.name: c.detail for c in report.checks}["pytorch"]


def _cancelling_model() -> nn.Module:
    """O(1) outputs computed from activations of ~1e5 that BatchNorm's mean cancels (what a deep random-weight
    or re-parameterised net does): float32 rounds at ~1e-3 there, so an absolute 1e-4 cannot hold for any
    float32 runtime, PyTorch included. onnxruntime folds the BN into the Gemm and rounds in another order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        model[1].bias.fill_(1e5)
        model[2].running_mean.fill_(1e5)
        model[4].weight.mul_(0.3)
    return model


def test_float_noise_passes_over_the_tolerance_and_a_corrupted_weight_still_fails(tmp_path):
    model = _cancelling_model()
    x = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert model(x).abs().max() < 1  # O(1) outputs: the relative rule is the absolute one
    result = export_onnx(model, x[:1], tmp_path / "noisy.onnx", check_inputs=x)
    noise = result.parity_float32_error
    assert noise is not None and result.parity_max_abs_diff > 1e-4  # over the tolerance ...
    assert noise > 1e-4 and result.parity_max_abs_diff <= 4 * noise  # ... and within PyTorch's own float32 error
    assert read_metadata(result.path)["parity"]["float32_error"] == pytest.approx(noise, rel=1e-3)
    report = verify_artifact(result.path, model=model, inputs=x)
    assert report.ok, [(c.name, c.detail) for c in report.checks if c.status != "ok"]
    assert "float32 error" in {c.name: c.detail for c in report.checks}["pytorch"]

    # One weight of the last Gemm off by 0.05: far above the float noise, so the export is not faithful.
    graph = onnx.load(str(result.path))
    init = next(i for i in graph.graph.initializer if numpy_helper.to_array(i).size == 640)
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += np.float32(0.05)
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    message = r"ONNX output 0 \('logits'\) differs from PyTorch by .* nor within 4x PyTorch's own float32 error"
    with pytest.raises(EdgepruneError, match=message):
        parity_check(_prepare(model), graph, x, 1e-4)
    report = verify_artifact(_write(tmp_path / "bad.onnx", graph), model=model, inputs=x)
    assert {c.name: c.status for c in report.checks}["pytorch"] != "ok"


@pytest.mark.slow
def test_mobileone_dense_parity_is_within_its_own_float_noise(tmp_path):
    """issue 18's mobileone_s0 stop, on the dense model at 64 px: random weights, BN re-calibrated on demo
    images. PyTorch's own float32 error against float64 is of the 1e-4 class, as is onnxruntime's
    difference: the 1e-4 bound was float noise, not an unfaithful export, and the export now passes."""
    torch.manual_seed(0)
    x = load_data("demo", calib_size=16, eval_size=16, test_size=16, image_size=64, seed=0).calib_x
    model = load_model("mobileone_s0", pretrained=False, num_classes=10, in_chans=1, img_size=64)
    recalibrate_bn(model, x, 16)
    result = export_onnx(model, x[:1], tmp_path / "mobileone.onnx", check_inputs=x)
    noise = float32_error(_prepare(model), x)
    assert noise is not None and noise > 2e-5
    assert result.parity_max_abs_diff <= 4 * noise


# ------------------------------------------------------------------------------- finite weights on load


def _demo_state_with(tmp_path, name: str, fill: float, count: int, key: str = "layer1.0.conv1.weight"):
    state = load_model("demo").state_dict()
    state[key].view(-1)[:count] = fill
    torch.save(state, tmp_path / name)
    return tmp_path / name


def test_nan_checkpoint_is_one_line_naming_the_tensor(tmp_path, capsys):
    ckpt = _demo_state_with(tmp_path, "nan.pth", float("nan"), 3)
    out = tmp_path / "out"
    code, _, err = run_cli(["compress", "--model", "demo", "--checkpoint", str(ckpt), "--out", str(out), "-q"], capsys)
    line = err.strip()
    assert code != 0 and "\n" not in line and "Traceback" not in err
    assert line == (
        "edgeprune: error: checkpoint nan.pth: tensor 'layer1.0.conv1.weight' has 3 NaN values; "
        "re-save it from a healthy training run"
    )
    assert not out.exists() or not any(out.iterdir())


def test_several_bad_tensors_are_counted(tmp_path):
    state = load_model("demo").state_dict()
    state["conv1.weight"].view(-1)[:2] = float("-inf")
    state["fc.bias"][0] = float("nan")
    torch.save(state, tmp_path / "two.pt")
    with pytest.raises(EdgepruneError, match=r"'conv1.weight' has 2 Inf values \(1 more tensors too\)"):
        load_checkpoint(load_model("demo"), tmp_path / "two.pt")


def test_healthy_checkpoint_still_loads(tmp_path):
    src = load_model("demo")
    torch.save(src.state_dict(), tmp_path / "ok.pt")
    model = load_model("demo", checkpoint=tmp_path / "ok.pt")
    assert torch.equal(model.fc.weight, src.fc.weight)


# ------------------------------------------------------------------------------- crafted metadata


@pytest.fixture()
def artifact(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    result = export_onnx(model, torch.randn(1, 1, 8, 8), tmp_path / "model.onnx")
    return model, result.path


def _with_reference(src, dst, edit) -> None:
    model = onnx.load(str(src))
    entry = next(p for p in model.metadata_props if p.key == "edgeprune.reference")
    ref = json.loads(entry.value)
    value = edit(ref) if callable(edit) else edit
    entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, str(dst))


def _drop(key):
    def edit(ref):
        del ref[key]
        return ref

    return edit


def _set(key, value):
    def edit(ref):
        ref[key] = value
        return ref

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set("shape", [2, 100000, 100000, 100000]), "is too large"),
        (_set("shape", [2, 1, 9, 9]), "does not fit the graph's input"),
        (_set("shape", "2x1x8x8"), "is not a list of 2 to 8 integers"),
        (_set("shape", [2, 1, 0, 8]), "has a dimension below 1"),
        (_drop("atol"), "has no 'atol' tolerance"),
        (_set("atol", "1e-4"), "'atol' is '1e-4', not a finite number"),
        (_set("rtol", -1), "'rtol' is -1, not a finite number >= 0"),
        (_drop("shape"), "has no input 'shape'"),
        (_drop("outputs"), "'outputs' is not a list"),
        (_set("outputs", [["x"] * 10]), "output 0 holds non-numbers"),
        ("{broken", "is not valid JSON"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_crafted_reference_fails_only_its_check(artifact, tmp_path, edit, message, capsys):
    model, path = artifact
    bad = tmp_path / "crafted.onnx"
    _with_reference(path, bad, edit)
    report = verify_artifact(bad, model=model)
    checks = {c.name: c for c in report.checks}
    assert checks["reference"].ok is False and message in checks["reference"].detail
    # The rest still runs on the graph's own input shape (1x8x8 is fixed in the graph).
    assert checks["weights"].ok and checks["onnxruntime"].ok and checks["pytorch"].ok
    code, _, err = run_cli(["verify", str(bad)], capsys)
    assert code == 2 and message in err and "\n" not in err.strip() and "Traceback" not in err
    info = describe_artifact(bad)  # inspect describes the damage instead of failing
    assert info["checks"]["reference_ok"] is False and message in info["checks"]["reference_problem"]


def test_inspect_survives_deeply_nested_metadata(artifact, tmp_path, capsys):
    _, path = artifact
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "edgeprune.layer_sparsity", "[" * 100_000  # json.loads: RecursionError
    nan = model.metadata_props.add()
    nan.key, nan.value = "edgeprune.opset", "9" * 5000  # int(): over the digit limit
    onnx.save(model, str(tmp_path / "deep.onnx"))
    code, out, err = run_cli(["inspect", str(tmp_path / "deep.onnx"), "--json"], capsys)
    assert code == 0 and "Traceback" not in err
    meta = json.loads(out)["metadata"]
    assert meta["layer_sparsity"].startswith("[[[") and meta["opset"].startswith("999")


def test_nonfinite_global_sparsity_is_not_a_number(artifact, tmp_path):
    _, path = artifact
    model = onnx.load(str(path))
    next(p for p in model.metadata_props if p.key == "edgeprune.global_sparsity").value = "nan"
    onnx.save(model, str(tmp_path / "nan.onnx"))
    report = verify_artifact(tmp_path / "nan.onnx")
    sparsity = next(c for c in report.checks if c.name == "sparsity")
    assert sparsity.ok is False and "'nan' is not a number" in sparsity.detail


def test_reference_helpers_bound_and_validate():
    assert check_input_shape([2, 3, 224, 224]) == [2, 3, 224, 224]
    with pytest.raises(EdgepruneError, match="too large"):
        check_input_shape([1, MAX_INPUT_VALUES + 1])
    with pytest.raises(EdgepruneError, match="2 to 8 integers"):
        check_input_shape([2, True, 3])
    ref = {"shape": [2, 3], "atol": 1e-4, "rtol": 0, "outputs": [[0.0] * 6]}
    parsed = parse_reference(ref)
    assert parse_reference(parsed)["shape"] == [2, 3]  # idempotent
    assert reference_mismatch(ref, [np.zeros((2, 3), np.float32)]) == 0.0
    assert reference_mismatch(ref, [np.full((2, 3), np.nan, np.float32)]) == float("inf")
    with pytest.raises(EdgepruneError, match="'atol' is 0"):
        parse_reference({**ref, "atol": 0})


def test_pickle_payload_case_is_a_real_payload(tmp_path):
    """The hostile case's checkpoint really runs code when unpickled without weights_only (so its refusal
    in `integrity-pickle-payload` means something); edgeprune's loader refuses it."""
    from tests.hostile.integrity import PAYLOAD_FILE, _pickle_payload

    argv = _pickle_payload(tmp_path)
    ckpt = argv[argv.index("--checkpoint") + 1]
    with pytest.raises(EdgepruneError, match="pickled Python objects"):
        load_model("demo", checkpoint=ckpt)
    assert not (tmp_path / PAYLOAD_FILE).exists()
    torch.load(ckpt, weights_only=False)  # what an unsafe loader would do: the payload runs
    assert (tmp_path / PAYLOAD_FILE).exists()


# ------------------------------------------------------------------------------- where a parity failure starts


def _conv_net() -> nn.Module:
    """conv-BN-ReLU twice, pool, Linear: the exporter folds both BatchNorms into their Convs."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_a_failed_parity_names_the_first_diverging_layer(tmp_path):
    from edgeprune.export.diverge import first_divergence, scope_module

    assert scope_module("/layer2/layer2.0/downsample/downsample.1/Conv") == "layer2.0.downsample.1"
    assert scope_module("/fc/Gemm") == "fc" and scope_module("Identity_0") is None
    net, x = _conv_net(), torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    result = export_onnx(net, x[:1], tmp_path / "m.onnx", check_inputs=x, simplify=False)
    graph = onnx.load(str(result.path))
    # Faithful: nothing diverges, although the folded BatchNorms make each Conv's ONNX output differ from
    # PyTorch's Conv output (those Convs are not compared; their ReLUs are).
    assert first_divergence(_prepare(net), graph, x, 1e-4) is None
    # The second Conv's weights (8x8x3x3) corrupted: the first diverging layer is its ReLU ("5"), not earlier.
    init = next(i for i in graph.graph.initializer if numpy_helper.to_array(i).size == 576)
    w = numpy_helper.to_array(init).copy()
    w.flat[:20] += np.float32(0.5)
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    found = first_divergence(_prepare(net), graph, x, 1e-4)
    assert found is not None and (found.module, found.kind) == ("5", "ReLU") and found.max_abs_diff > 0.01
    with pytest.raises(EdgepruneError, match=r"first diverging layer 5 \(ReLU, ONNX node /5/Relu\).*not faithful"):
        parity_check(_prepare(net), graph, x, 1e-4)


def test_a_simplifier_that_changes_the_outputs_is_dropped_for_the_exporters_graph(tmp_path, monkeypatch, caplog):
    """A simplified graph that keeps every zero but computes something else (a bias moved) is not shipped, and
    does not fail a faithful export: the exporter's own graph passes parity and ships unsimplified."""
    import edgeprune.export.onnx_export as ox

    def wrong_simplifier(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
        bad = onnx.ModelProto()
        bad.CopyFrom(model)
        init = next(i for i in bad.graph.initializer if numpy_helper.to_array(i).size == 10)  # the Linear's bias
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(1.0), init.name))
        return bad, "onnxsim"

    monkeypatch.setattr(ox, "_simplify", wrong_simplifier)
    net, x = _conv_net(), torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING"):
        result = export_onnx(net, x[:1], tmp_path / "m.onnx", check_inputs=x)
    assert not result.simplified and result.parity_max_rel_diff < 1e-4
    assert "changed the outputs" in caplog.text and "keeping the unsimplified graph" in caplog.text
    assert verify_artifact(result.path, model=net, inputs=x).ok

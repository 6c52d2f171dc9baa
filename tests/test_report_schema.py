"""report.json is one dataclass tree for both granularities: every key declared, every value of its declared
type, the ``structured`` block present exactly in channel mode, layer fields meaning the same in both."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgeprune.recover import BUDGET_HINT_POINTS
from edgeprune.report import LayerReport, Report, SchemaError, StructuredReport
from edgeprune.targets import bench_threads, get_target

from . import small_runs

RUNS = {"unstructured": small_runs.unstructured_int8, "channel": small_runs.channel_int8}


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(RUNS))
def test_report_json_round_trips_to_the_dataclass_tree(mode):
    report, out = RUNS[mode]()
    saved = json.loads((out / "report.json").read_text())
    back = Report.from_dict(saved)  # raises SchemaError on an undeclared key or a wrongly typed value
    assert back.to_dict() == saved
    assert back.granularity == mode
    assert (back.structured is not None) == (mode == "channel")
    if back.structured is not None:
        assert isinstance(back.structured, StructuredReport) and back.structured.groups
        # a pick recovery left far below dense says which budget to raise, and only then
        drop = (back.dense.accuracy - back.selected.accuracy) * 100
        hinted = [n for n in back.notes if "--calib-size, --finetune-epochs" in n]
        bound = max(BUDGET_HINT_POINTS, back.config.get("max_drop") or 0.0)
        assert bool(hinted) == (drop > bound + 1e-9 and back.config["finetune_epochs"] > 0), (drop, hinted)
    # the pick re-read per selection image: the same drop the search saw (to an image), a runner-up on the same
    # goal (the 80 % default ranks by accuracy), a note exactly when the split cannot tell the two apart
    ev, sel = back.selected.evidence, back.selected
    assert ev is not None and ev.images == next(s["size"] for s in back.splits if s["name"] == "selection")
    assert abs(ev.drop - sel.accuracy_drop) <= 100 / ev.images + 1e-9 and ev.drop_se > 0
    if mode == "unstructured":
        assert ev.runner_up is not None
    if ev.runner_up is not None:
        rival = next(c for c in back.strategies if c.name == ev.runner_up)
        assert rival.name != sel.name and rival.sparsity >= back.sparsity_target - 1e-6
        assert abs(ev.margin - (sel.accuracy - rival.final_accuracy) * 100) <= 100 / ev.images + 1e-9
    tied = ev.runner_up is not None and ev.margin <= ev.margin_se and (ev.margin != 0 or ev.margin_se > 0)
    assert bool([n for n in back.notes if "does not tell them apart" in n]) == tied
    assert "paired per image" in (out / "report.md").read_text()
    units = {"unstructured": {"weight"}, "channel": {"channel", "head"}}[mode]
    for layer in back.layers:
        assert isinstance(layer, LayerReport) and layer.unit in units
        assert 0 <= layer.kept <= layer.units and layer.removed == pytest.approx(1 - layer.kept / layer.units, abs=1e-6)
    assert back.bench is not None and back.bench["results"]  # filled in both modes
    # both modes time at the thread count asked for, and a capped default would be said in the notes
    asked = small_runs.SMALL["threads"]
    assert back.bench["threads"] == bench_threads(asked, get_target(back.target)) == asked
    assert not [n for n in back.notes if n.startswith("latency timed at")]
    assert {"model.onnx", "model.int8.onnx", "dense.onnx"} <= {a.file for a in back.shipped}
    # one config builder: the same keys in both modes
    other = "channel" if mode == "unstructured" else "unstructured"
    if RUNS[other].cache_info().currsize:
        assert set(back.config) == set(RUNS[other]()[0].config)


def test_schema_errors_name_the_field():
    layer = LayerReport("conv", "conv", "weight", 10, 5, 0.5, 10, [0.0, 0.9])
    good = dataclasses.asdict(layer)
    from edgeprune.report import _build

    assert _build(LayerReport, good, "layer") == layer
    with pytest.raises(SchemaError, match=r"layer: undeclared key\(s\) \['sparsity'\]"):
        _build(LayerReport, {**good, "sparsity": 0.5}, "layer")
    with pytest.raises(SchemaError, match=r"layer.units: expected int, got str"):
        _build(LayerReport, {**good, "units": "10"}, "layer")
    with pytest.raises(SchemaError, match=r"layer: missing key\(s\) \['kept'\]"):
        _build(LayerReport, {k: v for k, v in good.items() if k != "kept"}, "layer")


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(RUNS))
def test_inspect_reads_a_finished_run_back(mode, capsys):
    # `edgeprune inspect OUT` prints what the run shipped and how firmly the selection split backs the pick,
    # from report.json alone, wherever the folder has moved to; --json is the report itself
    from edgeprune.cli import main

    def ok(argv: list[str]) -> None:
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0

    report, out = RUNS[mode]()
    ok(["inspect", str(out)])
    text = " ".join(capsys.readouterr().out.split())  # rich wraps lines at the terminal's width
    assert "model.int8.onnx" in text and f"selected {report.selected.name}" in text
    ev = report.selected.evidence
    assert f"On the {ev.images} selection images, paired per image: {ev.drop:.2f} ± {ev.drop_se:.2f}" in text
    assert f"artifacts in {out.resolve()}" in text
    ok(["inspect", str(out / "report.json"), "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads((out / "report.json").read_text())

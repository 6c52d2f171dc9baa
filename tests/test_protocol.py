"""The honest protocol (issue 15): every decision on the selection split, the sealed test split opened once,
after the pick, for the reported figures; report.json lists the three disjoint splits."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from edgeprune import pipeline
from edgeprune.data import SealedSplit, load_data
from edgeprune.pipeline import FINAL_EVALUATION, CompressConfig, compress

from . import small_runs

RUN = dict(small_runs.SMALL, range_baselines=("mag",), quantize="none", export=True)


def _run(monkeypatch, shuffle_test_labels: bool):
    """A small demo run; the data bundle it used is returned too (its test split's openings are logged)."""
    bundles = []

    def load(*args, **kw):
        bundle = load_data(*args, **kw)
        if shuffle_test_labels:  # same images, labels permuted: only the test figures may change
            x, y = bundle.test._x, bundle.test._y
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
            bundle.test = SealedSplit(x, y[perm], bundle.test.source)
        bundles.append(bundle)
        return bundle

    monkeypatch.setattr(pipeline, "load_data", load)
    out = Path(tempfile.mkdtemp(prefix="edgeprune-test-protocol-")) / "out"
    report = compress(CompressConfig(**RUN, out=str(out)))
    (bundle,) = bundles
    return report, bundle


@pytest.mark.slow
def test_test_split_opened_once_after_the_pick_and_decides_nothing(monkeypatch):
    report, bundle = _run(monkeypatch, shuffle_test_labels=False)
    openings = bundle.test.openings
    assert [o.reason for o in openings] == [FINAL_EVALUATION]
    # three disjoint splits with their sizes; the test split says what it was opened for
    splits = {s["name"]: s for s in report.splits}
    assert list(splits) == ["calibration", "selection", "test"]
    assert [splits[n]["size"] for n in splits] == [RUN["calib_size"], RUN["eval_size"], 2000]
    assert list(splits["test"]["opened_for"]) == [FINAL_EVALUATION]
    assert list(splits["selection"]["opened_for"]) == []
    # the reported figures are the test split's; the pick and the baselines have one, the others not
    sel = report.selected
    assert sel.test_accuracy is not None and report.dense.test_accuracy > 0.8
    assert sel.test_accuracy_drop == pytest.approx((report.dense.test_accuracy - sel.test_accuracy) * 100)
    for c in report.strategies:
        assert (c.test_accuracy is not None) == (c.selected or c.strategy.startswith("baseline")), c.name
    shipped = {a.file: a for a in report.shipped}
    assert shipped["model.onnx"].accuracy == pytest.approx(sel.test_accuracy, abs=0.01)  # the same images

    # shuffled test labels change the test figures only: every decision is the same
    shuffled, bundle2 = _run(monkeypatch, shuffle_test_labels=True)
    assert [o.reason for o in bundle2.test.openings] == [FINAL_EVALUATION]
    assert shuffled.selected.name == sel.name and shuffled.selected.accuracy == sel.accuracy
    assert [(c.name, c.accuracy, c.finetuned_accuracy) for c in shuffled.strategies] == [
        (c.name, c.accuracy, c.finetuned_accuracy) for c in report.strategies
    ]
    assert shuffled.selected.test_accuracy < 0.3  # labels permuted: near chance (10 classes)


def test_screening_bar_keeps_the_recovered_few_and_the_max_drop_floor_exact():
    from edgeprune.halving import Halving, Top
    from edgeprune.pipeline import ScreeningBar
    from edgeprune.report import Candidate

    def cand(sparsity):
        return Candidate("x", "magnitude", "s", "mix-and-match", sparsity=sparsity, accuracy=0.9)

    cfg = CompressConfig(sparsity=0.8, finetune_top=2)
    bar = ScreeningBar.for_run(cfg, 0.95, Top(k=2, epochs=3))
    assert (bar.keep, bar.floor) == (2, 0.0)  # the 2nd best at the target: the two the recover stage takes
    assert bar.contends(cand(0.8)) and not bar.contends(cand(0.7))  # below the target raises no bar
    assert ScreeningBar.for_run(cfg, 0.95, Halving(1, 3, 2, keep=2)).keep == 1  # halving recovers every one
    drop = ScreeningBar.for_run(CompressConfig(max_drop=2.0), 0.95, None)
    assert drop.floor == pytest.approx(0.93) and drop.contends(cand(0.1))  # --max-drop: every sparsity

"""The recovery_recipes study: every candidate x recipe recovered and read once on the test split."""

import argparse
import json

import pytest
from edgeprune.benchmarks.lab import recovery_recipes


def test_summary_pairs_each_recipe_with_the_first_by_seed():
    a = argparse.Namespace(recipes=["distill-once", "distill"])
    per_seed = [
        {
            "dense": {"test": 0.95},
            "c | none": {"test": 0.50, "select": 0.5},
            "c | distill-once": {"test": 0.80, "select": 0.8},
            "c | distill": {"test": 0.81 + 0.01 * k, "select": 0.8},
        }
        for k in range(3)
    ]
    rows = {r["recipe"]: r for r in recovery_recipes.summarize(a, per_seed)["rows"]}
    assert rows["distill"]["delta"] == pytest.approx(2.0)  # +1, +2, +3 points
    assert rows["distill"]["delta_se"] == pytest.approx(1 / 3**0.5)
    assert rows["none"]["delta"] == pytest.approx(-30.0) and rows["distill-once"]["delta"] == 0.0


@pytest.mark.slow
def test_the_study_recovers_the_demo_and_writes_its_results(tmp_path):
    recovery_recipes.main(
        ["--ratios", "0.3", "--sparsities", "0.8", "--seeds", "0", "--epochs", "2", "--calib-size", "256",
         "--eval-size", "200", "--test-size", "300", "--out", str(tmp_path), "--tag", "t"]
    )  # fmt: skip
    result = json.loads((tmp_path / "recovery_recipes_t.json").read_text())
    seed = result["per_seed"][0]
    assert set(seed) == {"dense"} | {f"{c} | {r}" for c in ("channel 30%", "lamp 80%") for r in
                                     ("none", "distill-once", "distill")}  # fmt: skip
    for key, row in seed.items():
        if key != "dense":
            assert len(row["answers"]) == 300 and row["test"] == pytest.approx(sum(row["answers"]) / 300)
    # compaction without fine-tuning loses most of the accuracy; both recipes win much of it back
    none = seed["channel 30% | none"]["test"]
    assert none < seed["dense"]["test"] - 0.2
    assert (
        seed["channel 30% | distill"]["test"] > none + 0.2 and seed["channel 30% | distill-once"]["test"] > none + 0.2
    )
    md = (tmp_path / "recovery_recipes_t.md").read_text()
    assert "batch 16" in md and "| lamp 80% | distill |" in md  # 256 images: the rule's batch

"""The structured speed benchmark (issue 3): its selection helpers, and one small end-to-end run."""

import json
import math
import socket
import tempfile

import numpy as np
import pytest
from edgeprune.benchmarks.lab.structured_speed import equal_latency_pairs, interpolate, main, spread


def test_spread_keeps_the_goal_crossings_and_both_ends():
    items = list("abcdefgh")
    keys = [1.4, 1.5, 1.6, 1.7, 1.9, 2.2, 2.3, 2.4]
    # b: lowest >= 1.5, f: lowest >= 2.0; then 1.4, 1.9, 2.4 evenly
    assert spread(items, keys, 5, (1.5, 2.0)) == ["a", "b", "e", "f", "h"]
    assert spread(items, keys, 2) == ["a", "h"]
    assert spread(["x", "y"], [2.0, 1.0], 5) == ["y", "x"]  # fewer than k: all, in key order
    assert spread(items, keys, 1, (3.0,)) == ["h"]  # no item reaches the mark: the top end


def test_interpolate_is_linear_inside_and_none_outside():
    pts = [(2.0, 0.9), (1.0, 0.8)]
    assert interpolate(pts, 1.5) == pytest.approx(0.85)
    assert interpolate(pts, 1.0) == pytest.approx(0.8)
    assert interpolate(pts, 2.5) is None


def test_equal_latency_pairs_are_paired_per_image():
    rng = np.random.default_rng(0)
    base = rng.random(4000) < 0.9  # one model's hits; the others differ from it on a few images
    flip = np.zeros(4000, dtype=bool)
    flip[:40] = True
    better, worse = base | flip, base & ~flip
    mm = [{"name": "a", "ms_1t": 1.5}, {"name": "b", "ms_1t": 3.0}]
    uniform = [{"ratio": 0.3, "ms_1t": 1.0}, {"ratio": 0.5, "ms_1t": 2.0}]
    pairs, diffs = equal_latency_pairs(mm, uniform, [better, base], [worse, worse])
    # a (1.5 ms) lies between the uniform points; uniform 0.5 (2.0 ms) between a and b; b lies outside
    assert [p["model"] for p in pairs] == ["a", "uniform 0.50"]
    a, u = pairs
    expect_a = (better.astype(float) - worse).mean() * 100
    assert a["mm_minus_uniform_points"] == pytest.approx(expect_a)
    assert a["mm"] == pytest.approx(better.mean()) and a["uniform"] == pytest.approx(worse.mean())
    # at 2.0 ms Mix-and-Match is a third of the way from a (1.5) to b (3.0)
    expect_u = ((2 / 3) * better + (1 / 3) * base - worse.astype(float)).mean() * 100
    assert u["mm_minus_uniform_points"] == pytest.approx(expect_u)
    # paired: the models share almost every hit, so the standard error is far below the independent one
    independent = math.sqrt(2 * 0.9 * 0.1 / 4000) * 100
    assert 0 < a["paired_se_points"] < independent / 3
    assert len(diffs) == 2 and diffs[0].shape == (4000,)


@pytest.mark.slow
@pytest.mark.parametrize("split", [False, True], ids=["one-run", "bundle-then-measure"])
def test_small_run_writes_consistent_results(split, fmnist_idx_dir, monkeypatch, tmp_path):
    """One process, or the two halves a GPU machine and the target CPU share: ``--bundle`` (search,
    recover, export) then ``--measure`` (time and score here); both give the same results file."""
    monkeypatch.setenv("EDGEPRUNE_FASHION_MNIST", str(fmnist_idx_dir))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the benchmark's work folder goes
    search = [
        "--model", "fmnist_resnet", "--pretrained", "--calib-images", "300", "--screen-images", "100",
        "--speedups", "2.0", "--finetune-epochs", "1", "--uniform-ratios", "0.5", "--recover-max", "2",
        "--device", "cpu",
    ]  # fmt: skip
    timing = ["--runs", "10", "--repeats", "2", "--batch-check", "4", "--scale-sizes", "28,40", "--out", str(tmp_path)]
    if split:
        bundle = tmp_path / "bundle"
        assert main(search + ["--bundle", str(bundle)]) == 0
        state = json.loads((bundle / "state.json").read_text())
        onnx = sorted(p.name for p in bundle.glob("*.onnx"))
        rows = [state["dense"], *state["mix_and_match"], *state["uniform_torch_pruning"]]
        assert onnx == sorted(row["onnx"] for row in rows)
        assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("structured_speed_*"))
        assert main(["--measure", str(bundle), *timing]) == 0
    else:
        assert main(search + timing) == 0
    assert list(scratch.iterdir()) == []  # intermediate ONNX files removed
    r = json.loads((tmp_path / "structured_speed_fmnist_resnet.json").read_text())
    assert ("produced_on" in r) == split and r["recovery"]["device"] == "cpu" and r["latency_repeats"] == 2
    assert "shuffled" in r["latency_order"]
    h2h = r["summary"]["1t_head_to_head"]["mm_best_speedup_within_1_point"]
    assert h2h is None or h2h["speedup_1t_head_to_head"] > 0
    assert "drop_le_1_point_at_speedup_ge_2_1t_head_to_head" in r["checks"]
    assert (tmp_path / "structured_speed_fmnist_resnet.md").read_text().startswith("# Structured")
    # --recover-max 2, plus the pipeline's pick when it was not among them (then it is recovered too)
    assert 1 <= len(r["mix_and_match"]) <= 3 and len(r["uniform_torch_pruning"]) == 1
    assert sum(row["name"] == r["selected_by_pipeline"]["name"] for row in r["mix_and_match"]) >= 1
    for row in r["mix_and_match"] + r["uniform_torch_pruning"]:
        assert 0 < row["ms_1t"] < 50 and 0 < row["ms_2t"] < 50
        assert row["mac_ratio"] > 1.0 and 0.0 <= row["accuracy"] <= 1.0
        assert row["speedup_1t_head_to_head"] > 0 and row["speedup_2t_head_to_head"] > 0
        assert math.isclose(row["drop_points"], (r["dense"]["accuracy"] - row["accuracy"]) * 100)
    sel = r["selected_by_pipeline"]
    assert sel["parity_max_abs_diff"] <= 1e-4 and sel["onnx_bytes"] < sel["dense_onnx_bytes"]
    assert [c["input"] for c in r["input_scaling"]] == [28, 40]
    assert r["input_scaling"][1]["dense_mmacs"] > r["input_scaling"][0]["dense_mmacs"]
    assert all(c["mac_ratio"] > 1.0 and c["speedup_1t"] > 0 for c in r["input_scaling"])
    assert "distill" in r["recovery"]["finetune"] and r["recovery"]["ran_on"] == "in-process"
    eq = r["summary"]["equal_latency_1t"]  # both directions: every pair lies inside the other method's span
    for pair in eq["pairs"]:
        assert math.isclose(pair["mm_minus_uniform_points"], (pair["mm"] - pair["uniform"]) * 100)
    assert eq["mm_ahead"] <= len(eq["pairs"]) and eq["one_se_of_a_difference_points"] > 0
    assert (eq["paired_se_of_mean_points"] is None) == (not eq["pairs"])
    assert all(p["paired_se_points"] >= 0 for p in eq["pairs"])
    assert r["checks"]["mm_more_accurate_than_uniform_at_equal_latency"] == (eq["mm_ahead"] == len(eq["pairs"]) > 0)


def test_width_variants_keep_only_the_named_stages_whole():
    from edgeprune.benchmarks.lab.width_latency import variants

    widths = {"conv1": 16, "layer1.0.conv1": 8, "layer2.0.conv1": 16, "layer10.conv": 4}
    full = {"conv1": 16, "layer1.0.conv1": 16, "layer2.0.conv1": 32, "layer10.conv": 8}
    v = variants(widths, full, ["layer1.", "layer1.,layer2."])
    assert v["selected"] == widths
    assert v["selected, layer1. whole"] == {**widths, "layer1.0.conv1": 16}  # layer10 is not layer1.
    assert v["selected, layer1.,layer2. whole"] == {**widths, "layer1.0.conv1": 16, "layer2.0.conv1": 32}


def test_measure_without_a_bundle_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--measure", str(tmp_path / "nothing"), "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no state.json there" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_workers_and_a_bad_cluster_are_one_line_before_any_work(tmp_path, capsys):
    for argv, says in (
        (["--workers", "4"], "recoveries use Ray's workers, e.g. --cluster local:4"),
        (["--cluster", "local:0"], "bad --cluster 'local:0'"),
    ):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--out", str(tmp_path)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_an_unreachable_head_is_one_line_before_the_search(tmp_path, capsys):
    pytest.importorskip("ray")
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        address = f"127.0.0.2:{sock.getsockname()[1]}"  # nothing listens there once closed
    assert main(["--cluster", address, "--out", str(tmp_path / "out"), "--bundle", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edgeprune: cannot reach the Ray head at {address}") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_mean_sd():
    from edgeprune.benchmarks.lab.recovery_noise import mean_sd

    assert mean_sd([0.9]) == (0.9, 0.0)
    m, sd = mean_sd([0.90, 0.92, 0.94])
    assert m == pytest.approx(0.92) and sd == pytest.approx(0.02)


@pytest.mark.slow
def test_recovery_noise_recovers_both_models_once_per_seed(fmnist_idx_dir, monkeypatch, tmp_path):
    from edgeprune.benchmarks.lab import recovery_noise

    monkeypatch.setenv("EDGEPRUNE_FASHION_MNIST", str(fmnist_idx_dir))
    argv = [
        "--model", "fmnist_resnet", "--pretrained", "--calib-images", "300", "--screen-images", "100",
        "--seeds", "0,1", "--finetune-epochs", "1", "--device", "cpu", "--runs", "10", "--repeats", "1",
        "--gradient-samples", "64", "--out", str(tmp_path),
    ]  # fmt: skip
    assert recovery_noise.main(argv) == 0
    stem = "recovery_noise_fmnist_resnet_uniform_0.4"  # a ratio's dot: not Path.with_suffix
    r = json.loads((tmp_path / f"{stem}.json").read_text())
    mm, u, c = r["mix_and_match"], r["uniform"], r["comparison"]
    assert r["seeds"] == [0, 1] and r["held_out_test_images"] == 200
    assert r["recovery_ran_on"] == "in-process" and "early stopping on 10 % of the calibration" in r["recovery"]
    for m in (mm, u):
        assert len(m["accuracy_per_seed"]) == 2 and all(0.0 <= a <= 1.0 for a in m["accuracy_per_seed"])
        assert m["accuracy_mean"] == pytest.approx(sum(m["accuracy_per_seed"]) / 2)
        assert 0 < m["macs"] < r["dense"]["macs"] and 0 < m["ms_1t"] < 50 and m["speedup_1t"] > 0
    assert mm["name"].startswith("magnitude/") and u["ratio"] == 0.4
    assert c["mm_minus_uniform_points"] == pytest.approx((mm["accuracy_mean"] - u["accuracy_mean"]) * 100)
    assert c["paired_se_over_images_points"] >= 0 and c["se_from_seed_spread_points"] >= 0
    assert (tmp_path / f"{stem}.md").read_text().startswith("# Equal latency, replicated")


@pytest.mark.slow
def test_latency_allocation_times_every_architecture_and_scores_both_predictors(fmnist_idx_dir, monkeypatch, tmp_path):
    from edgeprune.benchmarks.lab import latency_allocation

    monkeypatch.setenv("EDGEPRUNE_FASHION_MNIST", str(fmnist_idx_dir))
    argv = [
        "--model", "fmnist_resnet", "--pretrained", "--calib-images", "300", "--screen-images", "100",
        "--runs", "10", "--repeats", "1", "--gradient-samples", "64", "--out", str(tmp_path),
    ]  # fmt: skip
    assert latency_allocation.main(argv) == 0
    r = json.loads((tmp_path / "latency_allocation_fmnist_resnet.json").read_text())
    rows = r["candidates"]
    assert len(rows) == 3 * (10 + 3)  # every candidate of the three signals, latency allocations included
    assert sum(row["latency_model"] for row in rows) == 9
    assert [row["speedup"] for row in rows] == sorted((row["speedup"] for row in rows), reverse=True)
    for row in rows:
        assert 0 < row["macs"] < r["dense"]["macs"] and row["speedup"] > 0 and 0.0 <= row["screen_accuracy"] <= 1.0
        assert row["predicted_speedup_model"] >= 1.0 and row["predicted_speedup_macs"] >= 1.0
        assert row["speedup_head_to_head"] > 0
    err = r["prediction_error"]
    assert all(0 <= e < 1 for e in err.values()) and len(err) == 4 and r["latency_model_scale"] > 0
    assert (tmp_path / "latency_allocation_fmnist_resnet.md").read_text().startswith("# Latency model")


@pytest.mark.slow
def test_recovery_noise_recovers_a_named_pick(fmnist_idx_dir, monkeypatch, tmp_path, capsys):
    from edgeprune.benchmarks.lab import recovery_noise

    monkeypatch.setenv("EDGEPRUNE_FASHION_MNIST", str(fmnist_idx_dir))
    argv = [
        "--model", "fmnist_resnet", "--pretrained", "--calib-images", "300", "--screen-images", "100",
        "--seeds", "0", "--finetune-epochs", "1", "--device", "cpu", "--runs", "10", "--repeats", "1",
        "--gradient-samples", "64", "--latency-costs", "--out", str(tmp_path),
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="no candidate 'magnitude/nope'; the search built .*magnitude/latency"):
        recovery_noise.main([*argv, "--pick", "magnitude/nope"])
    assert not list(tmp_path.iterdir())
    assert recovery_noise.main([*argv, "--pick", "magnitude/latency"]) == 0
    r = json.loads((tmp_path / "recovery_noise_fmnist_resnet_uniform_0.4_magnitude_latency.json").read_text())
    assert r["mix_and_match"]["name"] == "magnitude/latency" and len(r["uniform"]["accuracy_per_seed"]) == 1

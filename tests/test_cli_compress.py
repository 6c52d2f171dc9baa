"""`edgeprune compress` end to end on the bundled demo, and every bad input from the Foundation issue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from edgeprune.export import onnx_weight_sparsity
from PIL import Image

from edgeprune.cli import main
from edgeprune.data import load_demo_arrays
from edgeprune.recovery import finetune_batch
from edgeprune.targets import get_target, local_cores, threads_note

FAST = ["--calib-size", "300", "--eval-size", "400", "--finetune-epochs", "1", "--finetune-top", "1",
        "--bench-runs", "5", "--quantize", "none", "-q"]  # fmt: skip


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _check_artifacts(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    for name in ("model.onnx", "dense.onnx", "report.md", "pareto.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".edgeprune-staging-*")), "staging folder left behind"
    sel = report["selected"]
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    zeros, total = onnx_weight_sparsity(out / "model.onnx")
    assert zeros == sel["onnx_zeros"] and zeros / total == pytest.approx(sel["onnx_sparsity"])
    assert sel["parity_max_abs_diff"] <= 1e-4
    # ORT agrees with PyTorch on the same (test) images; the selection accuracy is the search's
    assert sel["onnx_accuracy"] == pytest.approx(sel["test_accuracy"], abs=0.01)
    assert report["dense"]["latency_ms"]["p50"] > 0 and sel["latency_ms"]["p50"] > 0
    assert {layer["role"] for layer in report["layers"]} >= {"norm", "conv", "classifier", "stem"}
    for layer in report["layers"]:
        lo, hi = layer["range"]
        assert layer["unit"] == "weight" and layer["units"] == layer["params"]
        assert layer["kept"] == layer["units"] - round(layer["removed"] * layer["units"])
        if layer["role"] == "norm":
            assert layer["removed"] == 0.0
    return report


@pytest.mark.slow
def test_compress_mix_and_match_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["compress", "--target", "arm64", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    report = _check_artifacts(out)
    assert report["method"] == "mix-and-match" and report["target"] == "arm64"
    # --device auto is recorded as what ran (no GPU in CI)
    assert report["config"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    cands = report["strategies"]
    signals = {"magnitude", "gradient", "product"}
    assert {c["signal"] for c in cands if "baseline:" not in c["strategy"]} == signals
    # the search contains its baselines: each one's plan at the target, ranked by every signal (issue 15);
    # a signal that collapsed in screening keeps its probed candidates and lists the rest as skipped
    screening = report["screening"]
    assert screening["candidates"] == len(cands) + len(screening["skipped"])
    assert screening["evaluated"] == len(cands) - len(screening["duplicates"])
    for b in ("mag", "snip", "grasp", "lamp", "erk"):
        assert {f"{s}/baseline:{b}" for s in signals} <= {c["name"] for c in cands} | set(screening["skipped"]), b
    for name in screening["skipped"]:
        assert name.split("/")[0] in screening["skipped_signals"], name
    # the strategies compare allocations at the target; /unscaled ones are kept only as sparser points
    for c in cands:
        if c["strategy"].endswith("/unscaled"):
            assert c["sparsity"] > 0.805, c["name"]
        else:
            assert 0.8 - 1e-6 <= c["sparsity"] <= 0.805, c["name"]
    assert sum(c["selected"] for c in cands) == 1
    assert any(c["pareto"] for c in cands)
    # recovery takes the --finetune-top 1 best screened plus each range baseline's own run, whatever it
    # screened (a baseline that recovers best must reach the final comparison); the pick is one of them
    own = {"magnitude/baseline:mag", "snip/baseline:snip", "grasp/baseline:grasp", "lamp/baseline:lamp",
           "magnitude/baseline:erk"}  # fmt: skip
    own = {screening["duplicates"].get(n, n) for n in own}
    recovered = {c["name"] for c in cands if c["finetuned_accuracy"] is not None}
    best = max((c for c in cands if c["name"] not in own and c["sparsity"] >= 0.8 - 1e-6 and c["name"] not in
                screening["duplicates"]), key=lambda c: c["accuracy"])  # fmt: skip
    assert own <= recovered and recovered - own <= {best["name"]}
    assert next(c for c in cands if c["selected"])["name"] in recovered
    sel = report["selected"]
    assert sel["sparsity"] >= 0.8  # the baseline candidates reach any target, whatever the rules cap
    assert report["dense"]["accuracy"] > 0.9  # the bundled demo model is trained
    assert set(report["timings"]) >= {"load", "sensitivity", "screening", "export", "benchmark", "total"}
    assert "selected" in stdout
    # the summary leads with what ships: every file, dense.onnx as the reference, before the pick's reasons
    assert stdout.index("shipped files") < stdout.index("model.onnx") < stdout.index("dense.onnx (ref)")
    assert stdout.index("dense.onnx (ref)") < stdout.index("selected ")
    shipped = {a["file"]: a for a in report["shipped"]}
    assert set(shipped) == {"model.onnx", "dense.onnx"}  # FAST: --quantize none
    assert shipped["model.onnx"]["accuracy"] == sel["onnx_accuracy"] and shipped["model.onnx"]["latency_ms"]
    # each recovered candidate's selection log-likelihood is recorded beside its top-1 (a diagnostic)
    assert all(c["finetuned_loglik"] < 0 for c in cands if c["name"] in recovered)
    # the artifact records its splits: bench --data finds compress's test split with no split option again
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert (meta["edgeprune.selection_size"], meta["edgeprune.test_size"], meta["edgeprune.split_seed"]) == (
        "400",
        "2000",
        "0",
    )
    bench_json = tmp_path / "bench.json"
    args = ["bench", str(out / "model.onnx"), "--data", "demo", "--eval-size", "2000", "--runs", "2", "--warmup", "0"]
    code, _, err = run([*args, "--json", str(bench_json)], capsys)
    assert code == 0, err
    assert json.loads(bench_json.read_text())["results"][0]["accuracy"] == sel["onnx_accuracy"]


@pytest.mark.slow
def test_compress_baseline_hits_exact_sparsity(tmp_path, capsys):
    out = tmp_path / "mag"
    code, _, err = run(["compress", "--method", "mag", "--sparsity", "0.9", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    report = _check_artifacts(out)
    assert [c["name"] for c in report["strategies"]] == ["mag"]
    total = sum(layer["params"] for layer in report["layers"] if layer["role"] != "norm")
    assert abs(report["selected"]["sparsity"] - 0.9) <= 1 / total


@pytest.mark.slow
def test_compress_default_demo_run(tmp_path, capsys, monkeypatch):
    """The README's main command, exactly as a user types it (defaults), in a fresh directory."""
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run(["compress", "--target", "arm64"], capsys)
    assert code == 0, err
    report = _check_artifacts(tmp_path / "edgeprune-out")
    assert report["selected"]["sparsity"] >= 0.8
    assert report["selected"]["int8_accuracy"] is not None  # arm64 profile ships INT8 by default
    assert (tmp_path / "edgeprune-out" / "model.int8.onnx").is_file()
    # default threads: arm64's 2, on this machine at most its cores minus one, and the report says so
    arm64 = get_target("arm64")
    assert report["bench"]["threads"] == max(1, min(arm64.threads, local_cores() - 1))
    capped = [n for n in report["notes"] if n.startswith("latency timed at")]
    assert capped == ([threads_note(None, arm64, report["bench"]["threads"])] if local_cores() <= arm64.threads else [])


HALVING = ["--recover", "halving", "--signals", "magnitude", "--range-baselines", "mag", "--calib-size", "128",
           "--eval-size", "200", "--finetune-epochs", "2", "--finetune-top", "1",
           "--bench-runs", "3", "--quantize", "none", "--threads", "1", "--resume", "-q"]  # fmt: skip


@pytest.mark.slow
def test_compress_recovers_by_halving_and_resumes(tmp_path, capsys):
    """--recover halving in-process: every distinct candidate 1 epoch, the better half on to 2; the report
    has each candidate's rungs; --resume re-runs without training and picks the same."""
    out = tmp_path / "out"
    code, _, err = run(["compress", "--out", str(out), *HALVING], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    trained = [c for c in report["strategies"] if c["recovery"]]
    first = [c for c in trained if len(c["recovery"]) == 1]
    second = [c for c in trained if len(c["recovery"]) == 2]
    assert len(trained) == len(report["strategies"]) - len(report["screening"]["duplicates"])
    assert second and len(second) == max(1, -(-len(trained) // 2)) and len(first) == len(trained) - len(second)
    for c in trained:
        rungs = c["recovery"]
        assert [r["epochs"] for r in rungs] == [1, 2][: len(rungs)] and all(r["steps"] > 0 for r in rungs)
        assert (c["finetuned_accuracy"] is not None) == (len(rungs) == 2)  # survivors of the last rung only
        assert c["improved"] == (rungs[-1]["accuracy"] > rungs[0]["start_accuracy"])
    sel = report["selected"]
    assert sel["name"] in {c["name"] for c in second}  # the pick is one recovery finished
    md = (out / "report.md").read_text()
    assert "## Recovery" in md
    # 128 calibration images: the fine-tuning batch is the rule's 16 (8 steps an epoch), named in the report
    assert report["config"]["finetune_batch"] == finetune_batch(128) == 16
    assert "Recipe `distill`, batch 16 (128 calibration images)" in md
    assert all(r["steps"] == 8 * r["epochs"] for c in trained for r in c["recovery"][:1])
    assert ("recovery did not improve" in md) == any(c["improved"] is False for c in trained)
    assert (out / ".edgeprune-recover").is_dir()

    code, _, err = run(["compress", "--out", str(out), *HALVING], capsys)
    assert code == 0, err
    again = json.loads((out / "report.json").read_text())
    assert again["selected"]["name"] == sel["name"]
    assert all(r["reused"] for c in again["strategies"] for r in c["recovery"])


# ---- bad input: one line, non-zero exit, nothing left in --out ---------------------------------------------


def _folder(root: Path, classes: int, per_class: int = 3, mode: str = "L") -> Path:
    images, _ = load_demo_arrays()
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = Image.fromarray(images[c * per_class + i])
            img.convert(mode).save(root / f"class{c}" / f"{i}.png")
    return root


def _bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    corrupt = tmp / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint")
    other = tmp / "other.pth"
    torch.save({"fc.weight": torch.zeros(1000, 512)}, other)
    wrong_shape = tmp / "wrong.pth"
    from edgeprune.models import load_model

    sd = load_model("fmnist_resnet", num_classes=5).state_dict()
    torch.save(sd, wrong_shape)
    bad_role = tmp / "bad_role.json"
    bad_role.write_text(json.dumps({"rules": [{"roles": ["attention"], "range": [0, 0.5]}]}))
    inverted = tmp / "inverted.json"
    inverted.write_text(json.dumps({"rules": [{"roles": ["conv"], "range": [0.9, 0.1]}]}))
    (tmp / "empty").mkdir()
    three = _folder(tmp / "three", classes=3)
    rgb = _folder(tmp / "rgb", classes=10, per_class=2, mode="RGB")
    blocker = tmp / "a_file"
    blocker.write_text("x")
    return {
        "missing checkpoint": (["--checkpoint", str(tmp / "nope.pth")], "not found"),
        "corrupt checkpoint": (["--checkpoint", str(corrupt)], "checkpoint"),
        "checkpoint for another architecture": (["--model", "fmnist_resnet", "--checkpoint", str(other)], "fc"),
        "checkpoint with other classes": (["--model", "fmnist_resnet", "--checkpoint", str(wrong_shape)], "fc.weight"),
        "unknown timm name": (["--model", "resnet_does_not_exist"], "resnet"),
        "sparsity 1.0": (["--sparsity", "1.0"], "[0, 1)"),
        "negative sparsity": (["--sparsity", "-0.1"], "[0, 1)"),
        "missing data folder": (["--data", f"imagefolder:{tmp / 'missing'}"], "missing"),
        "empty data folder": (["--data", f"imagefolder:{tmp / 'empty'}"], "empty"),
        "classes mismatch": (
            ["--data", f"imagefolder:{three}", "--num-classes", "10", "--model", "fmnist_resnet", "--image-size", "28"],
            "classes",
        ),  # fmt: skip
        "channels mismatch": (["--data", f"imagefolder:{rgb}", "--in-chans", "5", "--image-size", "28"], "chan"),
        "rules with unknown role": (["--rules", str(bad_role)], "unknown role"),
        "rules with inverted range": (["--rules", str(inverted)], "min <= max"),
        "unknown method": (["--method", "obs"], "--method"),
        "unknown signal": (["--signals", "hessian"], "signal"),
        "unwritable output": (["--out", str(blocker / "sub")], "output directory"),
        "unknown target": (["--target", "z80"], "target"),
        "unknown recovery recipe": (["--recovery", "magic"], "--recovery"),
        "unknown device": (["--device", "tpu"], "--device"),
        # refused before anything loads: the data folder does not exist either
        "bad cluster spec": (["--cluster", "ray://", "--data", f"imagefolder:{tmp / 'missing'}"], "bad --cluster"),
    }


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory):
    return _bad_cases(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    "case",
    [
        "missing checkpoint", "corrupt checkpoint", "checkpoint for another architecture",
        "checkpoint with other classes", "unknown timm name", "sparsity 1.0", "negative sparsity",
        "missing data folder", "empty data folder", "classes mismatch", "channels mismatch",
        "rules with unknown role", "rules with inverted range", "unknown method", "unknown signal",
        "unwritable output", "unknown target", "unknown recovery recipe", "unknown device", "bad cluster spec",
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_leaves_nothing(case, bad_cases, tmp_path, capsys):
    args, expected = bad_cases[case]
    out = tmp_path / "out"
    argv = ["compress", "--out", str(out), *args] if "--out" not in args else ["compress", *args]
    code, stdout, err = run(argv + ["-q"], capsys)
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("edgeprune: error:") and "Traceback" not in err
    assert expected.lower() in lines[0].lower(), lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_onnx_weights_are_really_zero_where_torch_is(tmp_path, capsys):
    """Cheap cross-check of the exporter on the demo model at one fixed mask (no CLI)."""
    from edgeprune.export import export_onnx

    from edgeprune.models import load_model

    model = load_model("demo")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight[m.weight.abs() < m.weight.abs().median()] = 0
    x = torch.randn(4, 1, 28, 28)
    res = export_onnx(model, x[:1], tmp_path / "m.onnx", check_inputs=x)
    assert res.zeros_onnx >= res.zeros_torch > 0 and res.parity_max_abs_diff <= 1e-4
    assert np.isfinite(res.parity_max_abs_diff)

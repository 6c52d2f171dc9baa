"""The paper benchmark (`edgeprune.benchmarks.lab.paper`): selection rule, and `--quick` end to end (schema)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from edgeprune.benchmarks.lab import paper

from edgeprune.cluster import InProcess
from edgeprune.masking import build_masks
from edgeprune.pipeline import CompressConfig, Workspace, load_workspace_inputs
from edgeprune.strategies import STRATEGY_NAMES


def _cands(*pairs: tuple[float, float]) -> list[SimpleNamespace]:
    return [SimpleNamespace(sparsity=s, accuracy=a) for s, a in pairs]


def test_pick_candidate_prefers_the_window_then_compress_rule() -> None:
    # In the window [0.9, 0.905]: the most accurate there, even if a sparser one outside is more accurate.
    i, matched, _ = paper.pick_candidate(_cands((0.89, 0.99), (0.901, 0.80), (0.904, 0.85), (0.95, 0.90)), 0.9)
    assert (i, matched) == (2, True)
    # None in the window: compress's rule (most accurate at or above the level), flagged as unmatched.
    i, matched, why = paper.pick_candidate(_cands((0.89, 0.99), (0.93, 0.80), (0.96, 0.85)), 0.9)
    assert (i, matched) == (2, False) and "baselines run at its sparsity" in why
    # None reaches the level: the sparsest.
    i, matched, _ = paper.pick_candidate(_cands((0.80, 0.99), (0.85, 0.70)), 0.9)
    assert (i, matched) == (1, False)


def test_reduction() -> None:
    assert paper.reduction(1.0, 2.0) == pytest.approx(0.5)
    assert paper.reduction(3.0, 2.0) == pytest.approx(-0.5)
    assert paper.reduction(1.0, 0.0) is None


@pytest.mark.slow
def test_plans_ignore_weights_left_by_previous_candidates() -> None:
    """A baseline planned after another candidate was screened must rank the dense weights, not its zeros."""
    torch.manual_seed(0)
    cfg = CompressConfig(model="demo", data="demo", calib_size=64, eval_size=64, gradient_samples=64, batch_size=64)
    model, data = load_workspace_inputs(cfg)
    ws = Workspace(cfg, model, data, with_hessian=False)
    fresh = paper.plans(ws, "snip", 0.8)[0].plan
    ws.screen(paper.plans(ws, "mag", 0.8)[0])  # leaves MAG's mask in the live weights
    assert paper.plans(ws, "snip", 0.8)[0].plan == fresh
    assert fresh != paper.plans(ws, "mag", 0.8)[0].plan


def test_a_level_fine_tunes_every_method_in_one_recovery_on_the_executor(tmp_path) -> None:
    """The level's recovery goes through `recover.recover` (one task per method, in-process here): each
    fine-tuned row keeps its method's mask and sparsity, its accuracy is the recovered weights' on the
    evaluation split, and recovering it again gives the same weights."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = CompressConfig(
        model="demo", data="demo", calib_size=256, eval_size=64, gradient_samples=64, batch_size=64,
        signals=("magnitude",), recovery="paper", finetune_lr=1e-4,
    )  # fmt: skip
    model, data = load_workspace_inputs(cfg)
    ws = Workspace(cfg, model, data)  # GraSP's Hessian: a range baseline of Mix-and-Match
    s = paper.Settings(baselines=("mag",), finetune_epochs=1, threads=1, int8=False)
    ev = paper.Evaluator(ws, s, tmp_path)
    dense, ex = ws.accuracy(), InProcess()
    res = paper.run_level(ws, ev, s, "demo", 0.8, dense, {}, executor=ex)
    assert ex.tasks_run == 2  # Mix-and-Match's pick and MAG, one recovery each
    assert [(r.method, r.finetuned) for r in res.rows] == [(m, f) for m in ("mix-and-match", "mag") for f in (0, 1)]
    for zs, ft in zip(res.rows[::2], res.rows[1::2], strict=True):
        assert ft.sparsity == zs.sparsity and ft.candidate == zs.candidate and ft.finetune_epochs == 1
        assert ft.drop == pytest.approx((dense - ft.fp32) * 100) and ft.int8 is None
    # the MAG row's weights, recovered again: masks kept through the fine-tuning, and the row's accuracy
    cp = paper.plans(ws, "mag", res.target_sparsity)[0]
    ws.screen(cp)
    (state,) = paper.finetune_all(ws, s, [cp], ["mag"], InProcess())
    masks = build_masks(cp.scores, cp.plan)
    for name, keep in masks.items():
        assert torch.all(state[f"{name}.weight"][~keep] == 0)
    # it trained: kept weights moved (early stopping keeps the start when no epoch beats it)
    assert any(not torch.equal(state[f"{n}.weight"][k], ws.original[f"{n}.weight"][k]) for n, k in masks.items())
    ws.model.load_state_dict(state)
    assert ws.accuracy() == res.rows[3].fp32


@pytest.mark.slow
def test_quick_run_writes_the_schema(tmp_path) -> None:
    torch.set_num_threads(1)
    assert paper.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    doc = json.loads((tmp_path / "paper_quick.json").read_text())
    assert doc["schema"] == paper.SCHEMA
    assert {"command", "machine", "versions", "seed", "wall_s", "settings"} <= set(doc)
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["cpu"]

    (model,) = doc["models"].values()
    assert model["model"] == "fmnist_resnet" and 0.5 < model["dense_fp32"] <= 1.0
    (level,) = model["levels"]
    assert level["level"] == 0.9
    # --quick: one signal; its strategies scaled to the level, then the baselines' own plans (issue 15)
    names = {c["name"] for c in level["candidates"]}
    assert {f"product/baseline:{b}" for b in ("mag", "snip", "grasp", "lamp", "erk")} <= names
    assert any(c["strategy"] in STRATEGY_NAMES for c in level["candidates"])
    assert sum(c["selected"] for c in level["candidates"]) == 1

    methods = ["mix-and-match", "mag", "snip", "erk"]
    rows = doc["results"]
    assert sorted((r["method"], r["finetuned"]) for r in rows) == sorted((m, f) for m in methods for f in (0, 1))
    mm_sparsity = next(r["sparsity"] for r in rows if r["method"] == "mix-and-match")
    for r in rows:
        assert 0.0 <= r["fp32"] <= 1.0 and r["int8"] is not None and 0.0 <= r["int8"] <= 1.0
        assert r["drop"] == pytest.approx((model["dense_fp32"] - r["fp32"]) * 100)
        # Matched sparsity: every baseline within 0.5 % of the selected Mix-and-Match candidate.
        assert abs(r["sparsity"] - mm_sparsity) <= paper.WINDOW + 1e-6
        assert r["finetune_epochs"] == (1 if r["finetuned"] else 0)
    assert set(level["reduction"]) == {"mag", "snip", "erk"}

    md = (tmp_path / "paper_quick.md").read_text()
    assert "python -m edgeprune.benchmarks.lab.paper --quick" in md and "Degradation reduction" in md
    assert f"of its {len(level['candidates'])} candidates" in md  # the count screened, not a fixed one
    assert (tmp_path / "paper_quick_fmnist_resnet.png").stat().st_size > 10_000


def _fake_model(name: str, mm_drop: float, mag_drop: float, lv: float = 0.9) -> paper.ModelResult:
    dense = 0.9
    rows = [
        paper.Row(name, lv, m, ft, lv, dense - d / 100, dense - d / 100, d, d, m, lv)
        for m, d in (("mix-and-match", mm_drop), ("mag", mag_drop))
        for ft in (False, True)
    ]
    cands = [{"name": "product/p50", "signal": "product", "strategy": "p50", "sparsity": lv, "zero_shot_raw": 0.5,
              "fp32": 0.85, "selected": True}]  # fmt: skip
    level = paper.LevelResult(lv, lv, True, "test", cands, rows, {"mag": {"zero_shot": None, "finetuned": None}})
    return paper.ModelResult(name, "weights.pt", dense, dense, 1000, 0, [level], {"screen_mm": 2.0}, 1.0)


def test_candidate_counts_say_the_span_screened() -> None:
    one, two = _fake_model("a", 1.0, 2.0), _fake_model("b", 1.0, 2.0)
    assert paper.candidate_counts([one]) == "1"
    two.levels[0].candidates = two.levels[0].candidates * 57
    assert paper.candidate_counts([one, two]) == "1–57"


def test_outputs_merge_models_of_compatible_runs(tmp_path) -> None:
    s = paper.Settings(baselines=("mag",), out=str(tmp_path))
    meta = {"command": "x", "versions": {}, "seed": 0}
    paper.write_outputs([_fake_model("fmnist_vgg", 1.0, 2.0)], s, dict(meta), tmp_path, "paper")
    paper.write_outputs([_fake_model("fmnist_vit", 3.0, 2.0)], s, dict(meta), tmp_path, "paper")
    doc = json.loads((tmp_path / "paper.json").read_text())
    assert list(doc["models"]) == ["fmnist_vgg", "fmnist_vit"]  # zoo order, both kept
    assert "fmnist_resnet18" in doc["missing"]
    checks = doc["checks"]["finetuned"]["vs_mag_at_highest_level"]
    assert checks["fmnist_vgg"] == {"reduction": pytest.approx(0.5), "ok": True}
    assert checks["fmnist_vit"]["ok"] is False
    # Another evaluation split changes the numbers: the old models are dropped, not mixed in.
    s2 = paper.Settings(baselines=("mag",), out=str(tmp_path), eval_size=123)
    paper.write_outputs([_fake_model("fmnist_swin", 1.0, 2.0)], s2, dict(meta), tmp_path, "paper")
    assert list(json.loads((tmp_path / "paper.json").read_text())["models"]) == ["fmnist_swin"]
    assert (tmp_path / "paper_fmnist_swin.png").is_file() and "fmnist_swin" in (tmp_path / "paper.md").read_text()


def test_merge_joins_runs_split_by_level_and_model(tmp_path) -> None:
    """Runs split over machines (one level or model each) merge into one paper.json; other settings refuse."""
    meta = {"command": "x", "versions": {}, "seed": 0}
    paths = []
    for i, (name, lv) in enumerate((("fmnist_vgg", 0.8), ("fmnist_vgg", 0.9), ("fmnist_vit", 0.9))):
        s = paper.Settings(baselines=("mag",), levels=(lv,))
        d = tmp_path / f"run{i}"
        paper.write_outputs([_fake_model(name, 1.0, 2.0, lv)], s, dict(meta), d, "paper")
        paths.append(d / "paper.json")
    out = paper.merge_runs(paths, tmp_path / "merged")
    doc = json.loads(out.read_text())
    assert doc["settings"]["levels"] == [0.8, 0.9]
    vgg = doc["models"]["fmnist_vgg"]
    assert [lv["level"] for lv in vgg["levels"]] == [0.8, 0.9] and vgg["complete"] is True
    assert vgg["wall_s"] == 2.0 and vgg["timings"] == {"screen_mm": 4.0}
    assert doc["models"]["fmnist_vit"]["complete"] is True  # it was only asked for 90 %
    assert set(doc["checks"]["finetuned"]["vs_mag_at_highest_level"]) == {"fmnist_vgg", "fmnist_vit"}
    other = tmp_path / "other"
    odd = paper.Settings(baselines=("mag",), eval_size=7)
    paper.write_outputs([_fake_model("fmnist_swin", 1.0, 2.0)], odd, dict(meta), other, "paper")
    with pytest.raises(paper.EdgepruneError, match="eval_size"):
        paper.merge_runs([paths[0], other / "paper.json"], tmp_path / "merged2")


@pytest.mark.slow
def test_quick_run_resumes_finished_levels(tmp_path) -> None:
    """An interrupted run keeps its finished levels; --resume completes only the missing one."""
    torch.set_num_threads(1)
    args = ["--quick", "--out", str(tmp_path), "--threads", "1", "--baselines", "mag", "--levels", "0.5,0.6"]
    args += ["--calib-size", "128", "--eval-size", "128", "--no-int8"]
    seen: list[paper.ModelResult] = []

    s = paper.parse_settings(args)

    def write_then_stop(partial: paper.ModelResult) -> None:
        seen.append(partial)
        paper.write_outputs([partial], s, _meta(), tmp_path, "paper_quick")
        raise KeyboardInterrupt  # as if the run was killed right after writing the first level

    with pytest.raises(KeyboardInterrupt):
        paper.run_model("fmnist_resnet", s, on_level=write_then_stop)
    assert len(seen) == 1
    doc = json.loads((tmp_path / "paper_quick.json").read_text())
    assert doc["models"]["fmnist_resnet"]["complete"] is False
    assert [lv["level"] for lv in doc["models"]["fmnist_resnet"]["levels"]] == [0.5]
    assert doc["checks"]["finetuned"]["vs_mag_at_highest_level"] == {}  # partial models are not judged
    first = doc["models"]["fmnist_resnet"]["levels"][0]

    assert paper.main([*args, "--resume"]) == 0
    doc = json.loads((tmp_path / "paper_quick.json").read_text())
    model = doc["models"]["fmnist_resnet"]
    assert model["complete"] is True and [lv["level"] for lv in model["levels"]] == [0.5, 0.6]
    assert model["levels"][0] == first  # kept, not recomputed
    assert all(r["int8"] is None for r in doc["results"])  # --no-int8


def _meta() -> dict:
    return {"command": "test", "versions": {}, "seed": 0}

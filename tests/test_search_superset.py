"""Issue 15: the Mix-and-Match search contains its baselines, and compares allocations at one sparsity.

On the bundled demo model (a small trained ResNet), with a few calibration images: real plans, real masks.
"""

from __future__ import annotations

import pytest
import torch

from edgeprune.baselines import BASELINES, RANGE_BASELINES
from edgeprune.errors import EdgepruneError
from edgeprune.masking import build_masks
from edgeprune.pipeline import CompressConfig, Workspace, load_workspace_inputs, own_runs
from edgeprune.strategies import TOLERANCE, UNSCALED, reachable

SMALL = dict(model="demo", data="demo", calib_size=64, eval_size=64, gradient_samples=64, batch_size=64)


@pytest.fixture(scope="module")
def ws() -> Workspace:
    torch.manual_seed(0)
    cfg = CompressConfig(**SMALL)
    model, data = load_workspace_inputs(cfg)
    return Workspace(cfg, model, data)


def zeros(cp) -> float:
    """The fraction of prunable weights the candidate's masks zero."""
    masks = build_masks(cp.scores, cp.plan)
    return sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def by_name(cps) -> dict:
    names = [cp.candidate.name for cp in cps]
    assert len(names) == len(set(names)), "candidate names must be unique"
    return {cp.candidate.name: cp for cp in cps}


def test_baseline_candidates_reproduce_the_baseline_runs_exactly(ws: Workspace) -> None:
    cands = by_name(ws.plans("mix-and-match", 0.8))
    own = own_runs(ws.cfg, {})  # what the recover stage takes whatever it screens
    assert len(own) == len(RANGE_BASELINES) and own <= set(cands)
    for b in RANGE_BASELINES:
        base = ws.plans(b, 0.8)[0]
        rank = BASELINES[b].ranks_like or b
        mine = cands[f"{rank}/baseline:{b}"]
        assert mine.candidate.name in own
        assert mine.plan == base.plan, b
        ours, theirs = build_masks(mine.scores, mine.plan), build_masks(base.scores, base.plan)
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs), b
        # and every signal ranks the same allocation too
        for signal in ws.cfg.signals:
            assert cands[f"{signal}/baseline:{b}"].plan == base.plan
    # screened, the MAG candidate is the MAG run: same sparsity, same accuracy
    mag = ws.screen(ws.plans("mag", 0.8)[0])
    mine = ws.screen(cands["magnitude/baseline:mag"])
    assert (mine.sparsity, mine.accuracy, mine.zero_shot_accuracy) == (
        mag.sparsity,
        mag.accuracy,
        mag.zero_shot_accuracy,
    )


@pytest.mark.parametrize("target", [0.8, 0.85])
def test_every_strategy_candidate_lands_on_the_target(ws: Workspace, target: float) -> None:
    ranges = ws.ranges(target)
    low, high = reachable(ws.layer_stats(ranges))
    assert low <= target <= high  # the demo's ranges reach these levels
    cands = by_name(ws.plans("mix-and-match", target, ranges))
    scaled = [cp for n, cp in cands.items() if "baseline:" not in n and UNSCALED not in n]
    assert {cp.candidate.signal for cp in scaled} == set(ws.cfg.signals)
    assert len(scaled) >= 6 * len(ws.cfg.signals)  # duplicates of another plan are dropped, the rest kept
    for cp in scaled:
        assert target <= zeros(cp) <= target + TOLERANCE, cp.candidate.name
        for name, rho in cp.plan.items():
            assert ranges[name].lo - 1e-12 <= rho <= ranges[name].hi + 1e-12
    for n, cp in cands.items():
        if n.endswith(UNSCALED):
            assert zeros(cp) > target + TOLERANCE, n  # kept only as a sparser point
        if "baseline:" in n:
            assert zeros(cp) == pytest.approx(target, abs=1e-4), n
    # the measured sparsity after masking agrees (what selection compares)
    screened = ws.screen(scaled[0])
    assert target <= screened.sparsity <= target + TOLERANCE


def test_an_unreachable_target_leaves_the_baselines_to_compete(ws: Workspace) -> None:
    ranges = ws.ranges(0.97)
    _, high = reachable(ws.layer_stats(ranges))
    assert high < 0.97  # the safety rules keep the small layers mild
    cands = by_name(ws.plans("mix-and-match", 0.97, ranges))
    strategies = {cp.candidate.strategy for cp in cands.values() if "baseline:" not in cp.candidate.name}
    assert strategies == {"aggressive"}  # every layer at its cap: the reachable maximum
    assert all(zeros(cp) == pytest.approx(high, abs=1e-6) for n, cp in cands.items() if "baseline:" not in n)
    baselines = [cp for n, cp in cands.items() if "baseline:" in n]
    assert len({cp.candidate.strategy for cp in baselines}) == len(RANGE_BASELINES)
    assert all(zeros(cp) == pytest.approx(0.97, abs=1e-4) for cp in baselines)


def test_range_baselines_choose_phase1_and_the_baseline_candidates() -> None:
    cfg = CompressConfig(**SMALL, range_baselines=("mag", "lamp"))
    cfg.validate()
    model, data = load_workspace_inputs(cfg)
    ws = Workspace(cfg, model, data, with_hessian=False)
    names = {
        cp.candidate.strategy for cp in ws.plans("mix-and-match", 0.8) if cp.candidate.strategy.startswith("baseline:")
    }
    assert names == {"baseline:mag", "baseline:lamp"}
    for bad, message in ((("mag", "obs"), "unknown --range-baselines ['obs']"), ((), "--range-baselines is empty")):
        with pytest.raises(EdgepruneError, match=message.replace("[", r"\[").replace("]", r"\]")):
            CompressConfig(range_baselines=bad).validate()

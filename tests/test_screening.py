"""Screening shares identical masks and drops a signal at chance; nothing else changes which candidates compete."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgeprune.report import Candidate
from edgeprune.screening import (
    Z_STOP,
    below_bar,
    binomial_z,
    collapsed,
    image_rungs,
    mask_key,
    mcnemar_z,
    race,
    screen_candidates,
    screening_estimate,
    screening_warning,
)


def _cands(*names: str) -> list[Candidate]:
    return [Candidate.mix_and_match(*n.split("/")) for n in names]


def test_mask_key_tells_masks_apart() -> None:
    a = {"l": torch.tensor([True, False, True])}
    assert mask_key(a) == mask_key({"l": torch.tensor([True, False, True])})
    assert mask_key(a) != mask_key({"l": torch.tensor([True, True, False])})
    assert mask_key(a) != mask_key({"m": torch.tensor([True, False, True])})


def test_identical_masks_are_screened_once_and_share_the_result() -> None:
    cands = _cands("magnitude/baseline:lamp", "lamp/baseline:lamp", "magnitude/balanced")
    masks = [{"l": torch.tensor([True, False])}, {"l": torch.tensor([True, False])}, {"l": torch.tensor([False, True])}]
    evaluated = []

    def evaluate(i: int, built: dict) -> None:
        assert built is masks[i]  # the masks screening hashed, not a second build
        evaluated.append(i)
        cands[i].sparsity, cands[i].accuracy, cands[i].zero_shot_accuracy = 0.5, 0.9 - i / 10, 0.4

    kept, summary = screen_candidates(cands, lambda i: masks[i], evaluate, num_classes=10, dense_accuracy=0.9)
    assert evaluated == [0, 2] and kept == [0, 1, 2]
    assert summary.duplicates == {"lamp/baseline:lamp": "magnitude/baseline:lamp"}
    assert (cands[1].accuracy, cands[1].sparsity) == (cands[0].accuracy, 0.5)


def test_a_collapsed_signal_stops_after_its_probe() -> None:
    names = [f"magnitude/s{i}" for i in range(5)] + [f"gradient/s{i}" for i in range(5)]
    cands = _cands(*names)

    def evaluate(i: int, built: dict) -> None:
        cands[i].accuracy = 0.11 if cands[i].signal == "gradient" else 0.80

    masks = [{"l": torch.tensor([b == "1" for b in f"{i:04b}"])} for i in range(10)]
    kept, summary = screen_candidates(cands, lambda i: masks[i], evaluate, num_classes=10, dense_accuracy=0.9, probe=3)
    assert [cands[i].name for i in kept] == names[:5] + names[5:8]
    assert list(summary.skipped_signals) == ["gradient"] and summary.skipped == names[8:]
    assert "< 45%" in summary.skipped_signals["gradient"]  # half of the best candidate's (80 %) margin
    assert summary.evaluated == 8
    # probe=0 (baselines, or asked for): everything is screened
    kept, summary = screen_candidates(cands, lambda i: masks[i], evaluate, num_classes=10, dense_accuracy=0.9, probe=0)
    assert len(kept) == 10 and not summary.skipped_signals


def test_a_signal_is_dropped_against_the_best_screened_not_dense() -> None:
    """MobileNetV3 at 80 % before fine-tuning: every candidate under half of dense's margin (92 % dense, 8-58 %
    screened); magnitude, whose best candidate comes 4th, is screened to its end, pure gradient is dropped."""
    names = [f"magnitude/s{i}" for i in range(4)] + [f"gradient/{s}" for s in "abcd"]
    acc = [0.47, 0.42, 0.23, 0.58, 0.12, 0.11, 0.13, 0.12]
    cands = _cands(*names)

    def evaluate(i: int, built: dict) -> None:
        cands[i].accuracy = acc[i]

    masks = [{"l": torch.tensor([b == "1" for b in f"{i:03b}"])} for i in range(8)]
    kept, summary = screen_candidates(cands, lambda i: masks[i], evaluate, num_classes=10, dense_accuracy=0.92)
    assert all(collapsed(a, 10, 0.92) for a in acc[:3])  # against dense, magnitude would have been dropped
    assert (
        kept == list(range(7)) and summary.skipped == ["gradient/d"] and list(summary.skipped_signals) == ["gradient"]
    )


def test_one_good_candidate_keeps_the_signal() -> None:
    cands = _cands("gradient/a", "gradient/b", "gradient/c", "gradient/d")
    acc = [0.1, 0.5, 0.1, 0.1]

    def evaluate(i: int, built: dict) -> None:
        cands[i].accuracy = acc[i]

    masks = [{"l": torch.tensor([b == "1" for b in f"{i:02b}"])} for i in range(4)]
    kept, summary = screen_candidates(cands, lambda i: masks[i], evaluate, num_classes=10, dense_accuracy=0.9, probe=3)
    assert len(kept) == 4 and not summary.skipped_signals
    assert collapsed(0.49, 10, 0.9) and not collapsed(0.51, 10, 0.9)  # floor: 0.1 + 0.5 * 0.8


def test_image_rungs() -> None:
    assert image_rungs(2000) == [256, 512, 1024, 2000]
    assert image_rungs(100) == [100]  # fewer images than the first rung: one full evaluation
    assert image_rungs(1024, first=256, factor=4) == [256, 1024]
    with pytest.raises(ValueError):
        image_rungs(0)


def _counter(right: np.ndarray, calls: list):
    """``race``'s answers over a (candidates x images) matrix of right/wrong, recording every call."""

    def answers(i: int, start: int, stop: int) -> np.ndarray:
        calls.append((i, start, stop))
        return right[i, start:stop]

    return answers


@pytest.mark.parametrize("keep", [1, 2])
def test_race_keeps_exactly_the_full_evaluations_top_and_saves_images(keep: int) -> None:
    rng = np.random.default_rng(0)
    saved = []
    for _ in range(40):
        n, images = 12, 500
        acc = rng.uniform(0.1, 0.9, n)
        right = rng.random((n, images)) < acc[:, None]
        full = right.mean(1)
        calls: list = []
        races = race(n, image_rungs(images, first=50), _counter(right, calls), keep=keep, z=math.inf)
        top = sorted(range(n), key=lambda i: -full[i])[:keep]
        assert all(races[i].complete and races[i].accuracy == full[i] for i in top)
        for i, r in enumerate(races):
            assert r.correct == right[i, : r.seen].sum()
            if not r.complete:  # stopped: provably below the k-th best, never a tie with it
                assert r.upper < full[top[-1]] and full[i] < full[top[-1]]
        # one candidate at a time, contiguous increasing ranges from 0: each is built once
        for i in range(n):
            mine = [(a, b) for j, a, b in calls if j == i]
            assert mine[0][0] == 0 and all(b == a2 for (_, b), (a2, _) in zip(mine, mine[1:]))
        assert [j for j, _, _ in calls] == sorted(j for j, _, _ in calls)
        saved.append(1 - sum(r.seen for r in races) / (n * images))
    assert np.mean(saved) > 0.1  # exact stopping on a wide spread of accuracies (measured ~0.2)


def test_race_runs_ties_to_the_end_and_respects_floor_and_contenders() -> None:
    right = np.array([[0, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    races = race(3, [1, 2, 4], _counter(right, []), z=math.inf)
    assert races[0].accuracy == 0.75 and races[1].complete  # 1 can at best tie 0 until its last image: it runs
    assert not races[2].complete and races[2].seen == 2  # 0 of 2: at most 0.5 < 0.75, stopped
    # floor alone (--max-drop): a candidate stops once the floor is out of reach
    races = race(4, [1, 2, 4], _counter(right, []), keep=0, floor=0.8, z=math.inf)
    assert [r.seen for r in races] == [1, 4, 1, 4]
    # a non-contender raises no bar: the perfect candidate 3 does not stop the others when it cannot be picked
    races = race(4, [1, 2, 4], _counter(right, []), order=[3, 0, 1, 2], contends=[True, True, True, False], z=math.inf)
    assert races[0].complete and races[1].complete
    races = race(4, [1, 2, 4], _counter(right, []), order=[3, 0, 1, 2], z=math.inf)
    assert races[0].seen == 1 and races[3].accuracy == 1.0


def test_mcnemar_counts_only_the_images_the_two_disagree_on() -> None:
    holder = np.array([True] * 90 + [False] * 10)
    worse = holder.copy()
    worse[:10] = False  # the holder alone right on 10 images, both wrong on 10
    assert mcnemar_z(worse, holder) == pytest.approx(10 / np.sqrt(10))
    better = holder.copy()
    better[90:93] = True
    assert mcnemar_z(better, holder) == pytest.approx(-3 / np.sqrt(3)) and mcnemar_z(holder, holder) == 0.0
    # paired is tighter: 10 points down on 100 images is 3.2 SE paired, 2.0 SE between two binomial estimates
    unpaired = (holder.mean() - worse.mean()) / np.sqrt((0.9 * 0.1 + 0.8 * 0.2) / 100)
    assert mcnemar_z(worse, holder) > Z_STOP > unpaired == pytest.approx(2.0)
    assert below_bar(worse, 0.9, holder)
    assert not below_bar(better, 0.9, holder) and not below_bar(holder, 0.9, holder)
    # the glance's own accuracy at or over the bar never stops, however far below the holder's glance
    assert not below_bar(worse, 0.8, holder)
    with pytest.raises(ValueError):
        mcnemar_z(worse[:50], holder)


def test_binomial_stop_against_a_floor() -> None:
    assert binomial_z(80, 100, 0.9) == pytest.approx(0.1 / np.sqrt(0.09 / 100))
    assert below_bar(np.array([True] * 80 + [False] * 20), 0.9, None)  # 3.33 SE under a 90 % floor
    assert not below_bar(np.array([True] * 85 + [False] * 15), 0.9, None)  # 1.67 SE: runs on
    assert binomial_z(0, 0, 0.9) == 0.0 and binomial_z(5, 10, 0.0) == 0.0


def test_a_candidate_as_good_as_the_bar_is_rarely_stopped() -> None:
    """Z_STOP's promise: paired glances of two equally accurate candidates (81 %, 256 images, correlated as
    pruned variants of one model are) stop the challenger about once in 740, never near one in 50."""
    rng = np.random.default_rng(1)
    shared = rng.random((4000, 256)) < 0.9  # the images both get right or wrong alike
    flip_a, flip_b = rng.random((2, 4000, 256)) < 0.1  # each one's own errors, the same rate
    a, b = shared ^ (flip_a & shared), shared ^ (flip_b & shared)
    stops = np.mean([mcnemar_z(a[t], b[t]) > Z_STOP for t in range(4000)])
    assert stops < 0.005


def test_race_glance_stops_the_clearly_worse_and_keeps_the_top_exact() -> None:
    """Glances from a slightly different model (a few answers flipped, as a quick BN re-calibration does):
    the clearly worse stop before being built at all; the top ``keep`` and the pick are those of a full
    evaluation, completed candidates' accuracies exact."""
    rng = np.random.default_rng(0)
    saved, stops = [], {"glance": 0, "bound": 0}
    for _ in range(30):
        n, images, glance, keep = 20, 1000, 256, 2
        acc = np.concatenate([rng.uniform(0.85, 0.92, 5), rng.uniform(0.4, 0.85, n - 5)])
        right = rng.random((n, images)) < acc[:, None]
        looks = [r[:glance] ^ (rng.random(glance) < 0.02) for r in right]
        full = right.mean(1)
        calls: list = []
        order = sorted(range(n), key=lambda i: -looks[i].mean())
        races = race(n, image_rungs(images), _counter(right, calls), keep=keep, order=order, looks=looks)
        top = sorted(range(n), key=lambda i: -full[i])[:keep]
        assert all(races[i].complete and races[i].accuracy == full[i] for i in top)
        kth = full[top[-1]]
        for i, r in enumerate(races):
            if r.stop == "glance":
                assert (r.correct, r.seen) == (looks[i].sum(), glance) and r.accuracy < kth
                assert not any(j == i for j, _, _ in calls)  # never built: no count asked for
            stops[r.stop or "none"] = stops.get(r.stop or "none", 0) + 1
        saved.append(1 - sum(b - a for _, a, b in calls) / (n * images))
    assert stops["glance"] > stops["bound"] and np.mean(saved) > 0.5  # measured: ~0.6 of the images saved
    # without glances the same race stops at the rungs: the paired test, or with z=inf only the exact bound
    races = race(n, image_rungs(images), _counter(right, []), keep=keep, order=order)
    assert {r.stop for r in races} <= {None, "rung", "bound"}
    races = race(n, image_rungs(images), _counter(right, []), keep=keep, order=order, z=math.inf)
    assert {r.stop for r in races} <= {None, "bound"}


def test_race_rung_stop_saves_images_the_bound_cannot_and_keeps_the_top() -> None:
    """Candidates a few points apart (the bound needs ~ the whole gap in unseen images to stop one): the paired
    rung test stops them at 256 or 512 of 1000 images against the bar-holder's answers on the same images;
    the top ``keep`` stay those of a full evaluation, exact, and a stopped one was below the bar on its images."""
    rng = np.random.default_rng(3)
    used = {3.0: 0, math.inf: 0}
    rung_stops = 0
    for _ in range(30):
        n, images, keep = 16, 1000, 2
        shared = rng.random(images)  # an image's difficulty, common to every pruned variant of one model
        acc = rng.uniform(0.80, 0.92, n)
        right = shared[None, :] < acc[:, None]
        right ^= rng.random((n, images)) < 0.03  # each one's own flips
        full = right.mean(1)
        order = list(rng.permutation(n))
        top = sorted(range(n), key=lambda i: -full[i])[:keep]
        for z in used:
            calls: list = []
            races = race(n, image_rungs(images), _counter(right, calls), keep=keep, order=order, z=z)
            used[z] += sum(b - a for _, a, b in calls)
            for r in races:
                if r.stop == "rung":
                    rung_stops += 1
                    assert r.seen < images and r.accuracy < full[top[-1]]
            picked = sorted((i for i, r in enumerate(races) if r.complete), key=lambda i: -races[i].accuracy)
            assert picked[:keep] == top and all(races[i].accuracy == full[i] for i in top)
    assert rung_stops > 100 and used[3.0] < 0.9 * used[math.inf]  # measured: 175 stops, 0.77 of the images


def test_screening_estimate_and_warning() -> None:
    # 30 candidates x (1024 BN + 2 x 2000 eval) images x 32 MMAC at 13 GMAC/s: ~371 s
    s = screening_estimate(32e6, 30, 2000, 1024, 13.0)
    assert s == pytest.approx(30 * 5024 * 32e6 / 13e9)
    assert screening_warning(s, 30) is None
    big = screening_estimate(32e6 * 12.25, 30, 2000, 1024, 13.0)  # the same model at 224 px
    line = screening_warning(big, 30)
    assert line and "76 minutes" in line and "--eval-size" in line and "--device cuda" in line and "--cluster" in line


@pytest.mark.slow
def test_glance_then_race_on_the_demo_hands_on_what_full_screening_does() -> None:
    """The product's screening (`Workspace.glance`, then `Workspace.screen_raced`) on the demo model: every
    completed candidate's accuracy is exactly `Workspace.screen`'s (the full BN re-calibration, every image),
    the top-2 at the target and the pick are the same, and a stopped one reports its estimate and images
    (84 s on the loaded 2-core VM)."""
    from edgeprune.halving import Top
    from edgeprune.masking import build_masks
    from edgeprune.pipeline import GLANCE_IMAGES, CompressConfig, ScreeningBar, Workspace, load_workspace_inputs

    from .small_runs import SMALL

    # 450 selection images: a 150-image glance puts SNIP's plan 3.6 SE under the bar (66 images: 2.4, it runs)
    cfg = CompressConfig(**{**SMALL, "eval_size": 450}, range_baselines=("mag", "snip"))
    model, data = load_workspace_inputs(cfg)
    ws = Workspace(cfg, model, data, with_hessian=False)
    every = ws.plans("mix-and-match", 0.8)
    cplans = [*every[:4], next(cp for cp in every if cp.candidate.name == "snip/baseline:snip")]  # 69 %, others ~90
    full = [ws.screen(cp).accuracy for cp in cplans]
    looks = [ws.glance(cp, build_masks(cp.scores, cp.plan)) for cp in cplans]
    assert all(len(look) == min(GLANCE_IMAGES, len(data.eval_x) // 3) for look in looks)
    races = ws.screen_raced(cplans, looks, ScreeningBar.for_run(cfg, 0.9, Top(k=2)))
    cands = [cp.candidate for cp in cplans]
    for c, r, exact in zip(cands, races, full, strict=True):
        if r.complete:
            assert c.accuracy == exact and c.screened_images is None
        else:
            assert c.screened_images == r.seen and c.accuracy == r.accuracy
    at = [i for i, c in enumerate(cands) if c.sparsity >= 0.8 - 1e-6]
    top = sorted(at, key=lambda i: (-full[i], i))[:2]
    assert sorted(at, key=lambda i: (-cands[i].accuracy, i))[:2] == top
    assert all(races[i].complete for i in top)
    assert races[-1].stop == "glance" and cands[-1].screened_images == len(looks[-1])  # SNIP's plan: clearly worse

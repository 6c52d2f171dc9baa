"""Screening shares identical masks and drops a signal at chance; nothing else changes which candidates compete."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.report import Candidate
from edgeprune.screening import (
    collapsed,
    image_rungs,
    mask_key,
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
    names = [f"gradient/s{i}" for i in range(5)] + [f"magnitude/s{i}" for i in range(5)]
    cands = _cands(*names)

    def evaluate(i: int, built: dict) -> None:
        cands[i].accuracy = 0.11 if cands[i].signal == "gradient" else 0.80

    masks = [{"l": torch.tensor([b == "1" for b in f"{i:04b}"])} for i in range(10)]
    kept, summary = screen_candidates(cands, lambda i: masks[i], evaluate, num_classes=10, dense_accuracy=0.9, probe=3)
    assert [cands[i].name for i in kept] == names[:3] + names[5:]
    assert list(summary.skipped_signals) == ["gradient"] and summary.skipped == names[3:5]
    assert summary.evaluated == 8
    # probe=0 (baselines, or asked for): everything is screened
    kept, summary = screen_candidates(cands, lambda i: masks[i], evaluate, num_classes=10, dense_accuracy=0.9, probe=0)
    assert len(kept) == 10 and not summary.skipped_signals


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
    """count_correct over a (candidates x images) matrix of right/wrong, recording every call."""

    def count(i: int, start: int, stop: int) -> int:
        calls.append((i, start, stop))
        return int(right[i, start:stop].sum())

    return count


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
        races = race(n, image_rungs(images, first=50), _counter(right, calls), keep=keep)
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
    races = race(3, [1, 2, 4], _counter(right, []))
    assert races[0].accuracy == 0.75 and races[1].complete  # 1 can at best tie 0 until its last image: it runs
    assert not races[2].complete and races[2].seen == 2  # 0 of 2: at most 0.5 < 0.75, stopped
    # floor alone (--max-drop): a candidate stops once the floor is out of reach
    races = race(4, [1, 2, 4], _counter(right, []), keep=0, floor=0.8)
    assert [r.seen for r in races] == [1, 4, 1, 4]
    # a non-contender raises no bar: the perfect candidate 3 does not stop the others when it cannot be picked
    races = race(4, [1, 2, 4], _counter(right, []), order=[3, 0, 1, 2], contends=[True, True, True, False])
    assert races[0].complete and races[1].complete
    races = race(4, [1, 2, 4], _counter(right, []), order=[3, 0, 1, 2])
    assert races[0].seen == 1 and races[3].accuracy == 1.0


def test_screening_estimate_and_warning() -> None:
    # 30 candidates x (1024 BN + 2 x 2000 eval) images x 32 MMAC at 13 GMAC/s: ~371 s
    s = screening_estimate(32e6, 30, 2000, 1024, 13.0)
    assert s == pytest.approx(30 * 5024 * 32e6 / 13e9)
    assert screening_warning(s, 30) is None
    big = screening_estimate(32e6 * 12.25, 30, 2000, 1024, 13.0)  # the same model at 224 px
    line = screening_warning(big, 30)
    assert line and "76 minutes" in line and "--eval-size" in line and "--device cuda" in line and "--cluster" in line

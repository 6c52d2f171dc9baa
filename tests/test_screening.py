"""Screening shares identical masks and drops a signal at chance; nothing else changes which candidates compete."""

from __future__ import annotations

import torch

from edgeprune.report import Candidate
from edgeprune.screening import collapsed, mask_key, screen_candidates


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

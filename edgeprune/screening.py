"""Screening: every candidate masked, BN re-calibrated and scored — without paying twice for the same model.

Two savings, both reported, neither changes which candidates can win:
- candidates whose masks are identical (e.g. LAMP's plan ranked by magnitude and by LAMP's own score, which
  orders a layer's weights the same way) are screened once and share the result;
- a signal whose first ``probe`` distinct candidates have all collapsed after BN re-calibration (kept less than
  half of dense's margin over guessing) stops being screened — the pure-gradient signal on converged CNNs
  (18-39 % on the demo, dense 94 %): fine-tuning goes to the best screened few, so such a signal's
  candidates are never recovered and never picked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .masking import Masks
from .report import Candidate


@dataclass
class ScreeningSummary:
    """What screening did, for the report: how many models were evaluated, what was shared or skipped."""

    candidates: int = 0
    evaluated: int = 0
    duplicates: dict[str, str] = field(default_factory=dict)  # candidate -> the candidate it shares masks with
    skipped_signals: dict[str, str] = field(default_factory=dict)  # signal -> why its other candidates were skipped
    skipped: list[str] = field(default_factory=list)


def mask_key(masks: Masks) -> str:
    """A digest of every layer's mask: equal digests mean the same model after masking."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(masks):
        h.update(name.encode())
        h.update(np.packbits(masks[name].numpy().astype(bool)).tobytes())
    return h.hexdigest()


def collapsed(accuracy: float, num_classes: int, dense_accuracy: float) -> bool:
    """Kept less than half of what the dense model gains over guessing (1 / num_classes)."""
    chance = 1.0 / max(num_classes, 1)
    return accuracy < chance + 0.5 * max(dense_accuracy - chance, 0.0)


def screen_candidates(
    candidates: Sequence[Candidate],
    masks_of: Callable[[int], Masks],
    evaluate: Callable[[int, Masks], None],
    num_classes: int,
    dense_accuracy: float,
    probe: int = 3,
    advance: Callable[[], None] = lambda: None,
) -> tuple[list[int], ScreeningSummary]:
    """Screen ``candidates`` in order; returns the indices kept (evaluated or sharing a result) and a summary.

    ``masks_of(i)`` builds candidate i's masks; ``evaluate(i, masks)`` fills its sparsity and accuracies
    (given the masks just built, so they are built once per candidate). A signal is
    dropped once its first ``probe`` evaluated candidates have all `collapsed` (``probe=0`` never drops one).
    """
    summary = ScreeningSummary(candidates=len(candidates))
    first_with: dict[str, int] = {}
    probed: dict[str, list[bool]] = {}
    kept: list[int] = []
    for i, c in enumerate(candidates):
        advance()
        if c.signal in summary.skipped_signals:
            summary.skipped.append(c.name)
            continue
        masks = masks_of(i)
        key = mask_key(masks)
        if key in first_with:
            src = candidates[first_with[key]]
            c.sparsity, c.zero_shot_accuracy, c.accuracy = src.sparsity, src.zero_shot_accuracy, src.accuracy
            summary.duplicates[c.name] = src.name
            kept.append(i)
            continue
        first_with[key] = i
        evaluate(i, masks)
        summary.evaluated += 1
        kept.append(i)
        seen = probed.setdefault(c.signal, [])
        if probe and len(seen) < probe:
            seen.append(collapsed(c.accuracy, num_classes, dense_accuracy))
            if len(seen) == probe and all(seen):
                floor = 1 / max(num_classes, 1) + 0.5 * max(dense_accuracy - 1 / max(num_classes, 1), 0.0)
                summary.skipped_signals[c.signal] = (
                    f"its first {probe} candidates collapsed (< {floor:.0%}, half of dense's margin over chance) "
                    "after BN re-calibration"
                )
    return kept, summary


# --- Staged evaluation: a candidate stops being evaluated once it provably cannot be picked -------------------


def image_rungs(n_images: int, first: int = 256, factor: int = 2) -> list[int]:
    """Cumulative image counts at which a candidate's running count is checked: ``first``, ``first * factor``,
    ... and always ``n_images`` last (e.g. 2000 -> [256, 512, 1024, 2000])."""
    if n_images < 1 or first < 1 or factor < 2:
        raise ValueError("image_rungs needs n_images >= 1, first >= 1, factor >= 2")
    rungs, n = [], first
    while n < n_images:
        rungs.append(n)
        n *= factor
    return rungs + [n_images]


@dataclass
class Race:
    """One candidate's staged evaluation: ``correct`` of the first ``seen`` of ``total`` images."""

    correct: int = 0
    seen: int = 0
    total: int = 0

    @property
    def complete(self) -> bool:
        return self.seen == self.total

    @property
    def accuracy(self) -> float:
        """Exact when complete; else the estimate on the images seen (report it with ``seen``)."""
        return self.correct / max(self.seen, 1)

    @property
    def upper(self) -> float:
        """The best full-set accuracy still possible: every unseen image right."""
        return (self.correct + self.total - self.seen) / max(self.total, 1)


def race(
    n_candidates: int,
    rungs: Sequence[int],
    count_correct: Callable[[int, int, int], int],
    *,
    keep: int = 1,
    floor: float = 0.0,
    contends: Sequence[bool] | None = None,
    order: Sequence[int] | None = None,
) -> list[Race]:
    """Evaluate candidates rung by rung, each stopping as soon as it provably cannot be picked; exact.

    ``count_correct(i, start, stop)``: how many of images ``[start, stop)`` candidate ``i`` gets right. One
    candidate is run to its end before the next starts (``order``, default 0..n-1: likely winners first make
    the bar rise sooner), with increasing ranges, so the caller builds (masks, BN re-calibration) each
    candidate once, when ``start == 0``.

    The bar a candidate must still be able to reach: the ``keep``-th best full-set accuracy among the
    completed contenders (``keep``: 1 picks the most accurate; the fine-tune pool size when the best few
    are fine-tuned; 0 for none), and at least ``floor`` (``--max-drop``: dense minus the allowed drop). A
    candidate stops when even all its unseen images right would leave it strictly below the bar, so the
    top ``keep`` contenders by full-set accuracy, and every candidate at or above ``floor``, are exactly
    those of a full evaluation (ties run to the end). ``contends[i]`` False (e.g. below the sparsity
    target, so not pickable while any candidate reaches it) raises no bar; with no contender at all,
    every candidate contends.
    """
    if not rungs or any(b <= a for a, b in zip(rungs, rungs[1:])):
        raise ValueError("rungs must be increasing image counts")
    total = rungs[-1]
    contends = list(contends) if contends is not None else [True] * n_candidates
    if not any(contends):
        contends = [True] * n_candidates
    best: list[float] = []  # completed contenders' accuracies, highest first
    races = [Race(total=total) for _ in range(n_candidates)]
    for i in order if order is not None else range(n_candidates):
        r = races[i]
        for stop in rungs:
            r.correct += count_correct(i, r.seen, stop)
            r.seen = stop
            bar = max(floor, best[keep - 1] if keep and len(best) >= keep else 0.0)
            if not r.complete and r.upper < bar:
                break
        if r.complete and contends[i]:
            best = sorted([*best, r.accuracy], reverse=True)
    return races


# --- How long screening will take, said before it starts ------------------------------------------------------

SCREENING_WARN_S = 600.0


def screening_estimate(
    macs_per_image: float,
    n_candidates: int,
    n_images: int,
    bn_recal_images: int,
    gmacs_per_s: float,
    evals_per_candidate: int = 2,
) -> float:
    """Seconds to screen: per candidate, BN re-calibration forwards plus ``evals_per_candidate`` evaluations
    (zero-shot and re-calibrated) of ``n_images``. ``gmacs_per_s``: this machine's measured rate, e.g. the
    dense evaluation's ``macs_per_image * n_images / seconds / 1e9``."""
    images = n_candidates * (bn_recal_images + evals_per_candidate * n_images)
    return images * macs_per_image / max(gmacs_per_s * 1e9, 1.0)


def screening_warning(seconds: float, n_candidates: int, limit_s: float = SCREENING_WARN_S) -> str | None:
    """A line for the user before a screening that would exceed ``limit_s``; None when it will not."""
    if seconds <= limit_s:
        return None
    return (
        f"screening {n_candidates} candidates will take about {seconds / 60:.0f} minutes on this machine; "
        "--eval-size (fewer selection images), --device cuda (a GPU) or --cluster (several machines) cut it"
    )

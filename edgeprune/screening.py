"""Screening: every candidate masked, BN re-calibrated and scored — without paying twice for the same model.

Two savings, both reported, neither changes which candidates can win:
- candidates whose masks are identical (e.g. LAMP's plan ranked by magnitude and by LAMP's own score, which
  orders a layer's weights the same way) are screened once and share the result;
- a signal whose first ``probe`` distinct candidates have all collapsed after BN re-calibration (kept less than
  half of the best candidate screened so far's margin over guessing) stops being screened — the pure-gradient
  signal on converged CNNs (18-39 % on the demo, dense 94 %): fine-tuning goes to the best screened few, so
  such a signal's candidates are never recovered and never picked. Against the best so far, not the dense
  model: where every signal loses most of the accuracy before fine-tuning (MobileNetV3 at 80 %: 8-58 %,
  dense 92 %) half of dense's margin would drop the signal holding the best candidate.

Then the race over selection images (`race`): each candidate first gets a glance (a quick BN re-calibration on
a few calibration images, its answers on the first selection images); one that the glance shows below the bar
by more than ``Z_STOP`` standard errors stops there, the others get the full re-calibration and are evaluated
rung by rung, stopping once they provably cannot be picked, or once their answers so far put them as clearly
below the bar as a glance would (the same paired test, now on the fully re-calibrated model).
"""

from __future__ import annotations

import hashlib
import math
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
    stopped: dict[str, str] = field(default_factory=dict)  # candidate -> `Race.stop` ("glance" | "rung" | "bound")


def mask_key(masks: Masks) -> str:
    """A digest of every layer's mask: equal digests mean the same model after masking."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(masks):
        h.update(name.encode())
        h.update(np.packbits(masks[name].numpy().astype(bool)).tobytes())
    return h.hexdigest()


def _take_result(c: Candidate, src: Candidate) -> None:
    c.sparsity, c.zero_shot_accuracy, c.accuracy = src.sparsity, src.zero_shot_accuracy, src.accuracy
    c.screened_images = src.screened_images


def share_results(candidates: Sequence[Candidate], duplicates: dict[str, str]) -> None:
    """Each duplicate (name -> the candidate it shares masks with) takes that candidate's screening results."""
    by_name = {c.name: c for c in candidates}
    for name, src_name in duplicates.items():
        _take_result(by_name[name], by_name[src_name])


def collapse_floor(num_classes: int, reference: float) -> float:
    """Half of what ``reference`` (the best accuracy screened so far) gains over guessing (1 / num_classes)."""
    chance = 1.0 / max(num_classes, 1)
    return chance + 0.5 * max(reference - chance, 0.0)


def collapsed(accuracy: float, num_classes: int, reference: float) -> bool:
    """Kept less than half of what ``reference`` gains over guessing (`collapse_floor`)."""
    return accuracy < collapse_floor(num_classes, reference)


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
    (given the masks just built, so they are built once per candidate). A signal is dropped once its first
    ``probe`` evaluated candidates have all `collapsed` against the best accuracy evaluated by then (theirs
    included, at most ``dense_accuracy``; ``probe=0`` never drops one).
    """
    summary = ScreeningSummary(candidates=len(candidates))
    first_with: dict[str, int] = {}
    probed: dict[str, list[float]] = {}
    best = 0.0
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
            summary.duplicates[c.name] = src.name
            _take_result(c, src)
            kept.append(i)
            continue
        first_with[key] = i
        evaluate(i, masks)
        summary.evaluated += 1
        kept.append(i)
        best = min(max(best, c.accuracy), dense_accuracy)
        seen = probed.setdefault(c.signal, [])
        if probe and len(seen) < probe:
            seen.append(c.accuracy)
            if len(seen) == probe and all(collapsed(a, num_classes, best) for a in seen):
                summary.skipped_signals[c.signal] = (
                    f"its first {probe} candidates collapsed (< {collapse_floor(num_classes, best):.0%}, half of "
                    f"the best candidate's {best:.0%} margin over chance) after BN re-calibration"
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


# One-sided stop at 3 standard errors: a candidate as accurate as the bar is stopped with probability ~0.0013
# (normal approximation), and one whose true gap is small is rarely stopped at all; see `below_bar`.
Z_STOP = 3.0


def mcnemar_z(mine: np.ndarray, holder: np.ndarray) -> float:
    """McNemar's statistic that ``mine`` is less accurate than ``holder`` on the same images (per-image
    right/wrong): ``(c - b) / sqrt(b + c)``, b the images only ``mine`` gets right, c those only the holder
    does. Paired, so the images both get right or both get wrong add no noise: far tighter than comparing two
    binomial estimates. 0 when they never disagree."""
    if mine.shape != holder.shape:
        raise ValueError("mcnemar_z compares answers on the same images")
    b = int(np.sum(mine & ~holder))
    c = int(np.sum(~mine & holder))
    return (c - b) / math.sqrt(b + c) if b + c else 0.0


def binomial_z(correct: int, n: int, bar: float) -> float:
    """How many standard errors ``correct / n`` lies below ``bar`` (a score test: the error of an accuracy
    equal to ``bar``); for a bar no candidate holds (``--max-drop``'s floor)."""
    if n < 1 or bar <= 0.0:
        return 0.0
    se = math.sqrt(bar * (1.0 - bar) / n)
    gap = bar - correct / n
    return gap / se if se > 0 else (math.inf if gap > 0 else 0.0)


def below_bar(look: np.ndarray, bar: float, holder_look: np.ndarray | None, z: float = Z_STOP) -> bool:
    """Whether a glance (per-image right/wrong on the first selection images) puts a candidate below the bar by
    more than ``z`` standard errors: paired (`mcnemar_z`) against the bar-holder's glance on the same images
    when the bar is a candidate's accuracy, else (`binomial_z`) against the bar's value. Statistical, not a
    proof: at ``Z_STOP`` (one-sided p ~ 0.0013) a candidate exactly at the bar is stopped about once in 740.
    The glance's own accuracy must be below the bar too, so a stopped candidate's estimate never outranks a
    completed one where screening accuracies are ranked (the recovered few, the pick without recovery)."""
    if bar <= 0.0 or len(look) == 0 or look.mean() >= bar:
        return False
    if holder_look is not None:
        return mcnemar_z(look, holder_look) > z
    return binomial_z(int(look.sum()), len(look), bar) > z


@dataclass
class Race:
    """One candidate's staged evaluation: ``correct`` of the first ``seen`` of ``total`` images.

    ``stop``: why it stopped before the end: "glance" (statistically below the bar: ``correct`` / ``seen``
    are its glance's, from the quick BN re-calibration), "rung" (statistically below on the images seen so
    far by the fully re-calibrated model), "bound" (provably below: every unseen image right would not reach
    the bar), None when complete."""

    correct: int = 0
    seen: int = 0
    total: int = 0
    stop: str | None = None

    @property
    def complete(self) -> bool:
        """Every image seen by the candidate itself (a glance of every image is still the glance's model)."""
        return self.stop is None and self.seen == self.total

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
    answers: Callable[[int, int, int], np.ndarray],
    *,
    keep: int = 1,
    floor: float = 0.0,
    contends: Sequence[bool] | None = None,
    order: Sequence[int] | None = None,
    looks: Sequence[np.ndarray] | None = None,
    z: float = Z_STOP,
) -> list[Race]:
    """Evaluate candidates rung by rung, each stopping as soon as it cannot be picked.

    ``answers(i, start, stop)``: candidate ``i``'s per-image right/wrong on images ``[start, stop)``. One
    candidate is run to its end before the next starts (``order``, default 0..n-1: likely winners first make
    the bar rise sooner), with increasing ranges, so the caller builds (masks, BN re-calibration) each
    candidate once, when ``start == 0``.

    The bar a candidate must still be able to reach: the ``keep``-th best full-set accuracy among the
    completed contenders (``keep``: 1 picks the most accurate; the fine-tune pool size when the best few
    are fine-tuned; 0 for none), and at least ``floor`` (``--max-drop``: dense minus the allowed drop).

    Three stops. ``looks[i]`` (optional): candidate i's glance, its per-image right/wrong on the first images
    from a cheaper model (a quick BN re-calibration); before it is built at all, a candidate whose glance is
    `below_bar` (``z`` standard errors, paired against the glance of the candidate holding the bar) stops
    with its glance as estimate. At each rung before the last: "rung", the same `below_bar` test on its own
    answers so far against the bar-holder's on the same images, and "bound", the exact one: even all its
    unseen images right would leave it strictly below the bar. With the bound alone,
    the top ``keep`` contenders by full-set accuracy, and every candidate at or above ``floor``, are exactly
    those of a full evaluation (ties run to the end); the glance and rung stops trade that proof for a
    ``z``-sigma test each (one per look: a candidate exactly at the bar is stopped about once in 740 per
    look; ``z=math.inf``: the bound alone). ``contends[i]`` False (e.g. below the sparsity target, so not
    pickable while any candidate reaches it) raises no bar; with no contender at all, every candidate contends.
    """
    if not rungs or any(b <= a for a, b in zip(rungs, rungs[1:])):
        raise ValueError("rungs must be increasing image counts")
    total = rungs[-1]
    contends = list(contends) if contends is not None else [True] * n_candidates
    if not any(contends):
        contends = [True] * n_candidates
    best: list[tuple[float, int]] = []  # completed contenders (accuracy, index), most accurate first
    right: dict[int, np.ndarray] = {}  # completed contenders' answers on every image: the paired rung test
    races = [Race(total=total) for _ in range(n_candidates)]
    for i in order if order is not None else range(n_candidates):
        r = races[i]
        kth = best[keep - 1] if keep and len(best) >= keep else None
        bar = max(floor, kth[0] if kth else 0.0)
        holder = kth[1] if kth and kth[0] >= floor else None
        if looks is not None and below_bar(looks[i], bar, None if holder is None else looks[holder], z):
            r.correct, r.seen, r.stop = int(looks[i].sum()), len(looks[i]), "glance"
            continue
        mine: list[np.ndarray] = []
        for stop in rungs:  # the bar holds still while one candidate runs: only a completed one raises it
            mine.append(np.asarray(answers(i, r.seen, stop), dtype=bool))
            r.correct += int(mine[-1].sum())
            r.seen = stop
            if r.complete:
                break
            if r.upper < bar:
                r.stop = "bound"
                break
            seen = np.concatenate(mine)
            if below_bar(seen, bar, None if holder is None else right[holder][: r.seen], z):
                r.stop = "rung"
                break
        if r.complete and contends[i]:
            best = sorted([*best, (r.accuracy, i)], key=lambda a: (-a[0], a[1]))
            right[i] = np.concatenate(mine)
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

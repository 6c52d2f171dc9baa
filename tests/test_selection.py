import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest

from edgeprune.report import Candidate
from edgeprune.selection import (
    Point,
    evidence_note,
    paired_points,
    pareto_mask,
    pick_evidence,
    runner_up,
    select_index,
)

PTS = [Point(0.90, 0.70), Point(0.88, 0.80), Point(0.85, 0.80), Point(0.80, 0.90), Point(0.91, 0.60)]


def test_pareto_front():
    assert pareto_mask(PTS) == [True, True, False, True, True]


def test_select_by_sparsity_takes_most_accurate_above_target():
    i, why = select_index(PTS, sparsity=0.8)
    assert i == 1 and "80%" in why


def test_select_falls_back_to_sparsest_when_target_unreachable():
    i, why = select_index(PTS, sparsity=0.95)
    assert i == 3 and "no candidate" in why


def test_select_by_max_drop_takes_sparsest_within_budget():
    i, _ = select_index(PTS, max_drop=3.0, dense_accuracy=0.91)
    assert i == 1  # 0.88 is 3 points below dense; 0.80 is 11 below


def test_paired_points_error_comes_from_the_images_the_two_disagree_on():
    a = np.ones(1000, dtype=bool)
    assert paired_points(a, a) == (0.0, 0.0)  # same answers: no sampling error, whatever the accuracy
    b = a.copy()
    b[:20] = False  # b misses 20 images a gets right: a is 2 points ahead
    diff, se = paired_points(a, b)
    assert diff == pytest.approx(2.0)
    assert se == pytest.approx(math.sqrt(0.02 * 0.98 / 999) * 100)  # sd of the per-image difference / sqrt(n)
    c = b.copy()
    c[20:40] = False
    c[:20] = True  # b's accuracy, on other images: 0 apart, but 40 disagreements carry more error than 20
    diff, se = paired_points(b, c)
    assert diff == 0.0 and se > paired_points(a, b)[1]


def _cand(name: str, sparsity: float, acc: float, finetuned: float | None = None, ms: float | None = None):
    return Candidate(name, "magnitude", "s", "mix-and-match", sparsity, acc, finetuned_accuracy=finetuned,
                     latency_ms=ms)  # fmt: skip


def test_the_runner_up_meets_the_same_goal_and_was_recovered_when_recovery_ran():
    cfg = SimpleNamespace(sparsity=0.8, max_drop=None, speedup=None, latency_budget_ms=None)
    cands = [
        _cand("pick", 0.8, 0.80, 0.92),
        _cand("lighter", 0.7, 0.85, 0.95),  # more accurate but misses the target sparsity
        _cand("not recovered", 0.8, 0.91),
        _cand("rival", 0.8, 0.79, 0.91),
        _cand("third", 0.85, 0.70, 0.90),
    ]
    assert runner_up(cands, 0, cfg) == 3
    # without recovery every candidate competes on its screening accuracy
    plain = [dataclasses.replace(c, finetuned_accuracy=None) for c in cands]
    assert runner_up(plain, 0, cfg) == 2
    # --max-drop ranks by sparsity, not accuracy: no runner-up on accuracy's terms
    assert runner_up(cands, 0, SimpleNamespace(**{**vars(cfg), "max_drop": 1.0})) is None
    # a pick that misses the goal (the closest to it) has no rival on the same terms
    assert runner_up(cands, 1, cfg) is None
    # a latency goal: the rival must be fast enough too
    fast = SimpleNamespace(sparsity=0.8, max_drop=None, speedup=1.5, latency_budget_ms=None)
    timed = [
        _cand("pick", 0.5, 0.8, 0.92, ms=0.6),
        _cand("slow", 0.5, 0.8, 0.95, ms=0.9),
        _cand("ok", 0.5, 0.8, 0.9, ms=0.65),
    ]
    assert runner_up(timed, 0, fast, dense_ms=1.0) == 2


def test_pick_evidence_and_its_note_when_the_split_cannot_tell_pick_and_runner_up_apart():
    dense = np.ones(1000, dtype=bool)
    pick = dense.copy()
    pick[:10] = False  # 1 point below dense
    rival = pick.copy()
    rival[10:12] = False  # 0.2 behind the pick
    ev = pick_evidence(pick, dense, rival, "lamp")
    assert (ev.images, ev.runner_up) == (1000, "lamp")
    assert ev.drop == pytest.approx(1.0) and ev.drop_se == pytest.approx(paired_points(dense, pick)[1])
    assert ev.margin == pytest.approx(0.2) and ev.margin_se == pytest.approx(paired_points(pick, rival)[1])
    note = evidence_note(ev)  # 0.2 ± 0.14: more than one s.e. ahead, the split resolves it
    assert ev.margin > ev.margin_se and note is None
    rival[12:20] = True  # now level on accuracy, disagreeing on 10 images
    rival[:8] = True
    rival[10:12] = False
    rival[20:28] = False
    ev = pick_evidence(pick, dense, rival, "lamp")
    note = evidence_note(ev)
    assert ev.margin <= ev.margin_se and "lamp" in note and "--eval-size" in note and "1000 selection images" in note
    # the same answers on every image: one model under two names, nothing to resolve
    assert evidence_note(pick_evidence(pick, dense, pick.copy(), "twin")) is None
    # no runner-up (e.g. --max-drop): the drop alone, no note
    ev = pick_evidence(pick, dense)
    assert ev.runner_up is None and ev.margin is None and evidence_note(ev) is None


def test_a_max_drop_pick_within_one_standard_error_of_the_bound_gets_a_note():
    dense = np.ones(1000, dtype=bool)
    pick = dense.copy()
    pick[:6] = False  # 0.6 ± 0.24 points below dense
    ev = pick_evidence(pick, dense)
    assert ev.drop == pytest.approx(0.6) and ev.drop_se == pytest.approx(0.245, abs=1e-3)
    note = evidence_note(ev, max_drop=0.7)  # 0.6 + 0.245 > 0.7: the bound is not resolved
    assert "--max-drop 0.7" in note and "0.60 ± 0.24" in note and "1000 selection images" in note
    assert evidence_note(ev, max_drop=1.0) is None  # 0.845 < 1.0: within the bound by more than one s.e.
    assert evidence_note(ev, max_drop=0.5) is None  # over the bound: the pick's own note says none met it

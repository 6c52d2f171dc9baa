"""Recovery schedules (pure): rung sizes and epochs, deterministic ranking, cost."""

from __future__ import annotations

import pytest

from edgeprune.halving import SCHEDULES, Halving, Rung, Top, best, epoch_cost


def test_halving_halves_the_candidates_and_doubles_the_epochs_up_to_the_maximum():
    rungs = Halving(first_epochs=1, max_epochs=4, eta=2, keep=2).rungs(30)
    assert rungs == [Rung(30, 1), Rung(15, 2), Rung(8, 4)]
    # 30 x 1 + 15 x 1 more + 8 x 2 more: half of training all 30 for 4 epochs (120)
    assert epoch_cost(rungs) == 61


def test_halving_never_keeps_fewer_than_keep_and_caps_the_last_rung_at_max_epochs():
    assert Halving(1, 6, 2, keep=3).rungs(4) == [Rung(4, 1), Rung(3, 2), Rung(3, 4), Rung(3, 6)]
    assert Halving(1, 9, 3, keep=1).rungs(10) == [Rung(10, 1), Rung(4, 3), Rung(2, 9)]
    assert Halving(2, 2, 2, keep=1).rungs(5) == [Rung(5, 2)]  # one rung: everyone, full epochs
    assert Halving().rungs(0) == []


def test_top_is_one_rung_of_the_k_best():
    assert Top(k=2, epochs=3).rungs(10) == [Rung(2, 3)]
    assert Top(k=5, epochs=3).rungs(3) == [Rung(3, 3)]
    assert Top(k=0, epochs=3).rungs(3) == [] and Top(k=2, epochs=0).rungs(3) == []
    assert epoch_cost(Top(2, 3).rungs(10)) == 6
    assert set(SCHEDULES) == {"top", "halving"}


@pytest.mark.parametrize("bad", [dict(first_epochs=0), dict(first_epochs=3, max_epochs=2), dict(eta=1), dict(keep=0)])
def test_bad_halving_schedules_are_refused(bad):
    with pytest.raises(ValueError, match="bad halving schedule"):
        Halving(**bad)


def test_best_breaks_ties_by_position():
    assert best([0.5, 0.9, 0.9, 0.1], 2) == [1, 2]
    assert best([0.5, 0.9, 0.9, 0.1], 10) == [1, 2, 0, 3]
    assert best([], 3) == []

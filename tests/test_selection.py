from edgeprune.selection import Point, pareto_mask, select_index

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

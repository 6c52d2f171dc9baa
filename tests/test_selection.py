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


def test_recovered_candidates_rank_by_selection_log_likelihood_then_top1():
    # all recovered: the likelier one wins though its top-1 is lower (top-1 over near-equal plans is noise)
    pts = [Point(0.91, 0.8, -0.30), Point(0.90, 0.8, -0.25), Point(0.95, 0.7, -0.10)]
    i, why = select_index(pts, sparsity=0.8)
    assert i == 1 and "log-likelihood" in why
    # equal log-likelihood: top-1 decides
    i, _ = select_index([Point(0.90, 0.8, -0.25), Point(0.91, 0.8, -0.25)], sparsity=0.8)
    assert i == 1
    # one without a log-likelihood (screened only): top-1 alone, for all
    i, why = select_index([Point(0.91, 0.8, None), Point(0.90, 0.8, -0.25)], sparsity=0.8)
    assert i == 0 and "most accurate" in why
    # --max-drop still counts top-1 points below dense; among the sparsest within it, the likelier
    pts = [Point(0.89, 0.9, -0.4), Point(0.895, 0.9, -0.3), Point(0.86, 0.95, -0.2)]
    assert select_index(pts, max_drop=3.0, dense_accuracy=0.91)[0] == 1

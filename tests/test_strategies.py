import pytest

from edgeprune.strategies import STRATEGY_NAMES, LayerStats, make_all_plans, make_plan

LAYERS = {
    "early": LayerStats(lo=0.2, hi=0.6, numel=1_000, depth=0.0),
    "mid": LayerStats(lo=0.5, hi=0.9, numel=100_000, depth=0.5),
    "late": LayerStats(lo=0.0, hi=0.0, numel=10, depth=1.0),
}


def test_ten_stable_names():
    assert STRATEGY_NAMES == (
        "conservative", "aggressive", "balanced", "p30", "p50", "p70", "p90",
        "param_prop", "classifier_heavy", "feature_heavy",
    )  # fmt: skip


def test_every_plan_stays_inside_every_range():
    for name, plan in make_all_plans(LAYERS).items():
        for layer, rho in plan.items():
            s = LAYERS[layer]
            assert s.lo - 1e-12 <= rho <= s.hi + 1e-12, (name, layer, rho)


@pytest.mark.parametrize("name,a", [("conservative", 0), ("aggressive", 1), ("balanced", 0.5), ("p30", 0.3),
                                    ("p50", 0.5), ("p70", 0.7), ("p90", 0.9)])  # fmt: skip
def test_interpolations(name, a):
    plan = make_plan(name, LAYERS)
    assert plan["early"] == pytest.approx(0.2 + a * 0.4)
    assert plan["mid"] == pytest.approx(0.5 + a * 0.4)


def test_param_proportional_uses_relative_size():
    plan = make_plan("param_prop", LAYERS)
    mean = (1_000 + 100_000 + 10) / 3
    assert plan["early"] == pytest.approx(0.2 + min(1, 0.1 * 1_000 / mean) * 0.4)
    assert plan["mid"] == pytest.approx(0.5 + 0.1 * 100_000 / mean * 0.4)
    many = {f"small{i}": LayerStats(lo=0.1, hi=0.5, numel=1_000, depth=i / 20) for i in range(20)}
    many["huge"] = LayerStats(lo=0.1, hi=0.5, numel=1_000_000, depth=1.0)
    assert make_plan("param_prop", many)["huge"] == pytest.approx(0.5)  # >= 10x the mean saturates at rho_max


def test_heavy_strategies_push_opposite_ends():
    cls, feat = make_plan("classifier_heavy", LAYERS), make_plan("feature_heavy", LAYERS)
    assert cls["early"] == pytest.approx(0.2) and feat["early"] == pytest.approx(0.6)
    assert cls["mid"] == pytest.approx(feat["mid"])

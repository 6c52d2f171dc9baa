import pytest

from edgeprune.strategies import (
    STRATEGY_NAMES,
    TOLERANCE,
    UNSCALED,
    LayerStats,
    global_sparsity,
    make_all_plans,
    make_plan,
    reachable,
    scale_plan,
    search_plans,
)

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


# ---- scaled to one sparsity (issue 15: a search that contains its baselines) --------------------------------

# Realistic sizes (a 10-weight layer would make one weight 10 % of the model), unequal range widths.
WIDE = {
    "stem": LayerStats(lo=0.0, hi=0.1, numel=432, depth=0.0),
    "conv1": LayerStats(lo=0.2, hi=0.7, numel=9_216, depth=0.2),
    "conv2": LayerStats(lo=0.4, hi=0.8, numel=36_864, depth=0.4),
    "conv3": LayerStats(lo=0.5, hi=0.95, numel=147_456, depth=0.6),
    "conv4": LayerStats(lo=0.7, hi=0.9, numel=589_824, depth=0.8),
    "fc": LayerStats(lo=0.1, hi=0.8, numel=5_120, depth=1.0),
}


def test_reachable_is_every_layer_at_its_bounds():
    low, high = reachable(WIDE)
    total = sum(s.numel for s in WIDE.values())
    assert low == pytest.approx(sum(s.lo * s.numel for s in WIDE.values()) / total, abs=1e-5)
    assert high == pytest.approx(sum(s.hi * s.numel for s in WIDE.values()) / total, abs=1e-5)


@pytest.mark.parametrize("target", [0.68, 0.75, 0.8, 0.85, 0.88])
@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_scales_to_the_target(name, target):
    plan = scale_plan(make_plan(name, WIDE), WIDE, target)
    assert target <= global_sparsity(plan, WIDE) <= target + TOLERANCE
    for layer, rho in plan.items():
        assert WIDE[layer].lo <= rho <= WIDE[layer].hi


def test_scaling_is_one_shared_offset_clipped_per_layer():
    raw = make_plan("p30", WIDE)
    scaled = scale_plan(raw, WIDE, 0.8)
    free = [n for n, s in WIDE.items() if s.lo < scaled[n] < s.hi]
    assert len(free) >= 3
    offsets = {round(scaled[n] - raw[n], 9) for n in free}
    assert len(offsets) == 1 and offsets.pop() > 0  # p30 is below 80 %: shifted up
    assert all(scaled[n] == WIDE[n].hi for n in WIDE if n not in free and scaled[n] != WIDE[n].lo)


def test_strategies_compare_allocations_at_one_sparsity():
    """Unscaled the ten are a sweep; scaled they are ten allocations of the same weight budget."""
    raw = make_all_plans(WIDE)
    assert (
        max(global_sparsity(p, WIDE) for p in raw.values()) - min(global_sparsity(p, WIDE) for p in raw.values()) > 0.1
    )
    plans = search_plans(WIDE, 0.8)
    at_target = {n: p for n, p in plans.items() if UNSCALED not in n}
    assert len(at_target) >= 5
    assert all(0.8 <= global_sparsity(p, WIDE) <= 0.8 + TOLERANCE for p in at_target.values())
    assert "p50" not in plans and "balanced" in plans  # the same plan: screened once


def test_unscaled_plans_are_kept_only_where_a_pick_could_use_them():
    plans = search_plans(WIDE, 0.8)
    unscaled = {n for n in plans if n.endswith(UNSCALED)}
    raw = make_all_plans(WIDE)
    assert unscaled == {n + UNSCALED for n, p in raw.items() if global_sparsity(p, WIDE) > 0.8 + TOLERANCE}
    assert unscaled  # aggressive at least
    sweep = {n for n in search_plans(WIDE, 0.8, below=True) if n.endswith(UNSCALED)}
    below = {n + UNSCALED for n, p in raw.items() if global_sparsity(p, WIDE) < 0.8 - TOLERANCE}
    assert below and sweep == (unscaled | below) - {"p50" + UNSCALED}  # --max-drop: the sweep (p50 is balanced)


def test_unreachable_targets_keep_the_closest_plan():
    low, high = reachable(WIDE)
    above = search_plans(WIDE, high + 0.02)
    assert list(above) == ["aggressive"] and above["aggressive"] == {n: s.hi for n, s in WIDE.items()}
    below = search_plans(WIDE, low - 0.05)
    assert "conservative" in below and below["conservative"] == {n: s.lo for n, s in WIDE.items()}
    assert all(n == "conservative" or n.endswith(UNSCALED) for n in below)

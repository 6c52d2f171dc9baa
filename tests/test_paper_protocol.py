"""The protocol benchmark's decisions and statistics (benchmarks/lab/paper_protocol.py): pure parts only; the
run itself is the benchmark (its --quick smoke takes minutes)."""

import dataclasses
import json
import math

import numpy as np
import pytest
from edgeprune.benchmarks.lab import paper_protocol as pp

from edgeprune.selection import paired_points


def test_level_interpolates_between_the_ladder_points_that_bracket_the_drop():
    curve = [(0.5, -0.2), (0.8, 0.5), (0.9, 2.5), (0.95, 6.5)]
    assert pp.level_for_drop(curve, 1.0) == (0.825, "")  # 0.8 + 0.1 * 0.5 / 2.0 = 0.825
    assert pp.level_for_drop(curve, 3.0) == (0.905, "")  # 0.9 + 0.05 * 0.5 / 4 = 0.90625 -> 0.905
    assert pp.level_for_drop(curve, 6.5) == (0.95, "")


def test_level_follows_the_running_maximum_so_a_noisy_dip_cannot_move_it_back():
    # 90 % lost 3.2 points, 93 % only 2.0 (noise): the 3-point level stays below 90 %, not after 93 %.
    curve = [(0.8, 1.0), (0.9, 3.2), (0.93, 2.0), (0.95, 7.0)]
    level, note = pp.level_for_drop(curve, 3.0)
    assert 0.8 < level <= 0.9 and note == ""


def test_level_outside_the_ladder_is_clamped_and_says_so():
    curve = [(0.5, 2.0), (0.9, 4.0)]
    level, note = pp.level_for_drop(curve, 1.0)
    assert level == 0.5 and "first step" in note
    level, note = pp.level_for_drop(curve, 5.0)
    assert level == 0.9 and "only 4.00 points" in note
    with pytest.raises(ValueError):
        pp.level_for_drop([], 1.0)


def test_mean_and_standard_error():
    assert pp.mean_se([2.0]) == (2.0, None)
    m, se = pp.mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1.0 / math.sqrt(3))


def test_auc_is_the_mean_accuracy_over_the_span():
    assert pp.auc([0.8, 0.9, 1.0], [90.0, 80.0, 80.0]) == pytest.approx(82.5)
    assert pp.auc([0.9, 0.8], [80.0, 90.0]) == pytest.approx(85.0)  # order does not matter
    assert pp.auc([0.8, 0.8], [90.0, 80.0]) == pytest.approx(85.0)  # no span: the plain mean


def _model(mm: list[list[float]], best: list[list[float]]) -> pp.ModelResult:
    """Trials of two methods: mm[level][seed] and best[level][seed] recovered test accuracies (fractions)."""
    m = pp.ModelResult("toy", 1, levels=[pp.Level(1.0, 0.8), pp.Level(3.0, 0.9)])
    for k in range(2):
        for seed in range(len(mm[k])):
            rows = [
                pp.MethodResult(pp.MM, "a/b", 0.8, 0.5, 0.5, 0.5, mm[k][seed]),
                pp.MethodResult("lamp", "lamp", 0.8, 0.5, 0.5, 0.5, best[k][seed]),
            ]
            m.trials.append(pp.Trial(seed, k, 0.8, True, "", 0.9, 0.9, 1, 1, ["a/b"], rows, 1.0))
    return m


def test_paired_verdicts_use_one_paired_standard_error():
    s = pp.Settings(seeds=(0, 1, 2), drops=(1.0, 3.0))
    # level 0: M&M 0.1 points below LAMP on every seed (paired s.e. 0): worse. level 1: better by 1 point.
    m = _model([[0.900, 0.910, 0.920], [0.81, 0.82, 0.83]], [[0.901, 0.911, 0.921], [0.80, 0.81, 0.82]])
    st0, st1 = pp.level_stats(m, 0, "test"), pp.level_stats(m, 1, "test")
    assert st0["vs"]["lamp"]["mean"] == pytest.approx(-0.1) and st0["not_worse"] is False
    assert st1["best_baseline"] == "lamp" and st1["better"] is True and st1["not_worse"] is True
    c = pp.checks([m], s)
    assert c["not_worse_everywhere"] == {"toy": False} and c["better_at_highest"] == {"toy": True}
    # Noisy per-seed differences that average slightly below zero stay within one s.e.: not worse.
    noisy = _model([[0.90, 0.92, 0.88], [0.8, 0.8, 0.8]], [[0.91, 0.90, 0.90], [0.8, 0.8, 0.8]])
    assert pp.level_stats(noisy, 0, "test")["not_worse"] is True


def test_the_baseline_best_on_the_selection_split_is_compared_beside_the_test_splits_best():
    # LAMP leads on test, ERK on selection (what a user could have chosen): M&M is behind LAMP by 0.5 points on
    # every seed (worse), level with ERK (not worse); the verdict stays the test split's.
    m = pp.ModelResult("toy", 1, levels=[pp.Level(1.0, 0.8)])
    for seed in range(3):
        rows = [
            pp.MethodResult(pp.MM, "a/b", 0.8, 0.5, 0.5, 0.92, 0.900),
            pp.MethodResult("lamp", "lamp", 0.8, 0.5, 0.5, 0.90, 0.905),
            pp.MethodResult("erk", "erk", 0.8, 0.5, 0.5, 0.91, 0.900),
        ]
        m.trials.append(pp.Trial(seed, 0, 0.8, True, "", 0.9, 0.9, 1, 1, ["a/b"], rows, 1.0))
    st = pp.level_stats(m, 0, "test")
    assert (st["best_baseline"], st["not_worse"]) == ("lamp", False)
    assert (st["best_on_selection"], st["not_worse_than_best_on_selection"]) == ("erk", True)
    c = pp.checks([m], pp.Settings(seeds=(0, 1, 2), drops=(1.0,)))
    assert c["models_not_worse"] == 0 and c["models_not_worse_than_selection_best"] == 1
    meta = {"command": "x", "versions": {"torch": "t"}, "cpu_minutes": 1.0,
            "machine": {"platform": "p", "cpu": "c", "cores": 2, "load_average": [1.0]}}  # fmt: skip
    text = pp.render_markdown([m], pp.Settings(seeds=(0, 1, 2), drops=(1.0,)), meta)
    assert "*vs the best on the selection split (erk)* | | | | | +0.00 ± 0.00: not worse |" in text


def test_an_unfinished_model_is_not_counted_and_the_report_renders():
    s = pp.Settings(seeds=(0, 1, 2), drops=(1.0, 3.0))
    m = _model([[0.9], [0.8]], [[0.9], [0.7]])
    assert pp.checks([m], s)["complete_models"] == 0
    meta = {"command": "x", "versions": {"torch": "t"}, "cpu_minutes": 1.0,
            "machine": {"platform": "p", "cpu": "c", "cores": 2, "load_average": [1.0]}}  # fmt: skip
    text = pp.render_markdown([m], s, meta)
    assert "| 90.0% | mix-and-match |" in text and "0/0 complete" in text
    doc = pp.to_json([m], s, meta)
    assert pp.from_dict(doc["models"]["toy"]) == m


def test_refinement_measures_where_a_level_still_sits_between_distant_points():
    p = lambda s, d: pp.MagPoint(s, s, 0.9 - d / 100, d)  # noqa: E731
    curve = [p(0.8, 0.2), p(0.85, 1.1), p(0.9, 13.1), p(0.95, 71.4)]
    # 1 point lies between 80 and 85 % (5 apart), 3 and 5 points between 85 and 90 %: all three refined
    assert pp.to_refine(curve, (1.0, 3.0, 5.0)) == (0.845, 0.86, 0.865)
    # once the points around a level are within 1 %, or the level was measured, it is settled
    settled = curve + [p(0.845, 0.95), p(0.85 + 0.005, 1.5), p(0.86, 2.0), p(0.865, 3.5), p(0.87, 5.5)]
    assert pp.to_refine(settled, (1.0, 3.0, 5.0)) == ()


def _trial(mm_select: float, rows: dict[str, tuple[float, float]]) -> pp.Trial:
    """One trial: Mix-and-Match's confirmed top candidate (selection, test 0.90) and baselines (selection, test)."""
    methods = [pp.MethodResult(pp.MM, "magnitude/s1", 0.8, 0.85, 0.84, mm_select, 0.90, steps=30)]
    methods += [pp.MethodResult(b, b, 0.8, 0.8, 0.8, sel, test, steps=30) for b, (sel, test) in rows.items()]
    return pp.Trial(0, 0, 0.8, True, "", 0.95, 0.95, 10, 10, ["magnitude/s1"], methods, 1.0)


def test_contain_picks_a_range_baseline_that_recovers_better_on_the_selection_split():
    # MAG recovers best on the selection split: Mix-and-Match's model is MAG's run; uniform is not mixed
    t = pp.contain(_trial(0.91, {"mag": (0.92, 0.93), "lamp": (0.90, 0.95), "uniform": (0.99, 0.99)}), ("mag", "lamp"))
    mm = t.methods[0]
    assert (mm.method, mm.select, mm.test) == (pp.MM, 0.92, 0.93)
    assert mm.candidate == "baseline:mag (screening: magnitude/s1)" and mm.zero_shot_test == 0.84  # screening's
    assert t.contained and pp.contain(t, ("mag", "lamp")) is t  # once
    # a tie keeps Mix-and-Match's own candidate; the test split never decides
    t = pp.contain(_trial(0.92, {"mag": (0.92, 0.99)}), ("mag",))
    assert t.methods[0].candidate == "magnitude/s1" and t.methods[0].test == 0.90


def test_contain_picks_from_the_stored_pool_by_either_rule_and_picks_again_without_training():
    # two recovered Mix-and-Match candidates and MAG's run: (selection top-1, log-likelihood, test)
    def row(method, name, sel, ll, test):
        return pp.MethodResult(method, name, 0.8, 0.85, 0.84, sel, test, steps=30, select_loglik=ll)

    t = _trial(0.0, {"mag": (0.0, 0.0)})
    t.recovered = ["magnitude/s1", "product/s2"]
    t.pool = [row(pp.MM, "magnitude/s1", 0.905, -0.30, 0.90), row(pp.MM, "product/s2", 0.910, -0.28, 0.92)]
    t.methods = [pp.MethodResult(pp.MM, "magnitude/s1", 0.8, 0.85, 0.84)] + [row("mag", "mag", 0.912, -0.27, 0.91)]
    pp.contain(t, ("mag",), "top1")
    assert t.methods[0].candidate == "baseline:mag (screening: magnitude/s1)" and t.methods[0].test == 0.91
    # MAG's run has the best top-1 and the best log-likelihood: both rules take it; make s2 the likeliest
    t.pool[1].select_loglik = -0.20
    assert pp.contain(t, ("mag",), "top1").methods[0].test == 0.91  # stored under top1 already: unchanged
    m = pp.contain(t, ("mag",), "loglik").methods[0]
    assert (m.candidate, m.select, m.test, m.select_loglik) == (
        "product/s2 (screening: magnitude/s1)",
        0.91,
        0.92,
        -0.2,
    )
    assert m.zero_shot_test == 0.84 and t.picked_by == "loglik"  # zero-shot stays the screening pick's
    assert pp.contain(t, ("mag",), "top1").methods[0].candidate.startswith("baseline:mag")  # and back, exactly
    # a stored trial round-trips with its pool
    m = pp.ModelResult("toy", 1, trials=[t])
    assert pp.from_dict(json.loads(json.dumps(dataclasses.asdict(m)))) == m


def test_one_se_keeps_the_best_baseline_run_unless_an_own_candidate_leads_it_by_more_than_one_se():
    # 1000 selection images. MAG's run is right on the first 900; own candidate s1 on 904 (6 images MAG misses, 2
    # the other way: lead 0.4 ± 0.28), s2 on 901 (lead 0.1 ± 0.1)
    def row(method, name, right, test):
        answers = np.zeros(1000, dtype=bool)
        answers[right] = True
        return pp.MethodResult(method, name, 0.8, 0.85, 0.84, answers.mean(), test, steps=30,
                               select_right=pp.pack_answers(answers))  # fmt: skip

    mag = row("mag", "mag", np.r_[0:900], 0.91)
    lamp = row("lamp", "lamp", np.r_[0:890], 0.95)  # behind MAG on selection: not the incumbent
    s1 = row(pp.MM, "magnitude/s1", np.r_[2:906], 0.90)
    s2 = row(pp.MM, "product/s2", np.r_[0:901], 0.93)
    lead, se = paired_points(pp.unpack_answers(s1.select_right, 1000), pp.unpack_answers(mag.select_right, 1000))
    assert (lead, se) == (pytest.approx(0.4), pytest.approx(0.28, abs=0.01)) and lead > se

    def trial(pool):
        t = _trial(0.0, {"mag": (0.0, 0.0)})
        t.recovered, t.pool = [r.candidate for r in pool], pool
        t.methods = [pp.MethodResult(pp.MM, pool[0].candidate, 0.8, 0.85, 0.84), mag, lamp]
        return t

    # s1 leads MAG's run by more than one s.e.: it ships, as under top-1
    assert pp.contain(trial([s1, s2]), ("mag", "lamp"), "one-se", 1000).methods[0].test == 0.90
    # s2 alone leads by one image, under one s.e. (top-1 would take it): MAG's run ships
    picked = pp.contain(trial([s2]), ("mag", "lamp"), "one-se", 1000).methods[0]
    assert picked.candidate.startswith("baseline:mag") and picked.test == 0.91
    assert pp.contain(trial([s2]), ("mag", "lamp"), "top1", 1000).methods[0].test == 0.93
    with pytest.raises(pp.EdgepruneError, match="per image"):  # runs stored without answers cannot be re-picked
        pp.contain(trial([dataclasses.replace(s2, select_right="")]), ("mag", "lamp"), "one-se", 1000)


def test_a_grown_ladder_moves_only_the_levels_it_changes_and_drops_their_trials():
    before = [pp.Level(1.0, 0.6, "clamped"), pp.Level(3.0, 0.6, "clamped"), pp.Level(5.0, 0.615)]
    after = [pp.Level(1.0, 0.5), pp.Level(3.0, 0.57), pp.Level(5.0, 0.615)]
    assert pp.moved_levels(before, after) == {0, 1}
    assert pp.moved_levels([], after) == {0, 1, 2}


def test_a_level_at_an_earlier_levels_sparsity_reuses_its_trial():
    m = pp.ModelResult("toy", 1, levels=[pp.Level(1.0, 0.875), pp.Level(3.0, 0.9), pp.Level(5.0, 0.9)])
    m.trials = [_trial(0.91, {"mag": (0.92, 0.93)}) for _ in range(2)]
    m.trials[0].level, m.trials[1].level, m.trials[1].seed = 1, 1, 1
    twin = pp.twin_trial(m, 0, 2)
    assert twin is not None and (twin.seed, twin.level, twin.seconds) == (0, 2, 0.0)
    assert twin.methods == m.trials[0].methods and twin.methods is not m.trials[0].methods  # a copy
    assert m.trials[0].level == 1  # the original keeps its level
    assert pp.twin_trial(m, 0, 0) is None  # 87.5 %: no twin
    assert pp.twin_trial(m, 2, 2) is None  # no finished trial of that seed


def test_degradation_cut_is_against_mags_drop_at_the_highest_level():
    m = pp.ModelResult("toy", 1, levels=[pp.Level(1.0, 0.8)])
    # dense 0.95; Mix-and-Match 0.93 (2 points), MAG 0.90 (5 points): 60 % less degradation
    m.trials.append(_trial(0.9, {"mag": (0.9, 0.90)}))
    m.trials[0].methods[0].test = 0.93
    assert pp.degradation_cut(m) == pytest.approx(0.6)
    m.trials[0].methods[1].test = 0.96  # MAG above dense: nothing to cut
    assert pp.degradation_cut(m) is None


def test_a_resume_may_add_seeds_but_not_drop_them_or_change_a_setting(tmp_path):
    m = pp.ModelResult("toy", 1, levels=[pp.Level(1.0, 0.8)], trials=[_trial(0.9, {"mag": (0.9, 0.9)})])
    path = tmp_path / "paper_protocol.json"
    path.write_text(json.dumps(pp.to_json([m], pp.Settings(seeds=(0, 1, 2)), {})))
    more = pp.previous(path, pp.Settings(seeds=(0, 1, 2, 3, 4)))  # seeds 3, 4 run; seeds 0-2's trials are kept
    assert list(more) == ["toy"] and more["toy"].trials[0].methods[1].test == 0.9
    assert pp.previous(path, pp.Settings(seeds=(0, 1))) == {}
    assert pp.previous(path, pp.Settings(seeds=(0, 1, 2), select_size=999)) == {}


def test_right_answers_pack_and_unpack_exactly():
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 4001):
        right = rng.random(n) > 0.3
        packed = pp.pack_answers(right)
        assert len(packed) == 4 * math.ceil(math.ceil(n / 8) / 3)  # base64 of the packed bytes
        assert (pp.unpack_answers(packed, n) == right).all()


def test_image_diff_combines_each_seeds_sampling_error_and_is_read_off_a_level():
    n = 400
    a = np.ones(n, dtype=bool)
    b = a.copy()
    b[:8] = False  # 2 points behind in every seed
    m = _answer_model({pp.MM: a, "mag": b}, (0, 1))
    one = paired_points(a, b)
    got = pp.image_diff(m.trials, "mag", "test", n)
    assert got["mean"] == pytest.approx(2.0) and got["se"] == pytest.approx(one[1] / math.sqrt(2))
    st = pp.level_stats(m, 0, "test")
    assert st["images"]["mag"]["test"]["mean"] == pytest.approx(2.0)
    assert st["vs"]["mag"]["se"] == 0.0  # the seeds agree exactly; the images still carry an error
    # a trial stored before answers were recorded (schema /3): no per-image reading, nothing made up
    m.trials[1].methods[1].test_right = ""
    assert pp.image_diff(m.trials, "mag", "test", n) is None and pp.level_stats(m, 0, "test")["images"] == {}


def test_a_gap_the_seeds_call_worse_can_sit_within_the_test_images_error():
    # M&M one image behind MAG in both seeds (400 images), the two disagreeing on 9: the seeds agree exactly
    # (s.e. 0), so the rule reads "worse"; the images alone leave ± 0.37 points, so the reference does not
    mm = np.ones(400, dtype=bool)
    mm[:5] = False
    mag = np.ones(400, dtype=bool)
    mag[5:9] = False
    m = _answer_model({pp.MM: mm, "mag": mag}, (0, 1))
    st = pp.level_stats(m, 0, "test")
    assert st["vs"]["mag"]["mean"] == pytest.approx(-0.25) and st["vs"]["mag"]["se"] == 0.0
    assert not st["not_worse"] and st["not_worse_either_se"]
    c = pp.checks([m], pp.Settings(seeds=(0, 1), drops=(1.0,)))
    assert c["not_worse_everywhere"] == {"toy": False} and c["not_worse_either_se"] == {"toy": True}


def _answer_model(answers: dict[str, np.ndarray], seeds: tuple[int, ...]) -> pp.ModelResult:
    """One level whose trials (one per seed) hold each method's per-image answers, the same on both splits."""
    n = len(next(iter(answers.values())))
    trials = []
    for seed in seeds:
        rows = []
        for method, x in answers.items():
            acc, packed = float(x.mean()), pp.pack_answers(x)
            row = pp.MethodResult(method, method, 0.5, 0.9, 0.9, acc, acc, select_right=packed, test_right=packed)
            rows.append(row)
        trials.append(pp.Trial(seed, 0, 0.5, True, "", 0.95, 0.95, 1, 1, [], rows, 0.0))
    m = pp.ModelResult("toy", 1, levels=[pp.Level(1.0, 0.5)], trials=trials)
    m.splits = {"selection": f"{n} images, x", "test": f"{n} images, x"}
    return m


def test_choosing_among_the_mixed_baselines_per_seed_splits_the_gap_into_the_choice_and_the_mixing():
    # SNIP is best on test every seed; selection prefers LAMP on seeds 0 and 2 (0.3 points behind SNIP on test),
    # and Mix-and-Match shipped exactly what that choice ships (its pool holds those runs): worse than SNIP, level
    # with the per-seed choice, whose whole cost is choosing without the test split. Uniform is not mixed (it
    # leads on selection and is never chosen).
    m = pp.ModelResult("toy", 1, levels=[pp.Level(1.0, 0.8)])
    sel = [("lamp", 0.93), ("snip", 0.92), ("lamp", 0.94)]
    for seed, (pick, top) in enumerate(sel):
        on_test = {"snip": 0.903, "lamp": 0.900, "mag": 0.895, "grasp": 0.5, "erk": 0.89, "uniform": 0.80}
        on_select = {b: 0.90 for b in on_test} | {pick: top, "uniform": 0.99}
        rows = [pp.MethodResult(pp.MM, f"baseline:{pick}", 0.8, 0.5, 0.5, top, on_test[pick])]
        rows += [pp.MethodResult(b, b, 0.8, 0.5, 0.5, on_select[b], on_test[b]) for b in on_test]
        m.trials.append(pp.Trial(seed, 0, 0.8, True, "", 0.95, 0.95, 1, 1, ["a/b"], rows, 1.0))
    st = pp.level_stats(m, 0, "test")
    assert st["best_baseline"] == "snip" and st["not_worse"] is False
    sel_st = st["selector"]
    assert sel_st["picks"] == ["lamp", "snip", "lamp"] and st["not_worse_than_selector"] is True
    assert sel_st["mm_minus"]["mean"] == pytest.approx(0.0)
    assert sel_st["minus_best"]["mean"] == pytest.approx(-0.2)  # -0.3 on two seeds of three
    c = pp.checks([m], pp.Settings(seeds=(0, 1, 2), drops=(1.0,)))
    assert c["not_worse_than_selector"] == {"toy": True} and c["models_not_worse"] == 0
    meta = {"command": "x", "versions": {"torch": "t"}, "cpu_minutes": 1.0,
            "machine": {"platform": "p", "cpu": "c", "cores": 2, "load_average": [1.0]}}  # fmt: skip
    text = pp.render_markdown([m], pp.Settings(seeds=(0, 1, 2), drops=(1.0,)), meta)
    row = "per seed (lamp, snip, lamp)* | | | | | +0.00 ± 0.00: not worse; that choice minus snip: -0.20 ± 0.10 |"
    assert row in text

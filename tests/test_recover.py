"""The recover stage in this process, on the bundled demo model and data: rungs, masks, channel builds,
resume, errors naming the candidate."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from edgeprune.cluster import ClusterError, InProcess
from edgeprune.evaluation import accuracy, accuracy_and_loglik
from edgeprune.halving import Halving, Top
from edgeprune.masking import layer_mask
from edgeprune.models import load_model
from edgeprune.recover import (
    BUDGET_HINT_POINTS,
    Builder,
    Job,
    MaskBuild,
    ResultStore,
    Shared,
    best_rate,
    budget_hint,
    pick,
    recover,
    recovery_rates,
    recovery_schedule,
    with_rates,
)
from edgeprune.recovery import RECIPES, teacher_logits
from edgeprune.structured import CompactBuild, GroupGraph


def magnitude_jobs(model, levels=(0.5, 0.6, 0.7, 0.8)) -> list[Job]:
    """One candidate per sparsity: every conv/linear masked by weight magnitude; screening accuracy stands in
    as 1 - sparsity (so ``top`` takes the least sparse)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return [
        Job(f"magnitude/p{round(s * 100)}", MaskBuild({n: layer_mask(m.weight.abs(), s) for n, m in layers}), 1 - s)
        for s in levels
    ]


@pytest.fixture(scope="module")
def shared(demo_data) -> Shared:
    model = load_model("demo")
    d = demo_data
    # a rate high enough that one epoch on 180 images moves the accuracy (the default 1e-4 barely does)
    return Shared(
        model, d.calib_x, d.calib_y, d.eval_x, d.eval_y, RECIPES["distill"], teacher_logits(model, d.calib_x), lr=1e-3
    )


@pytest.fixture(scope="module")
def halved(shared):
    jobs = magnitude_jobs(shared.dense)
    return jobs, recover(jobs, shared, Halving(first_epochs=1, max_epochs=2, eta=2, keep=1))


@pytest.mark.slow
def test_halving_trains_everyone_once_and_the_better_half_again(halved, shared):
    jobs, out = halved
    assert [o.key for o in out] == [j.key for j in jobs]
    assert all(len(o.rungs) >= 1 and o.rungs[0].epochs == 1 and o.rungs[0].steps > 0 for o in out)
    second = [o for o in out if len(o.rungs) == 2]
    assert len(second) == 2 and all(o.survived for o in second) and not any(o.survived for o in out if o not in second)
    first_acc = sorted((o.rungs[0].accuracy for o in out), reverse=True)
    assert sorted(o.rungs[0].accuracy for o in second) == sorted(first_acc[:2])  # the better half went on
    assert pick(out).accuracy == max(o.accuracy for o in second)
    for o in second:
        # the reported accuracy and log-likelihood are those of the returned weights on the selection split ...
        model = jobs[0].build.build(shared.dense)
        model.load_state_dict(o.state)
        got = accuracy_and_loglik(model, shared.select_x, shared.select_y)
        assert got == pytest.approx((o.accuracy, o.loglik))
        # ... and the masks held through training: every masked weight is still zero
        masks = next(j for j in jobs if j.key == o.key).build.masks
        assert all(not o.state[f"{name}.weight"][~keep].any() for name, keep in masks.items())


def test_top_recovers_the_k_best_by_screening_accuracy(shared):
    jobs = magnitude_jobs(shared.dense, (0.8, 0.5, 0.7))
    out = recover(jobs, shared, Top(k=1, epochs=1))
    assert [len(o.rungs) for o in out] == [0, 1, 0] and out[1].survived  # p50 screened best
    assert out[0].accuracy is None


def test_an_entrant_is_recovered_whatever_it_screens_and_exactly_as_alone(shared):
    # p80 screens worst and would not make Top(k=1); as an entrant it trains beside p50, the same as on its own
    jobs = magnitude_jobs(shared.dense, (0.8, 0.5, 0.7))
    jobs[0] = Job(jobs[0].key, jobs[0].build, jobs[0].screen_accuracy, entrant=True)
    out = recover(jobs, shared, Top(k=1, epochs=1))
    assert [len(o.rungs) for o in out] == [1, 1, 0] and out[0].survived and out[1].survived
    alone = recover(jobs[:1], shared, Top(k=1, epochs=1))[0]
    assert alone.accuracy == out[0].accuracy
    assert all(torch.equal(alone.state[k], out[0].state[k]) for k in alone.state)


def test_channel_candidates_are_compacted_and_trained_without_masks(shared):
    example = shared.calib_x[:1]
    graph = GroupGraph(load_model("demo"), example)
    remove = {g.name: list(range(g.units // 4)) for g in graph.groups}
    out = recover([Job("channel/quarter", CompactBuild(remove, example))], shared, Top(1, 1))
    model = CompactBuild(remove, example).build(shared.dense)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in shared.dense.parameters())
    model.load_state_dict(out[0].state)  # the weights fit the compacted architecture
    assert accuracy(model, shared.select_x, shared.select_y) == pytest.approx(out[0].accuracy)


def test_rates_race_like_candidates_and_each_candidate_keeps_its_better_one(shared):
    """`with_rates`: a job per (candidate, rate) at that rate, trained exactly as a run at that one rate would;
    `best_rate` keeps the more accurate on the selection split, and the resume key tells the rates apart."""
    example = shared.calib_x[:1]
    graph = GroupGraph(load_model("demo"), example)
    half = Job("channel/half", CompactBuild({g.name: list(range(g.units // 2)) for g in graph.groups}, example), 0.5)
    jobs = with_rates([half], (1e-5, 3e-3))
    assert [(j.key, j.lr) for j in jobs] == [("channel/half@lr=1e-05", 1e-5), ("channel/half@lr=0.003", 3e-3)]
    assert jobs[0].digest() != jobs[1].digest() != half.digest()
    out = recover(jobs, shared, recovery_schedule(SimpleNamespace(finetune_epochs=1, finetune_top=1, recover="top"), 2))
    assert all(o.survived for o in out)
    for job, o in zip(jobs, out, strict=True):  # each at its own rate: the same as a run given only that rate
        alone = recover([half], replace(shared, lr=job.lr), Top(1, 1))[0]
        assert o.accuracy == alone.accuracy
    assert out[0].accuracy != out[1].accuracy  # 300x apart, one epoch: the rates do differ
    assert best_rate(out) == max(range(2), key=lambda i: (out[i].accuracy, -i))
    assert with_rates([half], (1e-3,))[0].key == "channel/half"  # one rate: keys unchanged


def test_best_rate_prefers_survivors_then_the_furthest_and_the_lower_rate_on_ties():
    from edgeprune.recover import RecoveryOutcome, RungResult

    def outcome(accs, survived):
        rungs = [RungResult(r, r + 1, 1, 1, a, 0.1, 0.0) for r, a in enumerate(accs)]
        return RecoveryOutcome("x", rungs, {} if survived else None)

    assert best_rate([outcome([0.8], True), outcome([0.9], True)]) == 1
    assert best_rate([outcome([0.9], True), outcome([0.9], True)]) == 0  # a tie: the lower rate
    assert best_rate([outcome([0.5, 0.6], True), outcome([0.9], False)]) == 0  # only a survivor has weights
    assert best_rate([outcome([0.5], False), outcome([0.5, 0.4], False)]) == 1  # none survived: the furthest
    assert best_rate([outcome([], False), outcome([], False)]) == 0


def test_a_pick_far_below_dense_names_the_budget_to_raise():
    """Past `BUDGET_HINT_POINTS` (and past --max-drop, which the user accepted) the note names both options and the
    budget the run had; within them, or with no recovery at all, nothing."""
    note = budget_hint(16.7, None, 1000, 3)
    assert note and "16.70 points" in note and "1000 calibration images" in note and "3 epoch(s)" in note
    assert "--calib-size" in note and "--finetune-epochs" in note
    assert budget_hint(BUDGET_HINT_POINTS, None, 1000, 3) is None
    assert budget_hint(4.0, 5.0, 1000, 3) is None  # within the drop the user allowed
    assert budget_hint(6.0, 5.0, 1000, 3) is not None
    assert budget_hint(30.0, None, 1000, 0) is None  # --finetune-epochs 0: no budget was spent


def test_channel_mode_races_two_rates_unless_one_is_given():
    """Compacted models race the paper's rate and a higher one (`recovery.default_lrs`); masked ones, and any
    run given ``--finetune-lr``, recover at one rate."""
    from edgeprune.recovery import COMPACTED_LR, PAPER_LR, default_lrs

    cnn = load_model("demo")
    assert default_lrs(cnn) == (PAPER_LR["cnn"],)
    assert default_lrs(cnn, compacted=True) == (PAPER_LR["cnn"], COMPACTED_LR["cnn"])
    assert recovery_rates(SimpleNamespace(finetune_lr=None), cnn, compacted=True) == default_lrs(cnn, True)
    assert recovery_rates(SimpleNamespace(finetune_lr=2e-4), cnn, compacted=True) == (2e-4,)


def test_every_builder_is_a_builder_and_travels_unchanged(shared):
    """The unstructured, the structured and the lab studies' builders: the one `Builder` that `recover`
    takes; pickled (as for a Ray task) each has the same digest and builds the same new model."""
    from edgeprune.benchmarks.lab.common import ModelBuild

    dense, example = shared.dense, shared.calib_x[:1]
    half = {g.name: list(range(g.units // 2)) for g in GroupGraph(dense, example).groups}
    builds = [magnitude_jobs(dense, (0.5,))[0].build, CompactBuild(half, example), ModelBuild(dense)]
    for b in builds:
        assert isinstance(b, Builder), type(b).__name__
        again = pickle.loads(pickle.dumps(b))
        assert again.digest() == b.digest()
        one, two = b.build(dense), again.build(dense)
        assert one is not dense and one.state_dict().keys() == two.state_dict().keys()
        assert all(torch.equal(v, two.state_dict()[k]) for k, v in one.state_dict().items())
    assert len({b.digest() for b in builds}) == 3 and not isinstance(object(), Builder)


@pytest.mark.slow
def test_a_resumed_run_trains_nothing_and_gives_the_same_outcome(shared, tmp_path):
    jobs = magnitude_jobs(shared.dense, (0.6, 0.8, 0.7))
    schedule = Halving(1, 2, 2, keep=1)
    first = InProcess()
    a = recover(jobs, shared, schedule, first, store=ResultStore(tmp_path))
    assert first.tasks_run == 5 and len(list(tmp_path.glob("*.pt"))) == 5  # rungs: 3, then 2
    again = InProcess()
    b = recover(jobs, shared, schedule, again, store=ResultStore(tmp_path))
    assert again.tasks_run == 0
    assert all(r.reused for o in b for r in o.rungs)
    assert [[r.accuracy for r in o.rungs] for o in a] == [[r.accuracy for r in o.rungs] for o in b]
    assert pick(a).key == pick(b).key
    assert all(torch.equal(a[i].state[k], b[i].state[k]) for i in range(3) if a[i].survived for k in a[i].state)
    # another rate is another result: nothing is reused
    other = InProcess()
    shared_lr = Shared(**{**shared.__dict__, "lr": 5e-4})
    recover(jobs[:1], shared_lr, Top(1, 1), other, store=ResultStore(tmp_path))
    assert other.tasks_run == 1


def test_a_failing_candidate_is_named_in_one_line(shared):
    bad = Job("magnitude/broken", MaskBuild({"no.such.layer": torch.ones(3, dtype=torch.bool)}))
    with pytest.raises(ClusterError, match=r"recovery of candidate magnitude/broken failed: AttributeError") as e:
        recover([bad], shared, Top(1, 1))
    assert "\n" not in str(e.value)


def test_keys_must_be_unique(shared):
    jobs = magnitude_jobs(shared.dense, (0.5, 0.5))
    with pytest.raises(Exception, match="keys must be unique"):
        recover([jobs[0], jobs[0]], shared, Top(1, 1))


@pytest.mark.slow
def test_in_process_recovery_never_imports_ray():
    """The default path must not pay Ray's import (about a second) nor need it installed."""
    code = textwrap.dedent(
        """
        import sys, torch
        from edgeprune.data import load_data
        from edgeprune.halving import Top
        from edgeprune.masking import layer_mask
        from edgeprune.models import load_model
        from edgeprune.recover import Job, MaskBuild, Shared, recover
        from edgeprune.recovery import RECIPES
        m, d = load_model("demo"), load_data("demo", calib_size=40, eval_size=40)
        masks = {"fc": layer_mask(m.fc.weight.abs(), 0.5)}
        out = recover([Job("a", MaskBuild(masks))], Shared(m, d.calib_x, d.calib_y, d.eval_x, d.eval_y,
                      RECIPES["paper"]), Top(1, 1))
        assert out[0].survived
        print("ray" in sys.modules)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


@pytest.mark.slow
def test_out_of_memory_names_the_candidate():
    """A real allocation failure: the process's address space is capped, then one candidate trains on images
    far too large for it."""
    code = textwrap.dedent(
        """
        import resource, torch
        from edgeprune.cluster import ClusterError
        from edgeprune.halving import Top
        from edgeprune.models import load_model
        from edgeprune.recover import Job, MaskBuild, Shared, recover
        from edgeprune.recovery import RECIPES
        m = load_model("demo")
        x, y = torch.zeros(8, 1, 1024, 1024), torch.zeros(8, dtype=torch.long)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + 600 * 2**20, hard))  # ~600 MB more than now
        try:
            recover([Job("big/p50", MaskBuild({}))], Shared(m, x, y, x, y, RECIPES["paper"], batch_size=8), Top(1, 1))
        except ClusterError as exc:
            print(exc)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("recovery of candidate big/p50 ran out of memory"), res.stdout
    assert res.stdout.count("\n") == 1

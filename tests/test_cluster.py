"""Where recovery runs: --cluster specs, one-line errors, and a real two-node Ray cluster on loopback (started
and stopped here) giving the same recovery as this process, also when one node's raylet is killed mid-run;
a head lost mid-run is a one-line error (the last test: it ends the cluster)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from edgeprune.benchmarks.lab.common import ModelBuild, recover_models, recovery_shared

from edgeprune.cluster import ClusterError, InProcess, LocalRayCluster, RayExecutor, check_cluster_spec
from edgeprune.halving import Halving
from edgeprune.masking import layer_mask
from edgeprune.models import load_model
from edgeprune.recover import Job, MaskBuild, ResultStore, Shared, pick, recover, torch_threads
from edgeprune.recovery import RECIPES, teacher_logits
from edgeprune.stages import Progress
from edgeprune.structured import CompactBuild, GroupGraph


def test_cluster_specs_parse_without_connecting(monkeypatch):
    assert check_cluster_spec("ray://head.example:10001").kind == "client"
    spec = check_cluster_spec(" 10.1.2.3:6379 ")
    assert (spec.kind, spec.address) == ("address", "10.1.2.3:6379")
    assert check_cluster_spec("local:4").cpus == 4
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.1.2.3:10001")
    assert check_cluster_spec("auto").address == "10.1.2.3:10001"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ClusterError, match="RAY_ADDRESS, which is not set"):
        check_cluster_spec("auto")


@pytest.mark.parametrize("bad", ["local:0", "local:x", "head", "head:99999", "ray://", "http://h:1", "h:1/x"])
def test_bad_cluster_specs_are_one_line_errors(bad):
    with pytest.raises(ClusterError, match=r"^bad --cluster") as e:
        check_cluster_spec(bad)
    assert "\n" not in str(e.value)


def test_missing_ray_is_one_line_naming_the_extra():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["ray"] = None  # as if Ray were not installed
        from edgeprune.cluster import ClusterError, RayExecutor
        try:
            RayExecutor("127.0.0.1:6379")
        except ClusterError as exc:
            print(exc)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "--cluster needs Ray, which is not installed: pip install 'edgeprune[ray]'\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return s.getsockname()[1]


def test_unreachable_head_is_one_line_naming_the_address():
    pytest.importorskip("ray")
    address = f"127.0.0.2:{_free_port()}"  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(ClusterError, match=rf"^cannot reach the Ray head at {address} \(Connection refused\)") as e:
        RayExecutor(address)
    assert time.perf_counter() - t0 < 10
    assert "\n" not in str(e.value)


# -- against a real cluster ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """This process's torch work (compress's screening, the teacher) on one thread, as every recovery task
    already is: two threads on 2 cores that the cluster's workers and other jobs also use wait on each other
    (the demo's forward pass measured 3-5x slower, and 3-5x the CPU, than one thread at load 9)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def problem(demo_data):
    """Six unstructured candidates of the demo model, and the shared inputs (one thread per task)."""
    model = load_model("demo")
    d = demo_data
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    jobs = [
        Job(f"magnitude/p{round(s * 100)}", MaskBuild({n: layer_mask(m.weight.abs(), s) for n, m in layers}), 1 - s)
        for s in (0.5, 0.6, 0.65, 0.7, 0.75, 0.8)
    ]
    sx, sy = d.eval_x[:200], d.eval_y[:200]
    shared = Shared(model, d.calib_x, d.calib_y, sx, sy, RECIPES["distill"], teacher_logits(model, d.calib_x), lr=1e-3)
    return jobs, shared, Halving(first_epochs=1, max_epochs=2, eta=2, keep=1)


@pytest.fixture(scope="module")
def reference(problem):
    jobs, shared, schedule = problem
    return recover(jobs, shared, schedule, InProcess())


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    with LocalRayCluster(_free_port(), nodes=2, cpus=1) as c:
        yield c


@pytest.fixture(scope="module")
def executor(cluster):
    """One driver connection (one Ray job) for the tests after the whole-compress one: Ray starts a job's
    workers on first use and keeps them, so each node imports torch and timm (the demo model's class) once
    for the module instead of once per test (~7 CPU-s a node; most of a test's time on 2 loaded cores).
    The later runs reuse warm workers, as a real run's later rungs do; their results must still be equal."""
    ex = RayExecutor(cluster.address)
    yield ex
    ex.close()


def _same(a, b) -> None:
    assert [o.key for o in a] == [o.key for o in b]
    assert [[(r.epochs, r.steps, r.accuracy) for r in o.rungs] for o in a] == [
        [(r.epochs, r.steps, r.accuracy) for r in o.rungs] for o in b
    ]
    assert pick(a).key == pick(b).key
    for x, y in zip(a, b):
        assert x.survived == y.survived
        if x.survived:
            assert all(torch.equal(x.state[k], y.state[k]) for k in x.state)  # bit for bit


@pytest.mark.slow
def test_compress_on_the_cluster_equals_compress_in_process(cluster, tmp_path):
    """The whole `compress` on the demo, recovery through the 2-node cluster (``--cluster HOST:PORT``) and
    in-process: the same candidates recovered to the same accuracies, the same pick, the same test accuracy.
    First of the cluster tests: compress connects (and disconnects) itself, before `executor` connects."""
    from edgeprune.pipeline import CompressConfig, compress

    from .small_runs import SMALL

    run = dict(SMALL, range_baselines=("mag",), finetune_epochs=1, finetune_top=3, export=False)
    here = compress(CompressConfig(**run, out=str(tmp_path / "here")))
    there = compress(CompressConfig(**run, cluster=cluster.address, out=str(tmp_path / "there")))

    def recovered(report):
        return [(c.name, c.finetuned_accuracy) for c in report.strategies if c.finetuned_accuracy is not None]

    # the 3 best screened, and MAG's own run whatever it screened (an entrant; or among the 3)
    assert len(recovered(here)) in (3, 4) and "magnitude/baseline:mag" in dict(recovered(here))
    assert recovered(there) == recovered(here)
    assert there.selected.name == here.selected.name
    assert there.selected.test_accuracy == here.selected.test_accuracy


@pytest.mark.slow
def test_recovery_on_the_cluster_equals_in_process(problem, reference, executor):
    jobs, shared, schedule = problem
    assert "2 node(s), 2 CPU(s)" in executor.describe()
    before = executor.tasks_run
    out = recover(jobs, shared, schedule, executor)
    _same(reference, out)
    assert executor.tasks_run - before == 9  # 6 candidates, then the better 3
    assert all(r.node for o in out for r in o.rungs)  # every rung ran on a cluster node


@pytest.mark.slow
def test_the_studies_builders_recover_on_the_cluster_as_in_process(demo_data, executor):
    """The lab studies' recoveries (`benchmarks.lab.common`): channels removed (`CompactBuild`) and a model
    that exists only as a model (`ModelBuild`, torch-pruning's output), with the studies' early-stopping
    hold-out; the same models on the cluster as here."""
    model, d = load_model("demo"), demo_data
    example = d.calib_x[:1]
    remove = {g.name: list(range(g.units // 4)) for g in GroupGraph(model, example).groups}
    half = {g.name: list(range(g.units // 2)) for g in GroupGraph(model, example).groups}
    builds = [CompactBuild(remove, example), ModelBuild(CompactBuild(half, example).build(model))]
    recipe = RECIPES["distill"]
    shared = recovery_shared(
        model, d.calib_x, d.calib_y, recipe, teacher_logits(model, d.calib_x), lr=1e-3, batch_size=64, seed=0,
        threads=1, device="cpu",
    )  # fmt: skip
    assert len(shared.calib_x) + len(shared.select_x) == len(d.calib_x) and len(shared.select_x) == 20
    here = recover_models(builds, ["quarter", "half"], shared, 1, InProcess(), Progress())
    before = executor.tasks_run
    there = recover_models(builds, ["quarter", "half"], shared, 1, executor, Progress())
    assert executor.tasks_run - before == 2
    for a, b in zip(here, there, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sum(p.numel() for p in here[1].parameters()) < sum(p.numel() for p in here[0].parameters())


class _KillOnFirstResult:
    """Progress hooks that kill a raylet (SIGKILL) when the first task of the run has finished."""

    def __init__(self, pid: int):
        self.pid, self.killed = pid, False

    def start(self, stage, total=None): ...
    def finish(self): ...
    def log(self, message): ...

    def advance(self, n=1):
        if n and not self.killed:
            os.kill(self.pid, signal.SIGKILL)
            self.killed = True


@pytest.mark.slow
def test_a_node_killed_mid_recovery_still_completes_with_the_same_pick(problem, reference, cluster, executor):
    jobs, shared, schedule = problem
    ex = executor
    hook = _KillOnFirstResult(cluster.raylet_pids[1])  # the second node's raylet: its workers die with it
    out = recover(jobs, shared, schedule, ex, progress=hook)
    deadline = time.monotonic() + 60  # the head notices a dead raylet by missed health checks
    while sum(n["Alive"] for n in ex.ray.nodes()) > 1 and time.monotonic() < deadline:
        time.sleep(1)
    alive = sum(n["Alive"] for n in ex.ray.nodes())
    assert hook.killed and alive == 1  # the node really went, and the run finished without it
    _same(reference, out)


class _KillHeadOnFirstResult(_KillOnFirstResult):
    """Progress hooks that kill the head (its GCS, then its raylet) when the first task has finished."""

    def __init__(self, cluster: LocalRayCluster):
        super().__init__(cluster.raylet_pids[0])
        self.gcs_pid = cluster.gcs_pid

    def advance(self, n=1):
        if n and not self.killed:
            os.kill(self.gcs_pid, signal.SIGKILL)
        super().advance(n)


@pytest.mark.slow
def test_a_head_lost_mid_recovery_is_one_line_naming_it_and_keeps_whole_rungs(problem, cluster, executor, tmp_path):
    """Runs last: it ends the module's cluster (and `executor`). Left to Ray, the driver process itself
    would exit a minute after the GCS went; the executor reports the lost head instead, and the store keeps
    only whole rungs."""
    jobs, shared, schedule = problem
    ex = executor
    ex.head_lost_s = 5  # the default, 20 s, leaves a restarting GCS time
    hook = _KillHeadOnFirstResult(cluster)
    store = ResultStore(tmp_path / "store")
    t0 = time.perf_counter()
    with pytest.raises(ClusterError, match=rf"^lost the Ray head at {cluster.address} during the run") as e:
        recover(jobs, shared, schedule, ex, progress=hook, store=store)
    lost_s = time.perf_counter() - t0
    assert hook.killed and "\n" not in str(e.value) and "task(s) unfinished" in str(e.value)
    assert lost_s < 5 + 30
    saved = sorted((tmp_path / "store").iterdir())  # the first result at least; whole rungs only
    assert saved and all(p.suffix == ".pt" and store.load(p.stem) is not None for p in saved)

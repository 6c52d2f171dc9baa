"""Successive halving over screened candidates, in this process vs on a 2-node local Ray cluster (issue 17).

    python -m edgeprune.benchmarks.lab.ray_halving --out benchmarks/results

``fmnist_resnet18`` with its bundled weights on real Fashion-MNIST (``--calib`` calibration images to train
on, ``--select`` selection images to rank on, disjoint). Candidates: `edgeprune.pipeline.Workspace`'s
Mix-and-Match plans at ``--sparsity`` (every signal's strategies and the range baselines' plans), each
masked (`masking.build_masks`), identical masks once, screened (mask + BN re-calibration + accuracy on the
selection split); the ``--candidates`` best screened at or above the sparsity are recovered with
`recover.recover` under `halving.Halving` (``--first-epochs`` to ``--max-epochs``, eta 2, ``--keep``):

1. in this process (`cluster.InProcess`), one torch thread per recovery;
2. on a Ray cluster started here (`cluster.LocalRayCluster`: ``ray start --head`` plus one joining node,
   one CPU each, loopback), one thread per task, two tasks at once.

Checked: the same survivors, the same accuracy at every rung and bit-identical final weights. Measured:
both wall times and their ratio; Ray's overhead (cluster start-up, connecting, one ``ray.put`` of the shared
inputs, a no-op task's first and warm round trips, and task seconds vs wall seconds); the per-candidate
costs (seconds per candidate-epoch) that ``ray_plan.md`` scales up. Writes ``ray_halving.json`` and
``ray_halving.md`` with the machine, load (``uptime`` before and after), versions and the command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from edgeprune.benchmarks.machine import command_line, machine_info, write_results

from edgeprune.cluster import InProcess, LocalRayCluster, RayExecutor
from edgeprune.data import load_data
from edgeprune.halving import Halving, epoch_cost
from edgeprune.masking import build_masks
from edgeprune.models import load_model
from edgeprune.pipeline import CompressConfig, Workspace
from edgeprune.recover import Job, MaskBuild, RecoveryOutcome, Shared, pick, recover
from edgeprune.recovery import RECIPES, teacher_logits

MODEL = "fmnist_resnet18"
RANGE_BASELINES = ("mag", "snip", "lamp", "erk")  # GraSP's Hessian product would double the sensitivity time


class Log:
    """Stage lines on stdout; ``stages`` keeps (stage, seconds) of every finished one."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stage = ""
        self.stages: list[tuple[str, float]] = []

    def start(self, stage: str, total: int | None = None) -> None:
        self.t0, self.stage = time.perf_counter(), stage
        print(f"[ray_halving] {stage} ...", flush=True)

    def advance(self, n: int = 1) -> None: ...

    def finish(self) -> None:
        self.stages.append((self.stage, round(time.perf_counter() - self.t0, 1)))
        print(f"[ray_halving]   {self.stages[-1][1]} s", flush=True)

    def log(self, message: str) -> None:
        print(f"[ray_halving] {message}", flush=True)


def _noop(x: int) -> int:
    return x


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def screened_jobs(a: argparse.Namespace, model: torch.nn.Module, data, log: Log) -> tuple[list[Job], dict]:
    """The ``a.candidates`` best screened Mix-and-Match candidates at >= ``a.sparsity`` as recovery jobs."""
    cfg = CompressConfig(
        model=MODEL,
        data="fashion-mnist",
        calib_size=a.calib,
        eval_size=a.select,
        sparsity=a.sparsity,
        range_baselines=RANGE_BASELINES,
        seed=a.seed,
    )
    t0 = time.perf_counter()
    ws = Workspace(cfg, model, data, with_hessian=False)
    plans = ws.plans("mix-and-match", a.sparsity)
    seen: set[str] = set()
    screened: list[tuple[float, str, dict]] = []
    log.start(f"screen {len(plans)} candidates (mask + BN re-calibration, {a.select} selection images)")
    for cp in plans:
        masks = build_masks(cp.scores, cp.plan)
        digest = hashlib.sha256(b"".join(masks[k].numpy().tobytes() for k in sorted(masks))).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        c = ws.screen(cp, masks)
        log.log(f"  {c.name}: {c.accuracy:.2%} at {c.sparsity:.2%}")
        if c.sparsity >= a.sparsity - 1e-6:
            screened.append((c.accuracy, c.name, masks))
    log.finish()
    model.load_state_dict(ws.original)  # screening masked the model in place
    screened.sort(key=lambda t: (-t[0], t[1]))
    jobs = [Job(name, MaskBuild(masks), acc) for acc, name, masks in screened[: a.candidates]]
    info = {
        "plans": len(plans),
        "distinct": len(seen),
        "at_or_above_sparsity": len(screened),
        "recovered": len(jobs),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return jobs, info


def rungs_table(outcomes: list[RecoveryOutcome]) -> list[dict]:
    return [
        {
            "key": o.key,
            "survived": o.survived,
            "rungs": [
                {
                    "epochs": r.epochs,
                    "steps": r.steps,
                    "accuracy": r.accuracy,
                    "seconds": round(r.seconds, 2),
                    "node": r.node[:8],
                }
                for r in o.rungs
            ],
        }
        for o in outcomes
    ]


def identical(a: list[RecoveryOutcome], b: list[RecoveryOutcome]) -> dict:
    same_rungs = [[(r.epochs, r.accuracy) for r in o.rungs] for o in a] == [
        [(r.epochs, r.accuracy) for r in o.rungs] for o in b
    ]
    same_weights = all(
        x.survived == y.survived and (not x.survived or all(torch.equal(x.state[k], y.state[k]) for k in x.state))
        for x, y in zip(a, b)
    )
    return {"pick": pick(a).key == pick(b).key, "rung_accuracies": same_rungs, "final_weights": same_weights}


def task_seconds(outcomes: list[RecoveryOutcome]) -> tuple[float, int]:
    """Seconds inside recovery tasks and candidate-epochs trained, over all rungs."""
    return sum(r.seconds for o in outcomes for r in o.rungs), sum(r.epochs_run for o in outcomes for r in o.rungs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return s.getsockname()[1]


def run(a: argparse.Namespace, argv: list[str] | None) -> dict:
    log = Log()
    result: dict = {"machine": machine_info(), "command": command_line("edgeprune.benchmarks.lab.ray_halving", argv)}
    result["uptime_before"] = uptime()
    torch.manual_seed(a.seed)
    # one thread throughout: on a shared 2-core machine two spinning OpenMP threads run several times slower
    torch.set_num_threads(1)
    model = load_model(MODEL, pretrained=True)  # the bundled weights (edgeprune.zoo.bundled_weights)
    data = load_data("fashion-mnist", calib_size=a.calib, eval_size=a.select, seed=a.seed)
    jobs, result["screening"] = screened_jobs(a, model, data, log)
    schedule = Halving(a.first_epochs, a.max_epochs, 2, a.keep)
    rungs = schedule.rungs(len(jobs))
    result["schedule"] = {
        "rungs": [{"size": r.size, "epochs": r.epochs} for r in rungs],
        "candidate_epochs": epoch_cost(rungs),
        "all_full": len(jobs) * a.max_epochs,
    }
    shared = Shared(
        model,
        data.calib_x,
        data.calib_y,
        data.eval_x,
        data.eval_y,
        RECIPES["distill"],
        teacher_logits(model, data.calib_x),
        lr=a.lr,
        batch_size=a.batch_size,
        seed=a.seed,
        threads=1,
        device="cpu",
    )
    result["shared_bytes"] = len(pickle.dumps(shared))

    log.log(f"recover {len(jobs)} candidates in this process (rungs {[(r.size, r.epochs) for r in rungs]})")
    t0 = time.perf_counter()
    local = recover(jobs, shared, schedule, InProcess(), progress=log)
    in_process_s = time.perf_counter() - t0

    overhead: dict = {}
    t0 = time.perf_counter()
    with LocalRayCluster(free_port(), nodes=2, cpus=1) as cluster:
        overhead["cluster_start_s"] = [round(s, 2) for s in cluster.start_s]
        ex = RayExecutor(cluster.address)
        try:
            overhead["connect_s"] = round(ex.connect_s, 2)
            noop = ex.ray.remote(num_cpus=1)(_noop)
            t1 = time.perf_counter()
            ex.ray.get(noop.remote(0))
            overhead["noop_first_s"] = round(time.perf_counter() - t1, 3)  # a worker process starts
            t1 = time.perf_counter()
            ref = ex.ray.put(shared)
            overhead["put_shared_s"] = round(time.perf_counter() - t1, 3)
            del ref
            log.log(f"recover {len(jobs)} candidates on {ex.describe()}")
            t1 = time.perf_counter()
            remote = recover(jobs, shared, schedule, ex, progress=log)
            ray_s = time.perf_counter() - t1
            t1 = time.perf_counter()
            for _ in range(50):
                ex.ray.get(noop.remote(0))
            overhead["noop_warm_ms"] = round((time.perf_counter() - t1) / 50 * 1000, 2)
        finally:
            ex.close()
    overhead["cluster_total_s"] = round(time.perf_counter() - t0, 1)
    result["uptime_after"] = uptime()
    result["stages"] = log.stages

    local_task_s, cand_epochs = task_seconds(local)
    ray_task_s, _ = task_seconds(remote)
    result.update(
        identical=identical(local, remote),
        pick=pick(local).key,
        pick_accuracy=pick(local).accuracy,
        in_process_s=round(in_process_s, 1),
        ray_s=round(ray_s, 1),
        ratio=round(ray_s / in_process_s, 3),
        overhead=overhead,
        candidate_epochs=cand_epochs,
        seconds_per_candidate_epoch={
            "in_process": round(local_task_s / cand_epochs, 2),
            "ray_task": round(ray_task_s / cand_epochs, 2),
        },
        ray_task_s=round(ray_task_s, 1),
        ray_parallel_efficiency=round(ray_task_s / (2 * ray_s), 3),
        settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        candidates=rungs_table(local),
        ray_nodes=sorted({r["node"] for c in rungs_table(remote) for r in c["rungs"]}),
    )
    return result


def _flat(r: dict) -> int:
    return sum(len({x["accuracy"] for x in c["rungs"]}) == 1 for c in r["candidates"] if len(c["rungs"]) > 1)


def _seen(stages: list, i: int) -> set[str]:
    """Stage names before ``i`` (the committed run's log repeated each executor's last rung once)."""
    return {name for name, _ in stages[:i]}


def markdown(r: dict) -> str:
    m, o, s = r["machine"], r["overhead"], r["screening"]
    same = r["identical"]
    lines = [
        "# Successive halving: in-process vs a 2-node local Ray cluster",
        "",
        f"`{r['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; torch {m['versions'].get('torch')}, "
        f"Ray {r['ray_version']}. Load before: `{r['uptime_before']}`; after: `{r['uptime_after']}` "
        "(the machine is shared with other jobs: wall times move with the load).",
        "",
        f"Model `{MODEL}` (bundled weights), real Fashion-MNIST: {r['settings']['calib']} calibration images "
        f"(train on 90 %, 10 % early stopping), {r['settings']['select']} selection images. Candidates: "
        f"{s['plans']} Mix-and-Match plans at {r['settings']['sparsity']:.0%}, {s['distinct']} distinct, "
        f"{s['at_or_above_sparsity']} at or above the sparsity, the {s['recovered']} best screened recovered "
        f"(screening {s['seconds']} s). Recipe distill, lr {r['settings']['lr']}, batch "
        f"{r['settings']['batch_size']}, one torch thread per recovery.",
        "",
        "Schedule (synchronous successive halving, eta 2): "
        + ", ".join(f"{x['size']} candidates to {x['epochs']} epoch(s)" for x in r["schedule"]["rungs"])
        + f": {r['schedule']['candidate_epochs']} candidate-epochs (all {s['recovered']} to "
        f"{r['settings']['max_epochs']} epochs: {r['schedule']['all_full']}).",
        "",
        "## Result",
        "",
        "| | in-process (1 process) | Ray, 2 nodes x 1 CPU |",
        "|---|---:|---:|",
        f"| recovery wall time | {r['in_process_s']} s | {r['ray_s']} s |",
        f"| seconds per candidate-epoch (inside the task) | {r['seconds_per_candidate_epoch']['in_process']} "
        f"| {r['seconds_per_candidate_epoch']['ray_task']} |",
        f"| pick | {r['pick']} ({r['pick_accuracy']:.2%}) | same: {same['pick']} |",
        "",
        f"Wall-time ratio Ray / in-process: **{r['ratio']}** (task seconds / (2 x wall) = parallel efficiency "
        f"{r['ray_parallel_efficiency']}). Identical results: pick {same['pick']}, accuracy at every rung "
        f"{same['rung_accuracies']}, final weights bit for bit {same['final_weights']}.",
        "",
        "Stages (wall seconds; a rung waits for its slowest task):",
        "",
        *[f"- {stage}: {sec} s" for i, (stage, sec) in enumerate(r["stages"]) if stage not in _seen(r["stages"], i)],
        "",
        "## Ray overhead",
        "",
        f"- cluster start-up (`ray start --head`, then a joining node): {o['cluster_start_s']} s",
        f"- driver connect (`ray.init`): {o['connect_s']} s",
        f"- `ray.put` of the shared inputs ({r['shared_bytes'] / 1e6:.1f} MB pickled: dense model, "
        f"calibration + selection images, teacher logits): {o['put_shared_s']} s, once per run",
        f"- a no-op task: {o['noop_first_s']} s the first time (a worker process starts), "
        f"{o['noop_warm_ms']} ms round trip when warm",
        "",
        "## Candidates and their rungs (selection accuracy after each rung)",
        "",
        f"{_flat(r)} of the {sum(len(c['rungs']) > 1 for c in r['candidates'])} candidates that ran more than "
        "one rung kept the same selection accuracy at every rung: at this size (a few hundred calibration "
        "images, 2 optimizer steps an epoch) recovery rarely beats the BN-re-calibrated start, which early "
        "stopping then keeps. The run measures the engine (identical results, wall ratio, overhead), not what "
        "halving buys over top-k: that needs the paper-sized recovery.",
        "",
        "| candidate | screened order | rung accuracies (epochs: %) | survived |",
        "|---|---:|---|:-:|",
    ]
    for i, c in enumerate(r["candidates"]):
        rungs = ", ".join(f"{x['epochs']}: {x['accuracy'] * 100:.2f}" for x in c["rungs"])
        mark = "**" if c["key"] == r["pick"] else ""
        lines.append(f"| {mark}{c['key']}{mark} | {i + 1} | {rungs} | {'●' if c['survived'] else ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeprune.benchmarks.lab.ray_halving", description=__doc__)
    p.add_argument("--candidates", type=int, default=30)
    p.add_argument("--calib", type=int, default=512, help="calibration images (recovery trains on 90 %%)")
    p.add_argument("--select", type=int, default=1000, help="selection images (rank candidates)")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--first-epochs", type=int, default=1)
    p.add_argument("--max-epochs", type=int, default=4)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--render", type=Path, help="only rewrite ray_halving.md from this ray_halving.json")
    a = p.parse_args(argv)
    if a.render:
        r = json.loads(a.render.read_text())
        (a.render.parent / "ray_halving.md").write_text(markdown(r))
        return 0
    import ray

    r = run(a, argv)
    r["ray_version"] = ray.__version__
    write_results(a.out, "ray_halving", r, markdown(r))
    print(f"[ray_halving] wrote {a.out}/ray_halving.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Equal latency, replicated: a Mix-and-Match pick against torch-pruning's uniform model, seed by seed.

    python -m edgeprune.benchmarks.lab.recovery_noise --pretrained --out benchmarks/results

The structured benchmark (``structured_speed``) recovers each model once, so its equal-latency comparison
(issue 3) cannot tell an allocation that is better from a recovery that was luckier. Here both models get
the same recovery budget ``len(--seeds)`` times, each with its own seed (data order, shifts), and the
comparison is between the seed means, with the seed-to-seed spread as its error.

The pair: torch-pruning's uniform ratio (``--uniform-ratio``, MetaPruner, local ranking, ``--signal``
importance, the target's ``round_to``) and the model the pipeline's structured search would pick at that
model's latency: among its ``--signal`` candidates (BN re-calibrated, screened on the screening images) that
run no slower than the uniform model (1 thread, interleaved, median of ``--repeats``), the most accurate.
Every accuracy is measured on the held-out test images through onnxruntime.

Recovery runs through the product's recover stage (`common.recover_models`: one rung of ``--finetune-epochs``
for both models, one run per seed) on ``--cluster``'s executor, as in ``structured_speed``: in this process by
default, ``local:N``, ``ray://HOST:PORT``, ``HOST:PORT`` or ``auto``. Each seed stops early on its own 10 % of
the calibration images and trains on the rest (`common.recovery_shared`); with the same seeds and
``--recover-threads`` the numbers are the same wherever it runs.

Writes ``recovery_noise_<model>_uniform_<ratio>[_<pick>].json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from edgeprune.benchmarks.lab.common import (
    LATENCY_ORDER,
    Log,
    ModelBuild,
    add_cluster_argument,
    add_input_arguments,
    add_recovery_arguments,
    check_cluster_argument,
    latency_order_note,
    load_inputs,
    paired_se_points,
    recover_models,
    recovery_shared,
    screened_search,
    search_config,
    this_machine,
    uniform_prune,
)
from edgeprune.benchmarks.machine import command_line, write_results
from edgeprune.benchmarks.runner import median_p50
from edgeprune.export import export_onnx
from edgeprune.export.quantize import onnx_hits
from torch import nn

from edgeprune.cluster import ClusterError, Executor, executor_for
from edgeprune.evaluation import params_and_macs
from edgeprune.pipeline import CompressConfig
from edgeprune.recovery import RECIPES, resolve_device, teacher_logits_if_distilling
from edgeprune.report import versions
from edgeprune.structured import CompactBuild, compact
from edgeprune.structured.flow import ChannelSearch
from edgeprune.targets import get_target


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def pick_at_latency(
    search: ChannelSearch, signal: str, uniform_onnx: Path, sample: np.ndarray, a, name: str | None = None
) -> tuple:
    """The search's pick at the uniform model's latency: the most accurate screened ``signal`` candidate
    timed no slower than the uniform model (all distinct architectures and the uniform model interleaved,
    1 thread), or the candidate called ``name``. Returns (candidate, its ms, the uniform model's ms); if none
    is that fast, the fastest."""
    names = {cc.candidate.name for cc in search.cands}
    if name is not None and name not in names:
        raise SystemExit(f"recovery_noise: error: no candidate '{name}'; the search built {', '.join(sorted(names))}")
    shapes = {}
    for cc in search.cands:
        if cc.candidate.name == name or (name is None and cc.candidate.signal == signal):
            best = shapes.get(cc.shape_key)
            if best is None or cc.candidate.accuracy > best.candidate.accuracy:
                shapes[cc.shape_key] = cc
    cands = list(shapes.values())
    ms = median_p50([uniform_onnx, *(cc.onnx for cc in cands)], sample, 1, a.runs, a.repeats)
    ok = [i for i in range(len(cands)) if ms[1 + i] <= ms[0]]
    i = max(ok, key=lambda j: cands[j].candidate.accuracy) if ok else min(range(len(cands)), key=lambda j: ms[1 + j])
    return cands[i], ms[1 + i], ms[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_input_arguments(p)
    p.add_argument("--target", default="x86_64-avx512", help="target profile (round_to, opset)")
    p.add_argument("--uniform-ratio", type=float, default=0.4, help="torch-pruning's uniform pruning ratio")
    p.add_argument("--signal", default="magnitude", choices=("magnitude", "gradient", "product"))
    p.add_argument("--speedup", type=float, default=1.8, help="the structured search's goal (centres its ranges)")
    p.add_argument("--latency-costs", action="store_true", help="the search also builds latency-model candidates")
    p.add_argument("--pick", default=None, help="recover this candidate (e.g. magnitude/latency+), not the search's")
    p.add_argument("--seeds", default="0,1,2", help="one recovery of each model per seed")
    add_recovery_arguments(p)
    add_cluster_argument(p)
    p.add_argument("--gradient-samples", type=int, default=1024)
    p.add_argument("--runs", type=int, default=300, help="timed runs per model and latency run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved latency runs; the median is reported")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    if not seeds or a.repeats < 1 or not 0.0 < a.uniform_ratio < 1.0:
        p.error("--seeds needs at least one seed, --repeats >= 1, --uniform-ratio in (0, 1)")
    if a.finetune_epochs < 1 or a.recover_threads < 1:
        p.error("--finetune-epochs and --recover-threads must be >= 1")
    check_cluster_argument(p, a.cluster)
    with tempfile.TemporaryDirectory(prefix="edgeprune-recovery-noise-") as tmp:
        try:
            return run(a, argv, seeds, Path(tmp))
        except ClusterError as exc:  # unreachable or lost head, a failed recovery: one line, nothing written
            print(f"edgeprune: {exc}", file=sys.stderr)
            return 2


def run(a: argparse.Namespace, argv: list[str] | None, seeds: list[int], work: Path) -> int:
    """The study, its intermediate files in ``work``; the executor connects first, so an unreachable head
    fails before the search's minutes."""
    executor = executor_for(a.cluster)
    try:
        return _run(a, argv, seeds, work, executor)
    finally:
        executor.close()


def _run(a: argparse.Namespace, argv: list[str] | None, seeds: list[int], work: Path, executor: Executor) -> int:
    t_start = time.time()
    log = Log("recovery_noise")
    target = get_target(a.target)
    data, held_x, held_y, model = load_inputs(a)
    example, sample = data.eval_x[:1], data.eval_x[:1].numpy().astype(np.float32)
    n = a.gradient_samples

    log.start(f"torch-pruning uniform ratio {a.uniform_ratio:g} ({a.signal} importance, round_to {target.round_to})")
    uniform = uniform_prune(
        model, example, a.uniform_ratio, a.signal, target.round_to, data.calib_x[:n], data.calib_y[:n]
    )
    export_onnx(uniform, example, work / "uniform.onnx", check_inputs=data.eval_x[:64])
    log.finish()

    cfg = search_config(a, a.speedup, work, signals=(a.signal,), finetune_epochs=0, latency_costs=a.latency_costs)
    search = screened_search(cfg, target, model, data, work, log)
    log.start("time the search's candidates against the uniform model (1 thread)")
    pick, pick_ms, uniform_ms = pick_at_latency(search, a.signal, work / "uniform.onnx", sample, a, a.pick)
    log.finish()
    log.log(f"pick {pick.candidate.name}: {pick_ms:.4f} ms vs uniform {uniform_ms:.4f} ms")
    mm = compact(model, example, pick.remove)

    recipe, batch = RECIPES[a.recovery], CompressConfig.batch_size
    teacher = teacher_logits_if_distilling(recipe, model, data.calib_x, batch, resolve_device(a.device))
    builds = [CompactBuild(pick.remove, example), ModelBuild(uniform)]  # the pick replays; uniform is a model
    hits: dict[str, list[np.ndarray]] = {"mix_and_match": [], "uniform": []}
    for seed in seeds:  # one recover per seed: both models in it, so a cluster trains them side by side
        shared = recovery_shared(
            model, data.calib_x, data.calib_y, recipe, teacher, lr=a.finetune_lr, batch_size=batch, seed=seed,
            threads=a.recover_threads, device=a.device,
        )  # fmt: skip
        names = [f"{key} (seed {seed})" for key in hits]
        for key, m in zip(hits, recover_models(builds, names, shared, a.finetune_epochs, executor, log), strict=True):
            path = work / f"{key}_{seed}.onnx"
            export_onnx(m, example, path, check_inputs=data.eval_x[:64])
            hits[key].append(onnx_hits(path, held_x, held_y, threads=2))
            log.log(f"{key} seed {seed}: {hits[key][-1].mean() * 100:.2f} %")

    dense_path = work / "search" / "dense.onnx"
    last = {k: work / f"{k}_{seeds[-1]}.onnx" for k in hits}
    paths = [dense_path, last["mix_and_match"], last["uniform"]]
    lat = {th: median_p50(paths, sample, th, a.runs, a.repeats) for th in (1, 2)}
    dense_acc = float(onnx_hits(dense_path, held_x, held_y, threads=2).mean())
    result = summarize(a, argv, seeds, hits, lat, dense_acc, search, pick, mm, uniform, example)
    result["recovery_ran_on"] = executor.describe()
    result["threads_per_recovery"] = a.recover_threads
    result["wall_s"] = round(time.time() - t_start, 1)
    label = Path(a.checkpoint).stem if a.checkpoint else a.model
    stem = f"recovery_noise_{label}_uniform_{a.uniform_ratio:g}" + (f"_{a.pick.replace('/', '_')}" if a.pick else "")
    write_results(Path(a.out), stem, result, render(result))
    print(render(result))
    return 0


def summarize(a, argv, seeds, hits, lat, dense_acc, search, pick, mm: nn.Module, uniform: nn.Module, example) -> dict:
    models = {}
    for key, pruned in (("mix_and_match", mm), ("uniform", uniform)):
        accs = [float(h.mean()) for h in hits[key]]
        mean, sd = mean_sd(accs)
        k = 1 if key == "mix_and_match" else 2
        models[key] = {
            "macs": params_and_macs(pruned, example)[1],
            "accuracy_per_seed": accs,
            "accuracy_mean": mean,
            "accuracy_sd": sd,
            "ms_1t": lat[1][k],
            "ms_2t": lat[2][k],
            "speedup_1t": lat[1][0] / lat[1][k],
            "speedup_2t": lat[2][0] / lat[2][k],
        }
    mm_r, u_r = models["mix_and_match"], models["uniform"]
    r = len(seeds)
    diff = (mm_r["accuracy_mean"] - u_r["accuracy_mean"]) * 100
    seed_se = math.sqrt((mm_r["accuracy_sd"] ** 2 + u_r["accuracy_sd"] ** 2) / r) * 100 if r > 1 else None
    per_image = np.mean([hm.astype(np.float64) - hu for hm, hu in zip(hits["mix_and_match"], hits["uniform"])], 0)
    mm_r["name"] = pick.candidate.name
    mm_r["group_widths"] = {g.name: f"{pick.widths[g.name]}/{g.units}" for g in search.groups}
    u_r["ratio"] = a.uniform_ratio
    return {
        "command": command_line("edgeprune.benchmarks.lab.recovery_noise", argv),
        "model": a.model,
        "data": search.data.name,
        "held_out_test_images": len(hits["uniform"][0]),
        "target": search.target.name,
        "round_to": search.round_to,
        "seeds": seeds,
        "latency_order": LATENCY_ORDER,
        "recovery": f"BN re-calibration, then {a.finetune_epochs} epochs of `{a.recovery}` at lr {a.finetune_lr}, "
        f"batch {CompressConfig.batch_size}, best epoch kept (early stopping on 10 % of the calibration images, "
        "the rest trains); one run per seed (data order, shifts, the hold-out)",
        "dense": {"accuracy": dense_acc, "macs": search.macs, "ms_1t": lat[1][0], "ms_2t": lat[2][0]},
        "mix_and_match": mm_r,
        "uniform": u_r,
        "comparison": {
            "mm_minus_uniform_points": diff,
            "se_from_seed_spread_points": seed_se,
            "paired_se_over_images_points": paired_se_points(per_image),
            "recovery_sd_points": {k: v["accuracy_sd"] * 100 for k, v in models.items()},
        },
        "machine": this_machine(),
        "versions": versions(),
    }


def render(r: dict) -> str:
    mm, u, c, d = r["mix_and_match"], r["uniform"], r["comparison"], r["dense"]

    def row(name: str, m: dict) -> str:
        per_seed = ", ".join(f"{v * 100:.2f}" for v in m["accuracy_per_seed"])
        return (
            f"| {name} | {m['macs'] / 1e6:.2f} | {m['ms_1t']:.4f} | {m['speedup_1t']:.2f}× | {m['speedup_2t']:.2f}× "
            f"| {per_seed} | {m['accuracy_mean'] * 100:.2f} ± {m['accuracy_sd'] * 100:.2f} |"
        )

    se = c["se_from_seed_spread_points"]
    return "\n".join(
        [
            f"# Equal latency, replicated: {r['model']}",
            "",
            f"Command: `{r['command']}`  ",
            f"Data: {r['data']}; accuracies on the {r['held_out_test_images']} held-out test images through "
            f"onnxruntime. Target `{r['target']}`, round_to {r['round_to']}. Recovery: {r['recovery']}; seeds "
            f"{', '.join(map(str, r['seeds']))}; where it ran: {r['recovery_ran_on']}. Latency: onnxruntime p50, "
            "batch 1, interleaved with dense"
            f"{latency_order_note(r)}, median of runs. Machine: {r['machine']['cpu']}, "
            f"{r['machine']['cpu_count']} cores; wall {r['wall_s']} s.",
            "",
            f"Dense: {d['accuracy'] * 100:.2f} %, {d['macs'] / 1e6:.2f} MMACs, {d['ms_1t']:.4f} ms (1 thread).",
            "",
            "| model | MMACs | ms 1t | speedup 1t | speedup 2t | accuracy % per seed | mean ± s.d. |",
            "|---|---:|---:|---:|---:|---|---:|",
            row(f"Mix-and-Match `{mm['name']}`", mm),
            row(f"torch-pruning uniform {u['ratio']:g}", u),
            "",
            f"Mix-and-Match − uniform: **{c['mm_minus_uniform_points']:+.2f} points** (seed means); standard error "
            f"from the seed spread {'–' if se is None else f'{se:.2f}'} points; paired over the held-out images "
            f"(test-set sampling only) {c['paired_se_over_images_points']:.2f} points. One recovery's spread "
            f"(s.d. over seeds): Mix-and-Match {c['recovery_sd_points']['mix_and_match']:.2f}, uniform "
            f"{c['recovery_sd_points']['uniform']:.2f} points.",
            "",
            "Mix-and-Match group widths: "
            + ", ".join(f"{g} {w}" for g, w in mm["group_widths"].items() if w.split("/")[0] != w.split("/")[1]),
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())

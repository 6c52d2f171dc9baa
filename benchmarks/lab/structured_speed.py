"""Structured Mix-and-Match on a ResNet-style Fashion-MNIST model: accuracy drop vs measured ONNX speedup.

    python -m edgeprune.benchmarks.lab.structured_speed --pretrained --out benchmarks/results

Data (Fashion-MNIST from the Debian package or $EDGEPRUNE_FASHION_MNIST): ``--calib-images`` images of
the *training* split (default all 60 000) are the calibration set (signals, BN re-calibration,
fine-tuning: what a user holds besides the model); the 10 000 test images are split once (seed 0) into
``--screen-images`` used by the pipeline to screen and select, and the rest, held out, on which every
reported accuracy is measured through onnxruntime from the exported ONNX files.

What it measures (issue 3's numbers), on this machine's CPU, onnxruntime, batch 1, interleaved runs:

1. structured Mix-and-Match (the pipeline's search for each ``--speedups`` goal: 30 candidates, BN
   re-calibration, latency of each measured); the distinct architectures on the screening front
   (``--recover front``; ``all`` for every one) get the recovery budget: BN re-calibration, then
   ``--finetune-epochs`` of the ``--recovery`` recipe (default ``distill``: knowledge distillation from the
   dense model, shifts, one-cycle Adam). Selection ``--speedup X`` (the last goal) on 1-thread latency;
   accuracy drop and speedup over dense at 1 and 2 threads.
2. measured speedup vs MAC reduction ratio, every recovered architecture, and the selected one at larger
   inputs (``--scale-sizes``), where compute rather than per-operator overhead sets the latency.
3. torch-pruning's own uniform ratio pruning (``MetaPruner``, local ranking, the same importance as the
   selected candidate's signal, the same ``round_to``, classifier outputs kept) over ``--uniform-ratios``,
   each distinct model with the same recovery budget; its held-out accuracy interpolated at each
   Mix-and-Match candidate's latency.

Writes ``structured_speed_<model>.json`` and ``.md`` into ``--out``.

Recovery is the hours of this benchmark on a CPU. On a GPU machine, run the first half there and time the
second where the model will run:

    python -m edgeprune.benchmarks.lab.structured_speed --pretrained --device cuda --cluster local:8 --bundle B
    python -m edgeprune.benchmarks.lab.structured_speed --measure B --out benchmarks/results

``--bundle`` writes the recovered ONNX files and the search's facts (``state.json``) into B; ``--measure``
times them here (median of ``--repeats`` interleaved runs) and scores them on the held-out images.

Recovery runs through the product's recover stage (`recover.recover`, one rung of ``--finetune-epochs`` for
every model) on ``--cluster``'s executor: in this process by default, on a Ray here with ``local:N`` (with a
GPU, four recoveries share it), or on a cluster (``ray://HOST:PORT``, ``HOST:PORT``, ``auto``). Every model
stops early on the same 10 % of the calibration images and trains on the rest (`common.recovery_shared`);
with the same seed and ``--recover-threads`` the numbers are the same wherever it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
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
    search_config,
    speedup_at_sizes,
    this_machine,
    uniform_prune,
)
from edgeprune.benchmarks.machine import command_line, write_results
from edgeprune.benchmarks.runner import median_p50
from edgeprune.export import export_onnx
from edgeprune.export.quantize import onnx_hits
from torch import nn

from edgeprune.cluster import ClusterError, Executor, InProcess, executor_for
from edgeprune.evaluation import accuracy, params_and_macs
from edgeprune.granularity import SearchInputs, finish
from edgeprune.pipeline import CompressConfig, Timings
from edgeprune.recovery import RECIPES, resolve_device, teacher_logits_if_distilling
from edgeprune.report import versions
from edgeprune.selection import Point, pareto_mask
from edgeprune.structured import CompactBuild, compact
from edgeprune.structured.flow import ChannelCandidate, ChannelSearch
from edgeprune.targets import get_target


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def spread(items: list, keys: list[float], k: int, marks: tuple[float, ...] = ()) -> list:
    """At most ``k`` of ``items`` in ``keys`` order: for each mark the item with the lowest key >= it (on a
    front: the most accurate one reaching it), then the rest evenly spaced in ``keys`` (both ends)."""
    order = sorted(range(len(items)), key=lambda i: keys[i])
    if len(order) <= k:
        return [items[i] for i in order]
    lo, hi = keys[order[0]], keys[order[-1]]
    picked: list[int] = []
    for mark in marks:
        hit = next((i for i in order if keys[i] >= mark), None)
        if hit is not None and hit not in picked and len(picked) < k:
            picked.append(hit)
    rest = k - len(picked)
    for j in range(rest):
        want = lo + (hi - lo) * j / (rest - 1) if rest > 1 else hi
        best = min((i for i in order if i not in picked), key=lambda i: abs(keys[i] - want))
        picked.append(best)
    return [items[i] for i in sorted(picked, key=lambda i: keys[i])]


def interpolation_weights(xs: list[float], x: float) -> dict[int, float] | None:
    """The piecewise-linear interpolation at ``x`` through points at ``xs`` (any order) as weights on those
    points (index -> weight, summing to 1); None outside their span."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    for i0, i1 in zip(order, order[1:]):
        x0, x1 = xs[i0], xs[i1]
        if x0 <= x <= x1:
            w = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return {i0: 1.0 - w, i1: w} if w else {i0: 1.0}
    return None


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear y(x) through (x, y) points; None outside their span."""
    w = interpolation_weights([px for px, _ in points], x)
    return None if w is None else sum(wi * points[i][1] for i, wi in w.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_input_arguments(p)
    p.add_argument(
        "--target",
        default="x86_64-avx512",
        help="target profile (opset, default round_to); this benchmark's CPU has AVX-512: 16-channel conv blocks",
    )
    p.add_argument("--round-to", type=int, default=None, help="channel multiple (default: the target's)")
    p.add_argument("--speedups", default="1.5,2.0", help="search goals (--speedup); the last one selects")
    add_recovery_arguments(p)
    p.add_argument(
        "--recover",
        default="front",
        choices=("front", "all"),
        help="Mix-and-Match architectures to recover: those on the screening front (accuracy vs latency), or all",
    )
    p.add_argument(
        "--recover-max",
        type=int,
        default=5,
        help="front: at most this many, spread over speedup, from 0.9x the lowest goal up (recovery is the cost)",
    )
    p.add_argument("--scale-sizes", default="28,56,112", help="input sizes for the speedup-vs-MAC-ratio scaling")
    p.add_argument("--gradient-samples", type=int, default=1024)
    p.add_argument("--uniform-ratios", default="0.3,0.4,0.5,0.6,0.7")
    p.add_argument("--runs", type=int, default=300, help="timed runs per artifact in the final latency check")
    p.add_argument(
        "--repeats", type=int, default=3, help="interleaved latency runs per thread count; the median is reported"
    )
    p.add_argument("--batch-check", type=int, default=32, help="also time this batch size (throughput view)")
    add_cluster_argument(p)
    p.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)  # replaced by --cluster local:N
    p.add_argument(
        "--bundle",
        default=None,
        help="only search and recover (e.g. on a GPU machine), write the models and the state into this folder",
    )
    p.add_argument(
        "--measure",
        default=None,
        help="only time and score a --bundle folder on this machine (its search settings apply) and write results",
    )
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.bundle and args.measure:
        p.error("--bundle and --measure are the two halves of one run: give one")
    if args.measure and not (Path(args.measure) / BUNDLE_STATE).is_file():
        p.error(f"--measure {args.measure}: no {BUNDLE_STATE} there; write a bundle with --bundle first")
    if args.workers is not None:
        p.error(f"--workers is gone: recoveries use Ray's workers, e.g. --cluster local:{args.workers}")
    if args.repeats < 1 or args.finetune_epochs < 1 or args.recover_threads < 1:
        p.error("--repeats, --finetune-epochs and --recover-threads must be >= 1")
    check_cluster_argument(p, args.cluster)
    with tempfile.TemporaryDirectory(prefix="edgeprune-structured-bench-") as tmp:  # every candidate's ONNX
        try:
            return run(args, argv, Path(tmp))
        except ClusterError as exc:  # unreachable or lost head, a failed recovery: one line; --out and
            print(f"edgeprune: {exc}", file=sys.stderr)  # --bundle are written only once everything ran
            return 2


def run(args: argparse.Namespace, argv: list[str] | None, work: Path) -> int:
    """The benchmark, its intermediate files in ``work``: search and recover (``produce``), then time and
    score on this machine (``measure``); with ``--bundle`` only the first half, with ``--measure`` the second."""
    if args.measure:
        bundle = Path(args.measure)
        state = json.loads((bundle / BUNDLE_STATE).read_text())
        return measure(state, bundle, args, argv)
    state = produce(args, argv, work)
    if args.bundle:
        save_bundle(state, work, Path(args.bundle))
        print(f"[structured_speed] bundle written to {args.bundle}; time it with --measure {args.bundle}")
        return 0
    return measure(state, work, args, argv)


BUNDLE_STATE = "state.json"


def save_bundle(state: dict, work: Path, bundle: Path) -> None:
    """The produced state and its ONNX files in one folder (written under a temporary name, then renamed)."""
    tmp = bundle.with_name(bundle.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for row in [state["dense"], *state["mix_and_match"], *state["uniform_torch_pruning"]]:
        shutil.copy2(work / row["onnx"], tmp / row["onnx"])
    (tmp / BUNDLE_STATE).write_text(json.dumps(state, indent=2) + "\n")
    shutil.rmtree(bundle, ignore_errors=True)
    tmp.rename(bundle)


def produce(args: argparse.Namespace, argv: list[str] | None, work: Path) -> dict:
    """Search, recover and export (the half a GPU speeds up): a JSON-able state naming ONNX files in ``work``.
    The executor connects first, so an unreachable head fails before the search's minutes."""
    executor = executor_for(args.cluster)
    try:
        return _produce(args, argv, work, executor)
    finally:
        executor.close()


def _produce(args: argparse.Namespace, argv: list[str] | None, work: Path, executor: Executor) -> dict:
    t_start = time.time()
    target = get_target(args.target)
    round_to = args.round_to or target.round_to
    goals = [float(v) for v in args.speedups.split(",") if v.strip()]
    data, _, _, model = load_inputs(args)
    example = data.eval_x[:1]
    device, recipe, batch = resolve_device(args.device), RECIPES[args.recovery], CompressConfig.batch_size
    teacher = teacher_logits_if_distilling(recipe, model, data.calib_x, batch, device)
    shared = recovery_shared(
        model, data.calib_x, data.calib_y, recipe, teacher, lr=args.finetune_lr, batch_size=batch,
        seed=CompressConfig.seed, threads=args.recover_threads, device=args.device,
    )  # fmt: skip
    cfg = search_config(
        args,
        goals[-1],
        work,
        round_to=args.round_to,
        finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr,
        recovery=args.recovery,
        device=str(device),
    )
    log = Log("structured_speed")

    # 1. structured Mix-and-Match, the pipeline's own stages up to the measured latency of every candidate,
    #    once per goal (a broader front: each goal centres the search's ranges on itself)
    searches = []
    for goal in goals:
        cfg_g = dataclasses.replace(cfg, speedup=goal)
        stage_dir = work / f"goal_{goal:g}"
        stage_dir.mkdir()
        search = ChannelSearch(cfg_g, target, model, data, stage_dir, work, log, Timings())
        for stage in (search.discover, search.dense, search.probe, search.signals, search.plan):
            stage()
        search.screen()
        search.measure()
        search.finetuned = {}
        searches.append(search)
    # Recovery instead of the pipeline's top-k: every distinct architecture (its best-screened signal) on the
    # screening front, or all of them, so the accuracy/latency front is recovered, not just its top.
    best: dict[tuple, ChannelCandidate] = {}
    speedup: dict[tuple, float] = {}  # each search timed its own dense model
    for search in searches:
        for cc in search.cands:
            speedup[cc.shape_key] = search.dense_ms / cc.candidate.latency_ms
            b = best.get(cc.shape_key)
            if b is None or cc.candidate.accuracy > b.candidate.accuracy:
                best[cc.shape_key] = cc
    to_recover = sorted(best.values(), key=lambda c: c.candidate.macs)
    if args.recover == "front":
        front = pareto_mask([Point(c.candidate.accuracy, speedup[c.shape_key]) for c in to_recover])
        to_recover = [
            c for c, keep in zip(to_recover, front, strict=True) if keep and speedup[c.shape_key] >= 0.9 * min(goals)
        ]
        to_recover = spread(to_recover, [speedup[c.shape_key] for c in to_recover], args.recover_max, tuple(goals))
    log.log(f"recovering {len(to_recover)} of {len(best)} distinct Mix-and-Match architectures ({args.recover})")
    mm, recovered = [], {}

    def recover_all(builds: list, names: list[str]) -> list[nn.Module]:
        return recover_models(builds, names, shared, args.finetune_epochs, executor, log)

    def key(cc: ChannelCandidate) -> tuple:  # one recovered model per signal and architecture
        return cc.candidate.signal, cc.shape_key

    def recover_mm(ccs: list[ChannelCandidate]) -> None:
        names = [f"{cc.candidate.name} ({cc.candidate.macs / 1e6:.2f} MMACs)" for cc in ccs]
        models = recover_all([CompactBuild(cc.remove, example) for cc in ccs], names)
        for cc, pruned in zip(ccs, models, strict=True):
            screen_acc = accuracy(pruned, data.eval_x, data.eval_y, cfg.batch_size)
            recovered[key(cc)] = (pruned, screen_acc)
            onnx = f"mm_{len(mm)}.onnx"
            export_onnx(pruned, example, work / onnx, check_inputs=data.eval_x[:64])
            mm.append({"name": cc.candidate.name, "macs": cc.candidate.macs, "onnx": onnx, "key": key(cc)})

    recover_mm(to_recover)
    # the pipeline's selection for the last goal among its candidates (recovered ones carry their
    # accuracy); a pick that was not recovered (its screening accuracy beat the recovered ones) gets the
    # same budget, then the selection runs again
    search = searches[-1]
    while True:
        for i, cc in enumerate(search.cands):
            hit = recovered.get(key(cc))
            if hit is not None:
                search.finetuned[i], cc.candidate.finetuned_accuracy = hit
        search.select()
        if key(search.chosen) in recovered:
            break
        recover_mm([search.chosen])
    # the product's shared end: the test split once, deliver, the report (what `compress` runs after the pick)
    inp = SearchInputs(
        search.cfg, target, model, data, search.staging, log, search.t, InProcess(), None, search.threads
    )
    report = finish(inp, search.found())
    sel = report.selected
    for row in mm:
        row["selected"] = row.pop("key") == key(search.chosen)
    shutil.copy2(work / f"goal_{goals[-1]:g}" / "dense.onnx", work / "dense.onnx")
    screen_dense_ms, line = _screen_facts(search)

    # 2. torch-pruning uniform ratio sweep (same importance signal, same round_to), every distinct size
    #    recovered
    uniform, pruned_uniform, seen = [], [], set()
    n = args.gradient_samples
    for r in [float(v) for v in args.uniform_ratios.split(",") if v.strip()]:
        pr = uniform_prune(model, example, r, sel.signal, round_to, data.calib_x[:n], data.calib_y[:n])
        shape = tuple(m.weight.shape for m in pr.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        if shape not in seen:
            seen.add(shape)
            pruned_uniform.append((r, pr))
    names = [f"torch-pruning uniform {r:.2f}" for r, _ in pruned_uniform]
    models = recover_all([ModelBuild(pr) for _, pr in pruned_uniform], names)
    for (r, _), pr in zip(pruned_uniform, models, strict=True):
        export_onnx(pr, example, work / f"uniform_{r:.2f}.onnx", check_inputs=data.eval_x[:64])
        uniform.append({"ratio": r, "macs": params_and_macs(pr, example)[1], "onnx": f"uniform_{r:.2f}.onnx"})

    return {
        "args": {k: v for k, v in vars(args).items() if k not in ("bundle", "measure", "out")},
        "command": command_line("edgeprune.benchmarks.lab.structured_speed", argv),
        "machine": this_machine(),
        "recovery_device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "wall_s": round(time.time() - t_start, 1),
        "versions": versions(),
        "weights_sha256_16": _weights_sha(args),
        "data": data.name,
        "target": target.name,
        "round_to": round_to,
        "goals": goals,
        "recovery": {
            "bn_recalibration": f"{min(len(data.calib_x), 8 * cfg.batch_size)} calibration images",
            "finetune": f"{args.finetune_epochs} epochs, recipe `{recipe.name}` ({recipe.description}), "
            f"lr {args.finetune_lr}, batch {cfg.batch_size}, best epoch kept (early stopping, patience 3) on 10 % "
            f"of the {len(data.calib_x)} calibration images",
            "applied_to": f"{len(mm)} of the {len(best)} distinct Mix-and-Match architectures "
            + (
                f"(on the screening front, screening speedup >= {0.9 * min(goals):.2f}x, at most "
                f"{args.recover_max} spread over speedup; each with its best-screened signal)"
                if args.recover == "front"
                else ""
            )
            + " and every distinct uniform-ratio model",
            "ran_on": executor.describe(),
            "threads_per_recovery": args.recover_threads,
        },
        "dense": {"macs": report.dense.macs, "onnx": "dense.onnx", "onnx_bytes": report.dense.onnx_bytes},
        "selected": {
            "name": sel.name,
            "why": sel.why,
            "parity_max_abs_diff": sel.parity_max_abs_diff,
            "onnx_bytes": sel.onnx_bytes,
            "remove": {g: [int(u) for u in units] for g, units in search.chosen.remove.items()},
            "group_widths": {layer.name: f"{layer.kept}/{layer.units}" for layer in report.layers},
        },
        "latency_floor": line,
        "screening_dense_ms_1t": screen_dense_ms,
        "mix_and_match": mm,
        "uniform_torch_pruning": uniform,
    }


def measure(state: dict, files: Path, args: argparse.Namespace, argv: list[str] | None) -> int:
    """Latency (this machine, interleaved), held-out accuracy and the derived checks of a produced state
    whose ONNX files lie in ``files``; writes the results into ``args.out``."""
    t_start = time.time()
    a = argparse.Namespace(**state["args"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, held_x, held_y, model = load_inputs(a)
    example = data.eval_x[:1]
    sample = example.numpy().astype(np.float32)
    mm = [dict(row) for row in state["mix_and_match"]]
    uniform = [dict(row) for row in state["uniform_torch_pruning"]]
    dense_macs = state["dense"]["macs"]

    # latency at batch 1, 1 and 2 threads, everything interleaved in one run per thread count
    dense_onnx = files / state["dense"]["onnx"]
    paths = [dense_onnx] + [files / m["onnx"] for m in mm] + [files / u["onnx"] for u in uniform]
    lat = {th: median_p50(paths, sample, th, args.runs, args.repeats) for th in (1, 2)}
    # head to head: dense and one model alone, interleaved. With a dozen models cycling, every model runs
    # with cold caches and dense, the biggest, loses most: the all-models run read 2-5 % higher speedups
    h2h = {
        k: {th: median_p50([dense_onnx, path], sample, th, args.runs, args.repeats) for th in (1, 2)}
        for k, path in enumerate(paths[1:], start=1)
    }
    hits = [onnx_hits(p, held_x, held_y, threads=2) for p in paths]  # per held-out image, for paired tests
    accs = [float(h.mean()) for h in hits]
    dense_acc = accs[0]
    for k, row in enumerate(mm + uniform, start=1):
        row["accuracy"] = accs[k]
        row["drop_points"] = (dense_acc - accs[k]) * 100
        for th in (1, 2):
            row[f"ms_{th}t"] = lat[th][k]
            row[f"speedup_{th}t"] = lat[th][0] / lat[th][k]
            row[f"speedup_{th}t_head_to_head"] = h2h[k][th][0] / h2h[k][th][1]
        row["mac_ratio"] = dense_macs / row["macs"]
        for th, suffix in ((1, ""), (2, ""), (1, "_head_to_head"), (2, "_head_to_head")):
            row[f"speedup_over_mac_ratio_{th}t{suffix}"] = row[f"speedup_{th}t{suffix}"] / row["mac_ratio"]
    sel_row = next(m for m in mm if m["selected"])
    # equal latency, both ways: each model against the other method's recovered points, interpolated
    for row in mm:
        row["uniform_accuracy_at_same_latency_1t"] = interpolate(
            [(u["ms_1t"], u["accuracy"]) for u in uniform], row["ms_1t"]
        )
    for row in uniform:
        row["mm_accuracy_at_same_latency_1t"] = interpolate([(m["ms_1t"], m["accuracy"]) for m in mm], row["ms_1t"])
    pairs, pair_diffs = equal_latency_pairs(mm, uniform, hits[1 : 1 + len(mm)], hits[1 + len(mm) :])
    big = data.eval_x[: args.batch_check].numpy().astype(np.float32)
    sel_onnx = files / sel_row["onnx"]
    batch_lat = {
        th: median_p50([dense_onnx, sel_onnx], big, th, max(20, args.runs // 10), args.repeats) for th in (1, 2)
    }

    sizes = [int(v) for v in args.scale_sizes.split(",") if v.strip()]
    print(f"[structured_speed] speedup vs MAC ratio of the selection at inputs {sizes} ...", flush=True)
    selected = {"selected": compact(model, example, state["selected"]["remove"])}
    with tempfile.TemporaryDirectory(prefix="edgeprune-structured-scale-") as tmp:
        scaling = speedup_at_sizes(model, selected, sizes, max(30, args.runs // 3), Path(tmp), args.repeats)

    def best_speedup_within(points: list[dict], key: str, drop: float) -> dict | None:
        ok = [r for r in points if r["drop_points"] <= drop]
        return max(ok, key=lambda r: r[key]) if ok else None

    def best_accuracy_at(points: list[dict], key: str, speedup: float) -> dict | None:
        ok = [r for r in points if r[key] >= speedup]
        return max(ok, key=lambda r: r["accuracy"]) if ok else None

    def bests(key: str) -> dict:
        """The models the targets look at, by one speedup column (all interleaved, or head to head)."""
        b1, b2 = best_speedup_within(mm, key, 1.0), best_accuracy_at(mm, key, 2.0)
        ua = best_speedup_within(uniform, key, 1.0)
        return {
            "mm_best_speedup_within_1_point": b1 and {k: b1[k] for k in ("name", key, "drop_points")},
            "mm_best_drop_at_2x": b2 and {k: b2[k] for k in ("name", key, "drop_points")},
            "uniform_best_speedup_within_1_point": ua and {k: ua[k] for k in ("ratio", key, "drop_points")},
        }

    summary = {}
    for th in (1, 2):
        key = f"speedup_{th}t"
        ub = best_accuracy_at(uniform, key, 2.0)
        summary[f"{th}t"] = {
            **bests(key),
            "uniform_best_drop_at_2x": ub and {k: ub[k] for k in ("ratio", key, "drop_points")},
        }
    for th in (1, 2):
        summary[f"{th}t_head_to_head"] = bests(f"speedup_{th}t_head_to_head")

    def within_at_2x(entry: str) -> bool:
        best = summary[entry]["mm_best_drop_at_2x"]
        return bool(best) and best["drop_points"] <= 1.0

    diffs = [p["mm_minus_uniform_points"] for p in pairs]
    summary["equal_latency_1t"] = {
        "pairs": pairs,
        "mm_ahead": sum(d > 0 for d in diffs),
        "mean_mm_minus_uniform_points": sum(diffs) / len(diffs) if diffs else None,
        "one_se_of_a_difference_points": math.sqrt(2) * binomial_se_points(sel_row["accuracy"], len(held_y)),
        # the same images score both methods: the paired standard error of the mean difference is the one
        # that says whether it is real (test-set sampling only; recovery's seed noise is not in it)
        "paired_se_of_mean_points": paired_se_points(np.mean(pair_diffs, axis=0)) if pair_diffs else None,
    }
    measure_command = command_line("edgeprune.benchmarks.lab.structured_speed", argv)
    split = bool(args.measure)
    sel = state["selected"]
    result = {
        "command": f"{state['command']}, then {measure_command}" if split else state["command"],
        "model": a.model,
        "weights_sha256_16": state["weights_sha256_16"],
        "data": state["data"],
        "held_out_test_images": len(held_y),
        "target": state["target"],
        "round_to": state["round_to"],
        "latency_repeats": args.repeats,
        "latency_order": LATENCY_ORDER,
        "recovery": {**state["recovery"], "device": state["recovery_device"]},
        "dense": {
            "accuracy": dense_acc,
            "macs": dense_macs,
            "latency_ms_1t": lat[1][0],
            "latency_ms_2t": lat[2][0],
            f"latency_ms_batch{args.batch_check}_1t": batch_lat[1][0],
            f"latency_ms_batch{args.batch_check}_2t": batch_lat[2][0],
        },
        "selected_by_pipeline": {
            "name": sel["name"],
            "why": sel["why"],
            "goal": f"--speedup {state['goals'][-1]:g}",
            **{k: v for k, v in sel_row.items() if k not in ("onnx", "selected")},
            "parity_max_abs_diff": sel["parity_max_abs_diff"],
            "onnx_bytes": sel["onnx_bytes"],
            "dense_onnx_bytes": state["dense"]["onnx_bytes"],
            f"speedup_batch{args.batch_check}_1t": batch_lat[1][0] / batch_lat[1][1],
            f"speedup_batch{args.batch_check}_2t": batch_lat[2][0] / batch_lat[2][1],
            "group_widths": sel["group_widths"],
        },
        "summary": summary,
        "latency_floor": state["latency_floor"],
        "screening_dense_ms_1t": state["screening_dense_ms_1t"],
        "search_goals": [f"--speedup {g:g}" for g in state["goals"]],
        "input_scaling": scaling,
        "mix_and_match": [{k: v for k, v in r.items() if k not in ("onnx", "selected")} for r in mm],
        "uniform_torch_pruning": [{k: v for k, v in u.items() if k != "onnx"} for u in uniform],
        "checks": {
            **{
                f"drop_le_1_point_at_speedup_ge_2_{entry}": within_at_2x(entry)
                for entry in ("1t", "2t", "1t_head_to_head", "2t_head_to_head")
            },
            "speedup_ge_0.8_mac_ratio_all_mm_1t": all(r["speedup_over_mac_ratio_1t"] >= 0.8 for r in mm),
            "speedup_ge_0.8_mac_ratio_selected_1t": sel_row["speedup_over_mac_ratio_1t"] >= 0.8,
            "speedup_ge_0.8_mac_ratio_selected_2t": sel_row["speedup_over_mac_ratio_2t"] >= 0.8,
            "speedup_ge_0.8_mac_ratio_selected_1t_head_to_head": sel_row["speedup_over_mac_ratio_1t_head_to_head"]
            >= 0.8,
            f"speedup_ge_0.8_mac_ratio_selected_1t_at_{scaling[-1]['input']}px": scaling[-1][
                "speedup_over_mac_ratio_1t"
            ]
            >= 0.8,
            "mm_more_accurate_than_uniform_at_equal_latency": bool(diffs) and all(d > 0 for d in diffs),
        },
        "wall_s": round(state["wall_s"] + time.time() - t_start, 1),
        "machine": this_machine(),
        "versions": versions(),
    }
    if split:  # searched and recovered elsewhere: say where, and what its CPU timed during the search
        result["produced_on"] = {
            "machine": state["machine"],
            "versions": state["versions"],
            "wall_s": state["wall_s"],
            "note": "search, screening latency (latency floor, which candidates were recovered, the selection) "
            "and recovery ran there; every latency and accuracy in the tables was measured here",
        }
    label = Path(a.checkpoint).stem if a.checkpoint else a.model
    write_results(out, f"structured_speed_{label}", result, render(result, args.batch_check))
    print(render(result, args.batch_check))
    return 0


def _screen_facts(search: ChannelSearch) -> tuple[float, dict]:
    """Dense latency of the screening run and the latency floor (the probe), at the precision the report
    states them."""
    line = search.line
    floor = {
        "narrowest_mmacs": round(line.floor_macs / 1e6, 2),
        "narrowest_ms_1t": round(line.floor_ms, 3),
        "dense_ms_1t": round(line.dense_ms, 3),
    }
    return round(search.dense_ms, 3), floor


def _weights_sha(args) -> str | None:
    from edgeprune.zoo import bundled_weights

    if args.checkpoint:
        return sha256(Path(args.checkpoint))
    path = bundled_weights(args.model) if args.pretrained else None
    return sha256(path) if path else None


def binomial_se_points(acc: float, n: int) -> float:
    """One binomial standard error of an accuracy near ``acc`` on ``n`` images, in points."""
    return math.sqrt(acc * (1 - acc) / n) * 100


def accuracy_noise(acc: float, n: int) -> str:
    """One standard error said in words: the scale below which two accuracies in these tables are not told
    apart."""
    se = binomial_se_points(acc, n)
    return f"One standard error of an accuracy near {acc * 100:.1f} % on {n} images: {se:.2f} points."


def equal_latency_pairs(
    mm: list[dict], uniform: list[dict], mm_hits: list[np.ndarray], uniform_hits: list[np.ndarray]
) -> tuple[list[dict], list[np.ndarray]]:
    """Every recovered model that lies inside the other method's latency span, beside that method's accuracy
    interpolated at its 1-thread latency, sorted by latency; and, per pair, the per-image difference
    (Mix-and-Match minus uniform; the interpolated side is the same weighted mix of its neighbours' hits).
    ``*_hits``: per held-out image, whether each row's model was right."""
    found = []
    sides = (("mm", mm, mm_hits, uniform, uniform_hits), ("uniform", uniform, uniform_hits, mm, mm_hits))
    for side, rows, hits, others, other_hits in sides:
        xs = [o["ms_1t"] for o in others]
        for r, h in zip(rows, hits, strict=True):
            w = interpolation_weights(xs, r["ms_1t"])
            if w is None:
                continue
            other = sum(wi * other_hits[i].astype(np.float64) for i, wi in w.items())
            own = h.astype(np.float64)
            diff = own - other if side == "mm" else other - own
            pair = {
                "model": r["name"] if side == "mm" else f"uniform {r['ratio']:.2f}",
                "ms_1t": r["ms_1t"],
                "mm": float((own if side == "mm" else other).mean()),
                "uniform": float((other if side == "mm" else own).mean()),
                "mm_minus_uniform_points": float(diff.mean() * 100),
                "paired_se_points": paired_se_points(diff),
            }
            found.append((pair, diff))
    found.sort(key=lambda pd: pd[0]["ms_1t"])
    return [p for p, _ in found], [d for _, d in found]


def _h2h(s: dict) -> str:
    if "speedup_1t_head_to_head" not in s:
        return ""
    return (
        f" (head to head: {s['speedup_1t_head_to_head']:.2f}x / {s['speedup_2t_head_to_head']:.2f}x, speedup / MAC "
        f"{s['speedup_over_mac_ratio_1t_head_to_head']:.2f} / {s['speedup_over_mac_ratio_2t_head_to_head']:.2f})"
    )


def _repeats(r: dict) -> str:
    n = r.get("latency_repeats", 1)
    return f", the median of {n} such runs" if n > 1 else ""


def _produced_elsewhere(r: dict) -> list[str]:
    """A paragraph naming the machine that searched and recovered, when it was not this one."""
    p = r.get("produced_on")
    if not p:
        return []
    return [
        f"Searched and recovered on {p['machine']['cpu']} ({p['machine']['cpu_count']} cores, torch "
        f"{p['versions'].get('torch', '?')}, {p['wall_s']} s): {p['note']}.",
        "",
    ]


SUMMARY_ROWS = (  # summary key -> its label in the results table
    ("mm_best_speedup_within_1_point", "Mix-and-Match: fastest within 1 point"),
    ("mm_best_drop_at_2x", "Mix-and-Match: most accurate at >= 2x"),
    ("uniform_best_speedup_within_1_point", "uniform (torch-pruning): fastest within 1 point"),
    ("uniform_best_drop_at_2x", "uniform (torch-pruning): most accurate at >= 2x"),
)


def render(r: dict, batch: int) -> str:
    d, s = r["dense"], r["selected_by_pipeline"]
    ok = {True: "yes", False: "**no**"}

    def pt(x: dict | None, key: str) -> str:
        if not x:
            return "none"
        label = x.get("name") or f"ratio {x['ratio']:.2f}"
        return f"{x[key]:.2f}x, drop {x['drop_points']:.2f} pts (`{label}`)"

    lines = [
        f"# Structured Mix-and-Match speed: {r['model']} on Fashion-MNIST",
        "",
        f"Command: `{r['command']}`  ",
        f"Data: {r['data']}; every accuracy below is measured on the {r['held_out_test_images']} held-out test "
        f"images through onnxruntime. Target `{r['target']}`, round_to {r['round_to']}. Recovery (identical for "
        f"every model): BN re-calibration ({r['recovery']['bn_recalibration']}), then fine-tuning "
        f"{r['recovery']['finetune']}; applied to {r['recovery']['applied_to']}; trained on "
        f"{r['recovery'].get('device', 'cpu')}. Latency: onnxruntime p50, batch 1, "
        f"all models interleaved in one run per thread count{latency_order_note(r)}{_repeats(r)}. "
        f"Machine: {r['machine']['cpu']}, "
        f"{r['machine']['cpu_count']} cores (shared with other jobs); wall {r['wall_s']} s.",
        "",
        *_produced_elsewhere(r),
        f"Dense: {d['accuracy'] * 100:.2f} %, {d['macs'] / 1e6:.2f} MMACs, {d['latency_ms_1t']:.4f} ms (1 thread), "
        f"{d['latency_ms_2t']:.4f} ms (2 threads). {accuracy_noise(s['accuracy'], r['held_out_test_images'])}",
        "",
        "| | 1 thread | 2 threads |",
        "|---|---|---|",
    ]

    def summary_rows(suffix: str) -> list[str]:
        """One table row per summary entry present, 1 and 2 threads (``suffix``: "" or "_head_to_head")."""
        one, two = r["summary"][f"1t{suffix}"], r["summary"][f"2t{suffix}"]
        return [
            f"| {label} | {pt(one[key], f'speedup_1t{suffix}')} | {pt(two[key], f'speedup_2t{suffix}')} |"
            for key, label in SUMMARY_ROWS
            if key in one
        ]

    lines += summary_rows("")
    if "1t_head_to_head" in r["summary"]:
        lines += [
            "",
            "Head to head (dense and one model alone, interleaved, the same repeats; the all-models run above keeps "
            "every model's caches cold, which costs dense most):",
            "",
            "| | 1 thread | 2 threads |",
            "|---|---|---|",
        ]
        lines += summary_rows("_head_to_head")
    lines += [
        "",
        f"Pipeline selection for `{s['goal']}`: `{s['name']}` ({s['why']}): {s['accuracy'] * 100:.2f} % "
        f"(drop {s['drop_points']:.2f} pts), speedup {s['speedup_1t']:.2f}x / {s['speedup_2t']:.2f}x (1 / 2 threads), "
        f"MAC reduction {s['mac_ratio']:.2f}x, speedup / MAC ratio {s['speedup_over_mac_ratio_1t']:.2f} / "
        f"{s['speedup_over_mac_ratio_2t']:.2f}{_h2h(s)}; batch {batch}: {s[f'speedup_batch{batch}_1t']:.2f}x / "
        f"{s[f'speedup_batch{batch}_2t']:.2f}x; ONNX parity {s['parity_max_abs_diff']:.1e}, "
        f"{s['onnx_bytes']:,} bytes vs dense {s['dense_onnx_bytes']:,}. Widths: "
        + ", ".join(f"{k} {v}" for k, v in s["group_widths"].items())
        + ".",
        "",
        f"Latency floor: the narrowest model the rules allow ({r['latency_floor']['narrowest_mmacs']:.2f} MMACs) ran "
        f"at {r['latency_floor']['narrowest_ms_1t']:.3f} ms next to dense's {r['latency_floor']['dense_ms_1t']:.3f} ms "
        "(1 thread, probe run): no channel pruning goes faster than that on this CPU.",
        "",
        "| check | met |",
        "|---|:-:|",
        *[f"| {k} | {ok[bool(v)]} |" for k, v in r["checks"].items()],
        "",
        "## Speedup against MAC ratio as the input grows (the selected architecture, batch 1)",
        "",
        "| input px | dense MMACs | MAC ratio | dense ms 1t | ms 1t | speedup 1t | speedup/MAC 1t "
        "| dense ms 2t | ms 2t | speedup 2t | speedup/MAC 2t |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {c['input']} | {c['dense_mmacs']:.1f} | {c['mac_ratio']:.2f} | {c['dense_ms_1t']:.3f} "
            f"| {c['ms_1t']:.3f} "
            f"| {c['speedup_1t']:.2f} | {c['speedup_over_mac_ratio_1t']:.2f} | {c['dense_ms_2t']:.3f} "
            f"| {c['ms_2t']:.3f} | {c['speedup_2t']:.2f} | {c['speedup_over_mac_ratio_2t']:.2f} |"
            for c in r.get("input_scaling", [])
        ],
        "",
        "## Mix-and-Match, distinct candidate architectures, recovered",
        "",
        "| candidate | MMACs | MAC ratio | ms 1t | speedup 1t | speedup/MAC 1t | ms 2t | speedup 2t | acc % | drop pts "
        "| uniform acc % at same 1t latency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in r["mix_and_match"]:
        ua = m["uniform_accuracy_at_same_latency_1t"]
        lines.append(
            f"| {m['name']} | {m['macs'] / 1e6:.2f} | {m['mac_ratio']:.2f} | {m['ms_1t']:.4f} | {m['speedup_1t']:.2f} "
            f"| {m['speedup_over_mac_ratio_1t']:.2f} | {m['ms_2t']:.4f} | {m['speedup_2t']:.2f} "
            f"| {m['accuracy'] * 100:.2f} | {m['drop_points']:.2f} | {'—' if ua is None else f'{ua * 100:.2f}'} |"
        )
    lines += [
        "",
        "## torch-pruning uniform ratio (MetaPruner, local ranking, same importance and round_to), recovered",
        "",
        "| ratio | MMACs | MAC ratio | ms 1t | speedup 1t | ms 2t | speedup 2t | acc % | drop pts "
        "| Mix-and-Match acc % at same 1t latency |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for u in r["uniform_torch_pruning"]:
        ma = u.get("mm_accuracy_at_same_latency_1t")
        lines.append(
            f"| {u['ratio']:.2f} | {u['macs'] / 1e6:.2f} | {u['mac_ratio']:.2f} | {u['ms_1t']:.4f} "
            f"| {u['speedup_1t']:.2f} | {u['ms_2t']:.4f} | {u['speedup_2t']:.2f} | {u['accuracy'] * 100:.2f} "
            f"| {u['drop_points']:.2f} | {'—' if ma is None else f'{ma * 100:.2f}'} |"
        )
    lines += ["", *_equal_latency_lines(r["summary"].get("equal_latency_1t"))]
    return "\n".join(lines)


def _se(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _equal_latency_lines(eq: dict | None) -> list[str]:
    """The pairs at equal 1-thread latency, both directions, and what they add up to."""
    if eq is None:
        return []
    lines = [
        "## Equal latency: Mix-and-Match against uniform (1 thread)",
        "",
        "Each recovered model inside the other method's latency span, beside that method's accuracy interpolated "
        "linearly between its two recovered neighbours.",
        "",
        "| model | ms 1t | Mix-and-Match acc % | uniform acc % | MM − uniform pts | paired s.e. pts |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {p['model']} | {p['ms_1t']:.4f} | {p['mm'] * 100:.2f} | {p['uniform'] * 100:.2f} "
            f"| {p['mm_minus_uniform_points']:+.2f} | {_se(p.get('paired_se_points'))} |"
            for p in eq["pairs"]
        ],
        "",
    ]
    if eq["pairs"]:
        lines += [
            f"Mix-and-Match ahead in {eq['mm_ahead']} of {len(eq['pairs'])} pairs, mean "
            f"{eq['mean_mm_minus_uniform_points']:+.2f} points (paired standard error over the same held-out "
            f"images {_se(eq.get('paired_se_of_mean_points'))}); one standard error of a difference of two "
            f"independent accuracies: {eq['one_se_of_a_difference_points']:.2f} points. The paired figures count "
            "test-set sampling only: two recoveries of one architecture differ by more (see the notes).",
            "",
        ]
    else:
        lines += ["No model lies inside the other method's latency span.", ""]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())

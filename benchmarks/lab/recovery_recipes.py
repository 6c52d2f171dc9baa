"""Which fine-tuning recipe recovers a pruned model best on little data (issues #15 part 3, #16)?

The same pruned models, the same splits, the same optimizer steps and rates: only the recipe (and, between runs,
``--batch-size``) differs (`recovery.RECIPES`: ``distill-once`` labels the images with the dense model's logits
computed once on the unshifted images; ``distill`` has the dense model label the very shifted view the student
sees; ``paper`` is plain cross-entropy); ``none`` is every candidate before fine-tuning. Per seed the data's
three splits are drawn anew; every candidate is recovered by the product's recover stage (early stopping on the
selection split) at each of the product's rates, the rate the selection split prefers is kept (what `compress`
does), and the test split is read once at the end.

Candidates: channel mode (torch-pruning's uniform ratio, magnitude ranking, classifier kept: physically
compacted) at ``--ratios``; unstructured (LAMP's global plan, masks enforced) at ``--sparsities``.

    python -m edgeprune.benchmarks.lab.recovery_recipes                 # the demo, as `compress` sees it
    python -m edgeprune.benchmarks.lab.recovery_recipes --model fmnist_mobilenetv3 --pretrained --data fashion-mnist
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from edgeprune.benchmarks.lab.common import Log, ModelBuild, uniform_prune
from edgeprune.benchmarks.machine import command_line, machine_info, write_results

from edgeprune.baselines import BASELINES
from edgeprune.cluster import InProcess
from edgeprune.data import load_data
from edgeprune.evaluation import accuracy, right_answers
from edgeprune.halving import Top
from edgeprune.inventory import prunable_layers
from edgeprune.masking import build_masks
from edgeprune.models import load_model
from edgeprune.recover import Job, MaskBuild, Shared, best_rate, recover
from edgeprune.recovery import (
    RECIPES,
    default_lrs,
    finetune_batch,
    has_batchnorm,
    recalibrate_bn,
    teacher_logits_if_distilling,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"
NONE = "none"  # the row of every candidate before fine-tuning: built and BN re-calibrated


def candidates(model, data, ratios: list[float], sparsities: list[float], round_to: int) -> dict[str, object]:
    """Builders by name: compacted models and LAMP masks, from the dense ``model``."""
    builds: dict[str, object] = {}
    example = data.calib_x[:1]
    for r in ratios:
        pruned = uniform_prune(model, example, r, "magnitude", round_to, data.calib_x, data.calib_y)
        builds[f"channel {r:.0%}"] = ModelBuild(pruned)
    layers = prunable_layers(model)
    lamp = BASELINES["lamp"]
    for s in sparsities:
        plan = lamp.plan(layers, None, s)
        builds[f"lamp {s:.0%}"] = MaskBuild(build_masks(lamp.scores(layers, None, 0), plan))
    return builds


def run_seed(a: argparse.Namespace, seed: int, log: Log) -> dict[str, dict[str, float]]:
    """Test accuracy (and the selection split's) of every candidate x recipe for one seed."""
    data = load_data(a.data, calib_size=a.calib_size, eval_size=a.eval_size, test_size=a.test_size, seed=seed)
    model = load_model(a.model, pretrained=a.pretrained, num_classes=data.num_classes, in_chans=data.in_chans)
    builds = candidates(model, data, a.ratios, a.sparsities, a.round_to)
    out: dict[str, dict[str, float]] = {}
    results: dict[tuple[str, str], tuple[object, float]] = {}
    for key, build in builds.items():  # the start every recipe trains from: built, BN re-calibrated
        start = build.build(model)
        if has_batchnorm(start):
            recalibrate_bn(start, data.calib_x)
        results[(key, NONE)] = (start.eval(), accuracy(start, data.select_x, data.select_y))
    for name in a.recipes:
        recipe = RECIPES[name]
        shared = Shared(
            model,
            data.calib_x,
            data.calib_y,
            data.select_x,
            data.select_y,
            recipe,
            teacher_logits_if_distilling(recipe, model, data.calib_x),
            batch_size=128,
            finetune_batch=a.batch_size,
            seed=seed,
            threads=torch.get_num_threads(),
            device="cpu",
        )
        for key, build in builds.items():
            rates = default_lrs(model, compacted=key.startswith("channel"))
            jobs = [Job(f"{key} @ {lr:g}", build, lr=lr) for lr in rates]
            t0 = time.perf_counter()
            outcomes = recover(jobs, shared, Top(k=len(jobs), epochs=a.epochs), InProcess(), progress=log)
            kept = outcomes[best_rate(outcomes)]
            recovered = build.build(model)
            recovered.load_state_dict(kept.state)
            results[(key, name)] = (recovered.eval(), kept.accuracy)
            log.log(f"seed {seed} {key} {name}: selection {kept.accuracy:.4f} ({time.perf_counter() - t0:.1f} s)")
    test_x, test_y = data.test_split("recovery_recipes: every recovered model, once, after all recovery")
    dense = right_answers(model, test_x, test_y)
    out["dense"] = {"test": float(dense.mean())}
    for (key, name), (recovered, select) in results.items():
        answers = right_answers(recovered, test_x, test_y)
        out[f"{key} | {name}"] = {
            "test": float(answers.mean()),
            "select": float(select),
            "answers": answers.astype(np.int8).tolist(),
        }
    return out


def summarize(a: argparse.Namespace, per_seed: list[dict]) -> dict:
    """Mean test accuracy per candidate x recipe over seeds, and each recipe minus the first, paired by seed."""
    rows = []
    base = a.recipes[0]
    keys = sorted({k.split(" | ")[0] for k in per_seed[0] if " | " in k})
    for key in keys:
        for name in [NONE, *a.recipes]:
            acc = np.array([s[f"{key} | {name}"]["test"] for s in per_seed]) * 100
            sel = np.array([s[f"{key} | {name}"]["select"] for s in per_seed]) * 100
            diff = acc - np.array([s[f"{key} | {base}"]["test"] for s in per_seed]) * 100
            rows.append(
                {
                    "candidate": key,
                    "recipe": name,
                    "test": float(acc.mean()),
                    "test_se": _se(acc),
                    "select": float(sel.mean()),
                    "delta": float(diff.mean()),
                    "delta_se": _se(diff),
                }
            )
    dense = np.array([s["dense"]["test"] for s in per_seed]) * 100
    return {"dense_test": float(dense.mean()), "rows": rows}


def _se(v: np.ndarray) -> float:
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def markdown(a: argparse.Namespace, summary: dict, meta: dict) -> str:
    base, m = a.recipes[0], meta["machine"]
    lines = [
        f"# Recovery recipes on little data: {a.model} on {a.data}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {m['platform']}, {m['cpu']}, {m['cores']} cores; load at the start {m['load_average_1m']}, "
        f"at the end {meta['load_end']:.2f}; {m['utc']}  ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}  ",
        f"Splits per seed ({', '.join(map(str, a.seeds))}): calibration {a.calib_size} (fine-tuning), selection "
        f"{a.eval_size} (early stopping, the rate), test {a.test_size} (below, read once). Every recipe: "
        f"{a.epochs} epoch(s) at the product's rates, batch {a.batch_size or finetune_batch(a.calib_size)}; "
        f"wall {meta['seconds']:.0f} s.",
        "",
        f"Dense test accuracy {summary['dense_test']:.2f} %. Δ: the recipe minus `{base}`, paired by seed, "
        f"± one s.e.; `{NONE}`: no fine-tuning (the candidate built and BN re-calibrated, where every recipe starts).",
        "",
        "| candidate | recipe | test % | selection % | Δ test |",
        "|---|---|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        delta = "—" if r["recipe"] == base else f"{r['delta']:+.2f} ± {r['delta_se']:.2f}"
        lines.append(
            f"| {r['candidate']} | {r['recipe']} | {r['test']:.2f} ± {r['test_se']:.2f} | {r['select']:.2f} | {delta} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--pretrained", action="store_true", help="zoo models: the bundled weights")
    p.add_argument("--data", default="demo")
    p.add_argument("--calib-size", type=int, default=1000)
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--ratios", type=lambda s: [float(v) for v in s.split(",") if v], default=[0.3, 0.45])
    p.add_argument("--sparsities", type=lambda s: [float(v) for v in s.split(",") if v], default=[0.9])
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--recipes", type=lambda s: s.split(","), default=["distill-once", "distill"])
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: the product's (`recovery.finetune_batch`)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    a.recipes = [r for r in a.recipes if r != NONE] or p.error("--recipes: name at least one recipe")
    unknown = [r for r in a.recipes if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    log = Log("recovery_recipes")
    machine = machine_info()
    t0 = time.perf_counter()
    per_seed = [run_seed(a, seed, log) for seed in a.seeds]
    summary = summarize(a, per_seed)
    meta = {
        "command": command_line("edgeprune.benchmarks.lab.recovery_recipes", argv),
        "machine": machine,
        "load_end": os.getloadavg()[0],
        "seconds": time.perf_counter() - t0,
    }
    md = markdown(a, summary, meta)
    write_results(
        a.out, f"recovery_recipes_{a.tag or a.model}", {"meta": meta, "summary": summary, "per_seed": per_seed}, md
    )
    print(md)


if __name__ == "__main__":
    main()

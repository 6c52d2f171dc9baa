"""Does a per-layer latency model help the structured search? Screening-level check of ``--latency-costs``.

    python -m edgeprune.benchmarks.lab.latency_allocation --pretrained --out benchmarks/results

Runs the structured search (no fine-tuning) with the latency model on, then times every distinct screened
architecture and torch-pruning's uniform model interleaved with dense (1 thread, median of ``--repeats``),
and each architecture alone with dense, and reports, per candidate: both measured speedups, the speedup
the latency model predicts and the one the MAC line (dense and narrowest model, what the search uses
without the model) predicts, MACs and the screening accuracy (BN re-calibrated, screening images). Two
questions: does the model predict latency better than MACs, and are its allocations (``latency-``,
``latency``, ``latency+``) more accurate than the ten strategies' at the same speed? Screening accuracy is
only a proxy for recovered accuracy (see the notes).

Writes ``latency_allocation_<model>.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from edgeprune.benchmarks.lab.common import (
    LATENCY_ORDER,
    Log,
    add_input_arguments,
    load_inputs,
    screened_search,
    search_config,
    this_machine,
    uniform_prune,
)
from edgeprune.benchmarks.machine import command_line, write_results
from edgeprune.benchmarks.runner import median_p50
from edgeprune.export import export_onnx

from edgeprune.evaluation import params_and_macs
from edgeprune.report import versions
from edgeprune.structured.flow import LATENCY_LEVELS
from edgeprune.targets import get_target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_input_arguments(p)
    p.add_argument("--target", default="x86_64-avx512", help="target profile (round_to, opset)")
    p.add_argument("--speedup", type=float, default=1.8, help="the search's goal")
    p.add_argument("--uniform-ratio", type=float, default=0.4, help="torch-pruning's uniform ratio, for reference")
    p.add_argument("--gradient-samples", type=int, default=1024)
    p.add_argument("--runs", type=int, default=300, help="timed runs per model and latency run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved latency runs; the median is reported")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgeprune-latency-allocation-") as tmp:
        result = run(a, argv, Path(tmp))
    label = Path(a.checkpoint).stem if a.checkpoint else a.model
    write_results(Path(a.out), f"latency_allocation_{label}", result, render(result))
    print(render(result))
    return 0


def run(a: argparse.Namespace, argv: list[str] | None, work: Path) -> dict:
    t_start, log, target = time.time(), Log("latency_allocation"), get_target(a.target)
    data, _, _, model = load_inputs(a)
    example, sample = data.eval_x[:1], data.eval_x[:1].numpy().astype(np.float32)
    n = a.gradient_samples
    uniform = uniform_prune(
        model, example, a.uniform_ratio, "magnitude", target.round_to, data.calib_x[:n], data.calib_y[:n]
    )
    export_onnx(uniform, example, work / "uniform.onnx", check_inputs=data.eval_x[:64])
    cfg = search_config(a, a.speedup, work, finetune_epochs=0, latency_costs=True)
    s = screened_search(cfg, target, model, data, work, log)
    shapes: dict[tuple, list] = {}
    for cc in s.cands:
        shapes.setdefault(cc.shape_key, []).append(cc)
    log.start(f"time {len(shapes)} architectures, uniform and dense (1 thread, {a.repeats} runs)")
    dense_path = work / "search" / "dense.onnx"
    archs = [c[0].onnx for c in shapes.values()]
    ms = median_p50([dense_path, work / "uniform.onnx", *archs], sample, 1, a.runs, a.repeats)
    log.finish()
    log.start(f"time each architecture alone against dense (1 thread, {a.repeats} runs)")
    alone = [median_p50([dense_path, arch], sample, 1, a.runs, a.repeats) for arch in archs]
    log.finish()
    lm, line = s.latency_model, s.line
    rows = []
    for ccs, t, (d2, t2) in zip(shapes.values(), ms[2:], alone, strict=True):
        kept = {g.name: ccs[0].widths[g.name] / g.units for g in s.groups}
        macs = ccs[0].candidate.macs
        for cc in ccs:
            rows.append(
                {
                    "name": cc.candidate.name,
                    "latency_model": cc.candidate.strategy in LATENCY_LEVELS,
                    "macs": macs,
                    "screen_accuracy": cc.candidate.accuracy,
                    "speedup": ms[0] / t,
                    "speedup_head_to_head": d2 / t2,
                    "predicted_speedup_model": lm.dense_ms / lm.ms(kept),
                    "predicted_speedup_macs": line.dense_ms / line.ms_for(macs),
                    "widths": [cc.widths[g.name] for g in s.groups],
                }
            )
    rows.sort(key=lambda r: -r["speedup"])

    def mean_abs_error(key: str, measured: str) -> float:
        return float(np.mean([abs(r[key] / r[measured] - 1) for r in rows]))

    return {
        "command": command_line("edgeprune.benchmarks.lab.latency_allocation", argv),
        "model": a.model,
        "data": data.name,
        "screening_images": len(data.eval_x),
        "target": target.name,
        "round_to": s.round_to,
        "goal_speedup": a.speedup,
        "latency_order": LATENCY_ORDER,
        "groups": [f"{g.name} ({g.units})" for g in s.groups],
        "latency_model_scale": lm.scale,
        "dense": {"accuracy": s.dense_acc, "macs": s.macs, "ms_1t": ms[0]},
        "uniform": {"ratio": a.uniform_ratio, "macs": params_and_macs(uniform, example)[1], "speedup": ms[0] / ms[1]},
        "candidates": rows,
        "prediction_error": {
            "latency_model": mean_abs_error("predicted_speedup_model", "speedup"),
            "mac_line": mean_abs_error("predicted_speedup_macs", "speedup"),
            "latency_model_head_to_head": mean_abs_error("predicted_speedup_model", "speedup_head_to_head"),
            "mac_line_head_to_head": mean_abs_error("predicted_speedup_macs", "speedup_head_to_head"),
        },  # fmt: skip
        "machine": this_machine(),
        "versions": versions(),
        "wall_s": round(time.time() - t_start, 1),
    }


def render(r: dict) -> str:
    err = r["prediction_error"]
    lines = [
        f"# Latency model and allocation (screening): {r['model']}",
        "",
        f"Command: `{r['command']}`  ",
        f"Data: {r['data']}, {r['screening_images']} screening images (accuracy after BN re-calibration, no "
        f"fine-tuning). Target `{r['target']}`, round_to {r['round_to']}, search goal {r['goal_speedup']:g}x. "
        f"Latency: onnxruntime p50, batch 1, 1 thread, every architecture, uniform and dense interleaved "
        f"({r['latency_order']}), median of runs. Machine: {r['machine']['cpu']}, {r['machine']['cpu_count']} "
        f"cores; wall {r['wall_s']} s.",
        "",
        f"Dense: {r['dense']['accuracy'] * 100:.2f} % (screening), {r['dense']['macs'] / 1e6:.2f} MMACs, "
        f"{r['dense']['ms_1t']:.4f} ms. torch-pruning uniform {r['uniform']['ratio']:g}: "
        f"{r['uniform']['macs'] / 1e6:.2f} MMACs, {r['uniform']['speedup']:.2f}x (no screening accuracy: "
        "torch-pruning's pruning, not the search's).",
        "",
        "Mean |predicted / measured speedup - 1|, against the all-models run / against each architecture timed "
        f"alone with dense: latency model **{err['latency_model']:.1%} / {err['latency_model_head_to_head']:.1%}**, "
        f"MAC line **{err['mac_line']:.1%} / {err['mac_line_head_to_head']:.1%}** (the model's scale to match "
        f"the narrowest model, 1 = fitted exactly: {r['latency_model_scale']:.2f}). Both predictors are fitted on "
        "pairs timed alone with dense.",
        "",
        "| candidate | MMACs | speedup: all models | speedup: alone vs dense | predicted: model | predicted: MACs "
        "| screening accuracy % | widths |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in r["candidates"]:
        name = f"**{c['name']}**" if c["latency_model"] else c["name"]
        lines.append(
            f"| {name} | {c['macs'] / 1e6:.2f} | {c['speedup']:.2f}x | {c['speedup_head_to_head']:.2f}x "
            f"| {c['predicted_speedup_model']:.2f}x "
            f"| {c['predicted_speedup_macs']:.2f}x | {c['screen_accuracy'] * 100:.2f} | "
            f"{', '.join(map(str, c['widths']))} |"
        )
    lines += ["", "Groups (widths column order): " + ", ".join(r["groups"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

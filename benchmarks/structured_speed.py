"""Structured Mix-and-Match on a ResNet-style Fashion-MNIST model: accuracy drop vs measured ONNX speedup.

    python -m edgeprune.benchmarks.structured_speed --model demo --data fashion-mnist \\
        --out benchmarks/results

What it measures (issue 3's numbers), all on this machine's CPU through onnxruntime, batch 1:

1. ``edgeprune compress --granularity channel --speedup X`` (30 candidates, BN re-calibration, the top
   ``--finetune-top`` fine-tuned for ``--finetune-epochs``): the selected model's accuracy drop and its
   speedup over dense at 1 and 2 threads (re-measured, ``--runs`` interleaved runs each).
2. Measured speedup vs MAC reduction ratio for every distinct candidate architecture (1 thread).
3. torch-pruning's own uniform-ratio pruning (``MetaPruner``, local, same importance as the selected
   candidate's signal, same ``round_to``, classifier outputs kept) at a sweep of ratios; the ones that
   bracket the selected candidate's latency get the same recovery (BN re-calibration + the same
   fine-tuning budget on the same data) and are compared at equal latency.

Writes ``structured_speed_<model>.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from edgeprune.benchmarks.runner import bench
from edgeprune.export import export_onnx
from torch import nn

from edgeprune.data import load_data
from edgeprune.evaluation import accuracy, params_and_macs
from edgeprune.models import load_model
from edgeprune.pipeline import CompressConfig, compress
from edgeprune.recovery import finetune, recalibrate_bn
from edgeprune.report import versions
from edgeprune.structured import accumulate_gradients
from edgeprune.targets import get_target


class ProductImportance:
    """Our ``product`` signal as a torch-pruning importance: magnitude x Taylor, each over its group mean."""

    def __init__(self) -> None:
        self.mag = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
        self.taylor = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        m, g = self.mag(group).clamp_min(0).sqrt(), self.taylor(group)
        return (m / m.mean().clamp_min(1e-12)) * (g / g.mean().clamp_min(1e-12))


def importance_for(signal: str):
    """torch-pruning's criterion equal to our group signal (see edgeprune.structured.signals)."""
    if signal == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
    if signal == "gradient":
        return tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    return ProductImportance()


def uniform_prune(model: nn.Module, example: torch.Tensor, ratio: float, signal: str, round_to: int, data, n_grad: int):
    """torch-pruning's MetaPruner, one ratio for every layer (local ranking), classifier outputs kept."""
    pruned = copy.deepcopy(model).eval()
    if signal != "magnitude":
        accumulate_gradients(pruned, data.calib_x[:n_grad], data.calib_y[:n_grad])
    classifier = pruned.get_classifier()
    pruner = tp.pruner.MetaPruner(
        pruned,
        example,
        importance=importance_for(signal),
        pruning_ratio=ratio,
        global_pruning=False,
        ignored_layers=[classifier],
        round_to=round_to,
    )
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    return pruned.eval()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--calib-size", type=int, default=5000)
    p.add_argument("--eval-size", type=int, default=5000)
    p.add_argument("--target", default="x86_64", help="target profile: round_to (channel multiple)")
    p.add_argument("--speedup", type=float, default=2.0, help="selection: most accurate candidate >= this speedup")
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--finetune-top", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--gradient-samples", type=int, default=1024)
    p.add_argument("--uniform-ratios", default="0.2,0.3,0.4,0.5,0.6,0.7")
    p.add_argument("--runs", type=int, default=300, help="timed runs per artifact in the final latency check")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = get_target(args.target)
    work = Path(tempfile.mkdtemp(prefix="edgeprune-structured-bench-"))
    label = Path(args.checkpoint).stem if args.checkpoint else args.model

    # 1. structured Mix-and-Match through the real pipeline (selection on 1-thread measured latency)
    cfg = CompressConfig(
        model=args.model,
        checkpoint=args.checkpoint,
        data=args.data,
        calib_size=args.calib_size,
        eval_size=args.eval_size,
        target=args.target,
        granularity="channel",
        speedup=args.speedup,
        finetune_epochs=args.finetune_epochs,
        finetune_top=args.finetune_top,
        finetune_lr=args.finetune_lr,
        gradient_samples=args.gradient_samples,
        threads=1,
        bench_runs=100,
        out=str(work / "mm"),
    )
    print(f"[structured_speed] compress --granularity channel --speedup {args.speedup} ...", flush=True)
    report = compress(cfg)
    sel = report.selected
    chosen = next(c for c in report.strategies if c.selected)
    print(f"[structured_speed] selected {sel.name}: accuracy {sel.accuracy:.4f}, drop {sel.accuracy_drop:.2f} pts")

    data = load_data(args.data, calib_size=args.calib_size, eval_size=args.eval_size, seed=cfg.seed)
    model = load_model(args.model, checkpoint=args.checkpoint, num_classes=data.num_classes, in_chans=data.in_chans)
    example = data.eval_x[:1]
    dense_acc = accuracy(model, data.eval_x, data.eval_y)
    _, dense_macs = params_and_macs(model, example)

    # 2. speedup vs MAC ratio for every distinct architecture, from the screening measurements
    archs: dict[tuple[int, float], dict] = {}
    for c in report.strategies:
        archs.setdefault((c.macs, round(c.latency_ms, 6)), {"example": c.name})

    # 3. torch-pruning uniform ratio sweep (same importance signal, same round_to)
    ratios = [float(r) for r in args.uniform_ratios.split(",") if r.strip()]
    uniform = []
    for r in ratios:
        pr = uniform_prune(model, example, r, chosen.signal, target.round_to, data, args.gradient_samples)
        path = work / f"uniform_{r:.2f}.onnx"
        export_onnx(pr, example, path, check_inputs=data.eval_x[:64])
        uniform.append({"ratio": r, "macs": params_and_macs(pr, example)[1], "onnx": str(path), "model": pr})
    mm_onnx = Path(report.artifacts["model.onnx"])
    dense_onnx = Path(report.artifacts["dense.onnx"])
    x1 = example.numpy().astype(np.float32)

    lat: dict[int, list[dict]] = {}
    for threads in (1, 2):
        paths = [str(dense_onnx), str(mm_onnx)] + [u["onnx"] for u in uniform]
        lat[threads] = bench(paths, x1, threads=threads, warmup=20, runs=args.runs)
        print(
            f"[structured_speed] {threads} thread(s): dense {lat[threads][0]['latency_ms']['p50']:.4f} ms, "
            f"selected {lat[threads][1]['latency_ms']['p50']:.4f} ms"
        )
    for i, u in enumerate(uniform):
        u["ms_1t"] = lat[1][2 + i]["latency_ms"]["p50"]
        u["ms_2t"] = lat[2][2 + i]["latency_ms"]["p50"]
    mm_ms_1t = lat[1][1]["latency_ms"]["p50"]

    # recover the uniform models whose latency brackets the selected one (same budget as the pipeline)
    below = [u for u in uniform if u["ms_1t"] <= mm_ms_1t]
    above = [u for u in uniform if u["ms_1t"] > mm_ms_1t]
    bracket = ([max(below, key=lambda u: u["ms_1t"])] if below else []) + (
        [min(above, key=lambda u: u["ms_1t"])] if above else []
    )
    for u in bracket:
        m = u["model"]
        recalibrate_bn(m, data.calib_x, cfg.batch_size)
        u["bn_accuracy"] = accuracy(m, data.eval_x, data.eval_y)
        finetune(
            m,
            {},
            data.calib_x,
            data.calib_y,
            epochs=args.finetune_epochs,
            lr=args.finetune_lr,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        )
        u["accuracy"] = accuracy(m, data.eval_x, data.eval_y)
        print(f"[structured_speed] uniform {u['ratio']:.2f}: {u['ms_1t']:.4f} ms, accuracy {u['accuracy']:.4f}")
    # accuracy of uniform pruning interpolated at the selected candidate's latency
    uniform_at_mm = None
    if len(bracket) == 2:
        a, b = bracket
        w = (mm_ms_1t - a["ms_1t"]) / (b["ms_1t"] - a["ms_1t"])
        uniform_at_mm = a["accuracy"] + w * (b["accuracy"] - a["accuracy"])
    elif bracket:
        uniform_at_mm = bracket[0]["accuracy"]

    dense_1t, dense_2t = lat[1][0]["latency_ms"]["p50"], lat[2][0]["latency_ms"]["p50"]
    mac_ratio = dense_macs / chosen.macs
    speedup_1t, speedup_2t = dense_1t / mm_ms_1t, dense_2t / lat[2][1]["latency_ms"]["p50"]
    candidates = []
    screen_dense_ms = _screen_dense_ms(work / "mm" / "report.md")
    for (macs, ms), a in sorted(archs.items(), key=lambda kv: kv[0][1]):
        candidates.append(
            {
                "example": a["example"],
                "macs": macs,
                "mac_ratio": dense_macs / macs,
                "latency_ms_1t": ms,
                "speedup_1t": screen_dense_ms / ms if screen_dense_ms else None,
                "speedup_over_mac_ratio": (screen_dense_ms / ms) / (dense_macs / macs) if screen_dense_ms else None,
            }
        )
    result = {
        "command": "python -m edgeprune.benchmarks.structured_speed "
        + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "model": args.model,
        "checkpoint": args.checkpoint,
        "weights_sha256_16": sha256(Path(args.checkpoint)) if args.checkpoint else _bundled_sha(args.model),
        "data": data.name,
        "calib_images": len(data.calib_x),
        "eval_images": len(data.eval_x),
        "target": target.name,
        "round_to": target.round_to,
        "recovery": {
            "bn_recalibration": True,
            "finetune_epochs": args.finetune_epochs,
            "finetune_lr": args.finetune_lr,
            "finetune_top": args.finetune_top,
            "optimizer": "Adam, early stopping (patience 3) on 10 % of the calibration images",
        },
        "dense": {"accuracy": dense_acc, "macs": dense_macs, "latency_ms_1t": dense_1t, "latency_ms_2t": dense_2t},
        "selected": {
            "name": sel.name,
            "why": sel.why,
            "accuracy": sel.accuracy,
            "onnx_accuracy": sel.onnx_accuracy,
            "accuracy_drop_points": sel.accuracy_drop,
            "macs": chosen.macs,
            "mac_ratio": mac_ratio,
            "weights_removed": sel.sparsity,
            "parity_max_abs_diff": sel.parity_max_abs_diff,
            "latency_ms_1t": mm_ms_1t,
            "latency_ms_2t": lat[2][1]["latency_ms"]["p50"],
            "speedup_1t": speedup_1t,
            "speedup_2t": speedup_2t,
            "speedup_over_mac_ratio_1t": speedup_1t / mac_ratio,
            "speedup_over_mac_ratio_2t": speedup_2t / mac_ratio,
            "onnx_bytes": sel.onnx_bytes,
            "dense_onnx_bytes": report.dense.onnx_bytes,
        },
        "candidates_by_architecture": candidates,
        "uniform_torch_pruning": [{k: v for k, v in u.items() if k not in ("model", "onnx")} for u in uniform],
        "uniform_accuracy_at_selected_latency": uniform_at_mm,
        "checks": {
            "drop_le_1_point": sel.accuracy_drop <= 1.0,
            "speedup_ge_2_1t": speedup_1t >= 2.0,
            "speedup_ge_2_2t": speedup_2t >= 2.0,
            "speedup_ge_0.8_mac_ratio_1t": speedup_1t >= 0.8 * mac_ratio,
            "beats_uniform_at_equal_latency": uniform_at_mm is not None and sel.accuracy > uniform_at_mm,
        },
        "pipeline_timings_s": report.timings,
        "wall_s": round(time.time() - t_start, 1),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
    }
    stem = f"structured_speed_{label}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(render(result))
    print(render(result))
    return 0


def _screen_dense_ms(report_md: Path) -> float | None:
    """Dense latency measured in the same interleaved run as the candidates (stated in report.md)."""
    try:
        text = report_md.read_text()
    except OSError:
        return None
    marker = "interleaved with dense ("
    if marker not in text:
        return None
    return float(text.split(marker, 1)[1].split(" ms", 1)[0])


def _bundled_sha(model: str) -> str | None:
    from edgeprune.zoo import bundled_weights

    path = bundled_weights("fmnist_resnet" if model == "demo" else model)
    return sha256(path) if path else None


def render(r: dict) -> str:
    d, s = r["dense"], r["selected"]
    ok = lambda b: "yes" if b else "**no**"  # noqa: E731
    lines = [
        f"# Structured Mix-and-Match speed: {r['model']} on {r['data']}",
        "",
        f"Command: `{r['command']}`  ",
        f"Target profile `{r['target']}` (round_to {r['round_to']}); {r['calib_images']} calibration / "
        f"{r['eval_images']} evaluation images; recovery: BN re-calibration + fine-tuning "
        f"{r['recovery']['finetune_epochs']} epochs (lr {r['recovery']['finetune_lr']}) of the top "
        f"{r['recovery']['finetune_top']}. Latency: onnxruntime p50, batch 1, interleaved runs. "
        f"Machine: {r['machine']['cpu_count']} cores, {r['machine']['platform']}; wall {r['wall_s']} s.",
        "",
        "| | accuracy % | MMACs | latency 1 thread ms | latency 2 threads ms | speedup 1t | speedup 2t |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| dense | {d['accuracy'] * 100:.2f} | {d['macs'] / 1e6:.2f} | {d['latency_ms_1t']:.4f} "
        f"| {d['latency_ms_2t']:.4f} | 1.00 | 1.00 |",
        f"| selected `{s['name']}` | {s['accuracy'] * 100:.2f} | {s['macs'] / 1e6:.2f} | {s['latency_ms_1t']:.4f} "
        f"| {s['latency_ms_2t']:.4f} | {s['speedup_1t']:.2f} | {s['speedup_2t']:.2f} |",
        "",
        f"Accuracy drop **{s['accuracy_drop_points']:.2f} points**; MAC reduction {s['mac_ratio']:.2f}x; measured "
        f"speedup / MAC ratio = {s['speedup_over_mac_ratio_1t']:.2f} (1 thread), "
        f"{s['speedup_over_mac_ratio_2t']:.2f} (2 threads); ONNX parity {s['parity_max_abs_diff']:.1e}; "
        f"ONNX {s['onnx_bytes']:,} bytes vs dense {s['dense_onnx_bytes']:,}.",
        "",
        "| check | met |",
        "|---|:-:|",
        *[f"| {k} | {ok(v)} |" for k, v in r["checks"].items()],
        "",
        "## Speedup vs MAC reduction (every distinct candidate architecture, 1 thread, screening run)",
        "",
        "| example candidate | MMACs | MAC ratio | latency ms | speedup | speedup / MAC ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in r["candidates_by_architecture"]:
        sp = c["speedup_1t"]
        lines.append(
            f"| {c['example']} | {c['macs'] / 1e6:.2f} | {c['mac_ratio']:.2f} | {c['latency_ms_1t']:.4f} "
            f"| {'—' if sp is None else f'{sp:.2f}'} | "
            f"{'—' if c['speedup_over_mac_ratio'] is None else format(c['speedup_over_mac_ratio'], '.2f')} |"
        )
    lines += [
        "",
        "## torch-pruning uniform ratio (MetaPruner, local, same importance and round_to)",
        "",
        "| ratio | MMACs | latency 1t ms | latency 2t ms | + BN recal % | + fine-tune % |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for u in r["uniform_torch_pruning"]:
        bn, acc = u.get("bn_accuracy"), u.get("accuracy")
        lines.append(
            f"| {u['ratio']:.2f} | {u['macs'] / 1e6:.2f} | {u['ms_1t']:.4f} | {u['ms_2t']:.4f} "
            f"| {'—' if bn is None else f'{bn * 100:.2f}'} | {'—' if acc is None else f'{acc * 100:.2f}'} |"
        )
    ua = r["uniform_accuracy_at_selected_latency"]
    lines += [
        "",
        f"At the selected candidate's latency ({s['latency_ms_1t']:.4f} ms, 1 thread) uniform pruning reaches "
        f"{'—' if ua is None else f'{ua * 100:.2f} %'} (interpolated between the two bracketing ratios, same "
        f"recovery) vs **{s['accuracy'] * 100:.2f} %** for structured Mix-and-Match.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

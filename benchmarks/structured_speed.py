"""Structured Mix-and-Match on a ResNet-style Fashion-MNIST model: accuracy drop vs measured ONNX speedup.

    python -m edgeprune.benchmarks.structured_speed --model fmnist_resnet18 --pretrained \\
        --round-to 16 --out benchmarks/results

Data (Fashion-MNIST from the Debian package or $EDGEPRUNE_FASHION_MNIST): ``--calib-images`` images of
the *training* split are the calibration set (signals, BN re-calibration, fine-tuning: what a user
holds besides the model); the 10 000 test images are split once (seed 0) into ``--screen-images``
used by the pipeline to screen and select, and the rest, held out, on which every reported accuracy
is measured through onnxruntime from the exported ONNX files.

What it measures (issue 3's numbers), on this machine's CPU, onnxruntime, batch 1, interleaved runs:

1. structured Mix-and-Match (``compress_channels``: 30 candidates, BN re-calibration, top
   ``--finetune-top`` fine-tuned ``--finetune-epochs`` epochs, selection ``--speedup X`` on 1-thread
   measured latency): accuracy drop and speedup over dense at 1 and 2 threads.
2. measured speedup vs MAC reduction ratio, every distinct candidate architecture (screening run).
3. torch-pruning's own uniform ratio pruning (``MetaPruner``, local ranking, the same importance as the
   selected candidate's signal, the same ``round_to``, classifier outputs kept) over a sweep of ratios;
   the two ratios whose 1-thread latency brackets the selected candidate's get the same recovery (BN
   re-calibration + ``--finetune-epochs`` on the same images, same optimizer) and their held-out
   accuracy is interpolated at the selected candidate's latency.

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

from edgeprune.data import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, DataBundle, read_fashion_mnist, uint8_to_normalized
from edgeprune.evaluation import params_and_macs
from edgeprune.models import load_model
from edgeprune.pipeline import CompressConfig, Progress, Timings
from edgeprune.recovery import finetune, recalibrate_bn
from edgeprune.report import versions
from edgeprune.structured import accumulate_gradients, compress_channels
from edgeprune.targets import get_target


class SignalImportance:
    """Our group signal as a torch-pruning importance, computed as in ``edgeprune.structured.signals``
    (magnitude: group L2; gradient: squared group Taylor summed over mini-batches; product: both over
    their group mean), so MetaPruner ranks channels exactly like our candidates do."""

    def __init__(self, signal: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 32):
        self.signal = signal
        self.mag = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
        self.taylor = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None, multivariable=True)
        self.params = list(model.parameters())
        self.grads: list[list[torch.Tensor | None]] = []
        if signal != "magnitude":
            for i in range(0, len(x), batch):
                accumulate_gradients(model, x[i : i + batch], y[i : i + batch], batch)
                self.grads.append([None if p.grad is None else p.grad.clone() for p in self.params])
            model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        m = self.mag(group).clamp_min(0).sqrt()
        if self.signal == "magnitude":
            return m
        g = torch.zeros_like(m)
        for grads in self.grads:
            for p, grad in zip(self.params, grads, strict=True):
                p.grad = grad
            g += self.taylor(group) ** 2
        for p in self.params:
            p.grad = None
        if self.signal == "gradient":
            return g
        return (m / m.mean().clamp_min(1e-12)) * (g / g.mean().clamp_min(1e-12))


def uniform_prune(model: nn.Module, example: torch.Tensor, ratio: float, signal: str, round_to: int, x, y) -> nn.Module:
    """torch-pruning's MetaPruner, one ratio for every layer (local ranking), classifier outputs kept."""
    pruned = copy.deepcopy(model).eval()
    pruner = tp.pruner.MetaPruner(
        pruned,
        example,
        importance=SignalImportance(signal, pruned, x, y),
        pruning_ratio=ratio,
        global_pruning=False,
        ignored_layers=[pruned.get_classifier()],
        round_to=round_to,
    )
    pruner.step()
    return pruned.eval()


def fmnist_split(calib_images: int, screen_images: int, seed: int = 0) -> tuple[DataBundle, np.ndarray, np.ndarray]:
    """Calibration from the training split; the test split cut into a screening part and a held-out part."""
    train_x, train_y = read_fashion_mnist("train")
    test_x, test_y = read_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    ci = rng.permutation(len(train_y))[:calib_images]
    ti = rng.permutation(len(test_y))
    screen, held = ti[:screen_images], ti[screen_images:]
    bundle = DataBundle(
        name=f"fashion-mnist (calibration: {calib_images} train images; screening: {screen_images} test images)",
        calib_x=uint8_to_normalized(train_x[ci]),
        calib_y=torch.from_numpy(train_y[ci].astype(np.int64)),
        eval_x=uint8_to_normalized(test_x[screen]),
        eval_y=torch.from_numpy(test_y[screen].astype(np.int64)),
        num_classes=10,
        in_chans=1,
        image_size=28,
        class_names=list(FMNIST_CLASSES),
        mean=FMNIST_MEAN,
        std=FMNIST_STD,
    )
    held_x = uint8_to_normalized(test_x[held]).numpy().astype(np.float32)
    return bundle, held_x, test_y[held].astype(np.int64)


class Log(Progress):
    def start(self, stage: str, total: int | None = None) -> None:
        self.t0 = time.time()
        print(f"[structured_speed] {stage} ...", flush=True)

    def finish(self) -> None:
        print(f"[structured_speed]   {time.time() - self.t0:.1f} s", flush=True)

    def log(self, message: str) -> None:
        print(f"[structured_speed]   {message}", flush=True)


def onnx_accuracy(paths: list[Path], x: np.ndarray, y: np.ndarray) -> list[float]:
    return [r["accuracy"] for r in bench([str(p) for p in paths], x[:1], threads=2, warmup=1, runs=1, x=x, y=y)]


def latency(paths: list[Path], sample: np.ndarray, threads: int, runs: int) -> list[float]:
    res = bench([str(p) for p in paths], sample, threads=threads, warmup=20, runs=runs)
    return [r["latency_ms"]["p50"] for r in res]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist_resnet18")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--pretrained", action="store_true", help="zoo models: load the bundled weights")
    p.add_argument("--calib-images", type=int, default=10000, help="training-split images for calibration")
    p.add_argument("--screen-images", type=int, default=2000, help="test images for screening and selection")
    p.add_argument("--target", default="x86_64", help="target profile (opset, default round_to)")
    p.add_argument("--round-to", type=int, default=None, help="channel multiple (default: the target's)")
    p.add_argument("--speedup", type=float, default=2.0, help="selection: most accurate candidate >= this speedup")
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--finetune-top", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--gradient-samples", type=int, default=1024)
    p.add_argument("--uniform-ratios", default="0.3,0.4,0.5,0.6,0.7")
    p.add_argument("--runs", type=int, default=300, help="timed runs per artifact in the final latency check")
    p.add_argument("--batch-check", type=int, default=32, help="also time this batch size (throughput view)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgeprune-structured-bench-"))
    target = get_target(args.target)
    round_to = args.round_to or target.round_to
    data, held_x, held_y = fmnist_split(args.calib_images, args.screen_images)
    model = load_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, num_classes=10, in_chans=1)
    example = data.eval_x[:1]
    sample = example.numpy().astype(np.float32)

    # 1. structured Mix-and-Match: the pipeline's own stage, selection on 1-thread measured latency
    cfg = CompressConfig(
        model=args.model,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        target=args.target,
        granularity="channel",
        speedup=args.speedup,
        round_to=args.round_to,
        finetune_epochs=args.finetune_epochs,
        finetune_top=args.finetune_top,
        finetune_lr=args.finetune_lr,
        gradient_samples=args.gradient_samples,
        threads=1,
        bench_runs=100,
        out=str(work),
    )
    staging = work / "mm"
    staging.mkdir()
    timings = Timings()
    report = compress_channels(cfg, target, model, data, staging, Log(), timings)
    sel = report.selected
    chosen = next(c for c in report.strategies if c.selected)
    dense_onnx, mm_onnx = staging / "dense.onnx", staging / "model.onnx"
    screen_dense_ms, line = _screen_facts(staging / "report.md")

    # 2. torch-pruning uniform ratio sweep (same importance signal, same round_to), exported
    uniform = []
    n = args.gradient_samples
    for r in [float(v) for v in args.uniform_ratios.split(",") if v.strip()]:
        print(f"[structured_speed] torch-pruning uniform ratio {r:.2f} ...", flush=True)
        pr = uniform_prune(model, example, r, chosen.signal, round_to, data.calib_x[:n], data.calib_y[:n])
        path = work / f"uniform_{r:.2f}.onnx"
        export_onnx(pr, example, path, check_inputs=data.eval_x[:64])
        uniform.append({"ratio": r, "macs": params_and_macs(pr, example)[1], "onnx": path, "model": pr})

    # 3. latency, batch 1, 1 and 2 threads: dense, selected and every uniform model interleaved
    paths = [dense_onnx, mm_onnx] + [u["onnx"] for u in uniform]
    lat = {th: latency(paths, sample, th, args.runs) for th in (1, 2)}
    for i, u in enumerate(uniform):
        u["ms_1t"], u["ms_2t"] = lat[1][2 + i], lat[2][2 + i]
    mm_1t = lat[1][1]

    # 4. recover the uniform models that bracket the selected latency, with the same budget
    below = [u for u in uniform if u["ms_1t"] <= mm_1t]
    above = [u for u in uniform if u["ms_1t"] > mm_1t]
    bracket = ([max(below, key=lambda u: u["ms_1t"])] if below else []) + (
        [min(above, key=lambda u: u["ms_1t"])] if above else []
    )
    for u in bracket:
        print(
            f"[structured_speed] recover uniform {u['ratio']:.2f} (BN + {args.finetune_epochs} epochs) ...", flush=True
        )
        m = u["model"]
        recalibrate_bn(m, data.calib_x, cfg.batch_size)
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
        u["recovered_onnx"] = work / f"uniform_{u['ratio']:.2f}_recovered.onnx"
        export_onnx(m, example, u["recovered_onnx"], check_inputs=data.eval_x[:64])

    # 5. held-out accuracy, through onnxruntime, of everything shipped
    acc_paths = [dense_onnx, mm_onnx] + [u["recovered_onnx"] for u in bracket]
    accs = onnx_accuracy(acc_paths, held_x, held_y)
    dense_acc, mm_acc = accs[0], accs[1]
    for u, a in zip(bracket, accs[2:], strict=True):
        u["accuracy"] = a
    uniform_at_mm = None
    if len(bracket) == 2:
        a, b = bracket
        w = (mm_1t - a["ms_1t"]) / (b["ms_1t"] - a["ms_1t"])
        uniform_at_mm = a["accuracy"] + w * (b["accuracy"] - a["accuracy"])
    elif bracket:
        uniform_at_mm = bracket[0]["accuracy"]

    # 6. throughput view: a batch of --batch-check images
    big = data.eval_x[: args.batch_check].numpy().astype(np.float32)
    batch_lat = {th: latency([dense_onnx, mm_onnx], big, th, max(20, args.runs // 10)) for th in (1, 2)}

    dense_macs = report.dense.macs
    mac_ratio = dense_macs / chosen.macs
    sp = {th: lat[th][0] / lat[th][1] for th in (1, 2)}
    drop = (dense_acc - mm_acc) * 100
    archs: dict[tuple[int, float], str] = {}
    for c in report.strategies:
        archs.setdefault((c.macs, c.latency_ms), c.name)
    candidates = [
        {
            "example": name,
            "macs": macs,
            "mac_ratio": dense_macs / macs,
            "latency_ms_1t": ms,
            "speedup_1t": screen_dense_ms / ms,
            "speedup_over_mac_ratio": (screen_dense_ms / ms) / (dense_macs / macs),
            "screen_accuracy": max(c.final_accuracy for c in report.strategies if c.macs == macs),
        }
        for (macs, ms), name in sorted(archs.items(), key=lambda kv: kv[0][1])
    ]
    result = {
        "command": "python -m edgeprune.benchmarks.structured_speed "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "model": args.model,
        "weights_sha256_16": _weights_sha(args),
        "data": data.name,
        "held_out_test_images": len(held_y),
        "target": target.name,
        "round_to": round_to,
        "recovery": {
            "bn_recalibration": f"{min(len(data.calib_x), 8 * cfg.batch_size)} calibration images",
            "finetune": f"{args.finetune_epochs} epochs, Adam lr {args.finetune_lr}, batch {cfg.batch_size}, "
            f"early stopping (patience 3) on 10 % of the {len(data.calib_x)} calibration images",
            "finetuned_candidates": args.finetune_top,
        },
        "dense": {
            "accuracy": dense_acc,
            "macs": dense_macs,
            "latency_ms_1t": lat[1][0],
            "latency_ms_2t": lat[2][0],
            f"latency_ms_batch{args.batch_check}_1t": batch_lat[1][0],
            f"latency_ms_batch{args.batch_check}_2t": batch_lat[2][0],
        },
        "selected": {
            "name": sel.name,
            "why": sel.why,
            "accuracy": mm_acc,
            "accuracy_drop_points": drop,
            "screen_accuracy": sel.accuracy,
            "macs": chosen.macs,
            "mac_ratio": mac_ratio,
            "weights_removed": sel.sparsity,
            "parity_max_abs_diff": sel.parity_max_abs_diff,
            "latency_ms_1t": lat[1][1],
            "latency_ms_2t": lat[2][1],
            "speedup_1t": sp[1],
            "speedup_2t": sp[2],
            "speedup_over_mac_ratio_1t": sp[1] / mac_ratio,
            "speedup_over_mac_ratio_2t": sp[2] / mac_ratio,
            f"latency_ms_batch{args.batch_check}_1t": batch_lat[1][1],
            f"latency_ms_batch{args.batch_check}_2t": batch_lat[2][1],
            f"speedup_batch{args.batch_check}_1t": batch_lat[1][0] / batch_lat[1][1],
            f"speedup_batch{args.batch_check}_2t": batch_lat[2][0] / batch_lat[2][1],
            "onnx_bytes": mm_onnx.stat().st_size,
            "dense_onnx_bytes": dense_onnx.stat().st_size,
            "group_widths": [(layer.name, layer.shape, round(1 - layer.sparsity, 4)) for layer in report.layers],
        },
        "latency_floor": line,
        "candidates_by_architecture": candidates,
        "uniform_torch_pruning": [
            {k: (str(v) if isinstance(v, Path) else v) for k, v in u.items() if k not in ("model", "onnx")}
            for u in uniform
        ],
        "uniform_accuracy_at_selected_latency": uniform_at_mm,
        "checks": {
            "drop_le_1_point": drop <= 1.0,
            "speedup_ge_2_1t": sp[1] >= 2.0,
            "speedup_ge_2_2t": sp[2] >= 2.0,
            "speedup_ge_0.8_mac_ratio_1t": sp[1] >= 0.8 * mac_ratio,
            "speedup_ge_0.8_mac_ratio_2t": sp[2] >= 0.8 * mac_ratio,
            "beats_uniform_at_equal_latency": uniform_at_mm is not None and mm_acc > uniform_at_mm,
        },
        "pipeline_timings_s": report.timings,
        "wall_s": round(time.time() - t_start, 1),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "cpu": _cpu()},
        "versions": versions(),
    }
    label = Path(args.checkpoint).stem if args.checkpoint else args.model
    stem = f"structured_speed_{label}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(render(result, args.batch_check))
    print(render(result, args.batch_check))
    return 0


def _screen_facts(report_md: Path) -> tuple[float, dict]:
    """Dense latency of the screening run and the latency floor, as the report states them."""
    text = report_md.read_text()
    dense_ms = float(text.split("interleaved with dense (", 1)[1].split(" ms", 1)[0])
    tail = text.split("every group at the narrowest width the rules allow, ", 1)[1]
    floor_macs = float(tail.split(" MMACs", 1)[0])
    floor_ms = float(tail.split("ran at ", 1)[1].split(" ms", 1)[0])
    probe_dense = float(tail.split("next to dense's ", 1)[1].split(" ms", 1)[0])
    return dense_ms, {"narrowest_mmacs": floor_macs, "narrowest_ms_1t": floor_ms, "dense_ms_1t": probe_dense}


def _weights_sha(args) -> str | None:
    from edgeprune.zoo import bundled_weights

    if args.checkpoint:
        return sha256(Path(args.checkpoint))
    path = bundled_weights(args.model) if args.pretrained else None
    return sha256(path) if path else None


def _cpu() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def render(r: dict, batch: int) -> str:
    d, s = r["dense"], r["selected"]
    ok = {True: "yes", False: "**no**"}
    lines = [
        f"# Structured Mix-and-Match speed: {r['model']} on Fashion-MNIST",
        "",
        f"Command: `{r['command']}`  ",
        f"Data: {r['data']}; accuracies on the {r['held_out_test_images']} held-out test images, through "
        f"onnxruntime. Target `{r['target']}`, round_to {r['round_to']}. Recovery: BN re-calibration "
        f"({r['recovery']['bn_recalibration']}), fine-tuning {r['recovery']['finetune']}, for the top "
        f"{r['recovery']['finetuned_candidates']} candidates. Latency: onnxruntime p50, batch 1, interleaved "
        f"runs. Machine: {r['machine']['cpu']}, {r['machine']['cpu_count']} cores (shared); wall {r['wall_s']} s.",
        "",
        "| | held-out accuracy % | MMACs | ms, 1 thread | ms, 2 threads | speedup 1t | speedup 2t |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| dense | {d['accuracy'] * 100:.2f} | {d['macs'] / 1e6:.2f} | {d['latency_ms_1t']:.4f} "
        f"| {d['latency_ms_2t']:.4f} | 1.00 | 1.00 |",
        f"| selected `{s['name']}` | {s['accuracy'] * 100:.2f} | {s['macs'] / 1e6:.2f} | {s['latency_ms_1t']:.4f} "
        f"| {s['latency_ms_2t']:.4f} | {s['speedup_1t']:.2f} | {s['speedup_2t']:.2f} |",
        "",
        f"Accuracy drop **{s['accuracy_drop_points']:.2f} points**; MAC reduction {s['mac_ratio']:.2f}x; measured "
        f"speedup / MAC ratio = {s['speedup_over_mac_ratio_1t']:.2f} (1 thread), "
        f"{s['speedup_over_mac_ratio_2t']:.2f} (2 threads); ONNX parity {s['parity_max_abs_diff']:.1e}; "
        f"ONNX {s['onnx_bytes']:,} bytes vs dense {s['dense_onnx_bytes']:,}. Batch {batch}: speedup "
        f"{s[f'speedup_batch{batch}_1t']:.2f} (1 thread), {s[f'speedup_batch{batch}_2t']:.2f} (2 threads).",
        "",
        f"Latency floor: the narrowest model the search can build ({r['latency_floor']['narrowest_mmacs']:.2f} "
        "MMACs, every group at the narrowest width the rules allow) ran at "
        f"{r['latency_floor']['narrowest_ms_1t']:.3f} ms next to dense's "
        f"{r['latency_floor']['dense_ms_1t']:.3f} ms (1 thread, probe run).",
        "",
        "| check | met |",
        "|---|:-:|",
        *[f"| {k} | {ok[bool(v)]} |" for k, v in r["checks"].items()],
        "",
        "## Speedup vs MAC reduction (every distinct candidate architecture, 1 thread, screening run)",
        "",
        "| example candidate | MMACs | MAC ratio | latency ms | speedup | speedup / MAC ratio | best screened acc % |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in r["candidates_by_architecture"]:
        lines.append(
            f"| {c['example']} | {c['macs'] / 1e6:.2f} | {c['mac_ratio']:.2f} | {c['latency_ms_1t']:.4f} "
            f"| {c['speedup_1t']:.2f} | {c['speedup_over_mac_ratio']:.2f} | {c['screen_accuracy'] * 100:.2f} |"
        )
    lines += [
        "",
        "## torch-pruning uniform ratio (MetaPruner, local, same importance and round_to)",
        "",
        "| ratio | MMACs | ms, 1 thread | ms, 2 threads | recovered held-out acc % |",
        "|---:|---:|---:|---:|---:|",
    ]
    for u in r["uniform_torch_pruning"]:
        acc = u.get("accuracy")
        lines.append(
            f"| {u['ratio']:.2f} | {u['macs'] / 1e6:.2f} | {u['ms_1t']:.4f} | {u['ms_2t']:.4f} "
            f"| {'—' if acc is None else f'{acc * 100:.2f}'} |"
        )
    ua = r["uniform_accuracy_at_selected_latency"]
    lines += [
        "",
        f"At the selected candidate's latency ({s['latency_ms_1t']:.4f} ms, 1 thread) uniform pruning reaches "
        f"{'—' if ua is None else f'{ua * 100:.2f} %'} (interpolated between the two ratios that bracket it, same "
        f"recovery) vs **{s['accuracy'] * 100:.2f} %** for structured Mix-and-Match.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

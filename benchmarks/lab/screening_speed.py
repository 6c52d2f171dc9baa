"""Screening speed: the product's screening (channels-last eval + the race over selection images + the
collapsed-signal probe) against plain screening (every candidate on every selection image, NCHW), same pick.

    python -m edgeprune.benchmarks.lab.screening_speed --models fmnist_mobilenetv3,fmnist_resnet18

Per model: the pipeline's own candidates (Mix-and-Match, every signal, default sparsity) on real Fashion-MNIST
(`--eval-size` selection images, calibration from the training images), screened three ways in one process,
each from the dense weights:

- ``plain``: each candidate masked, BN re-calibrated, evaluated on every selection image in NCHW;
- ``channels-last``: the same, with `evaluation.accuracy`'s automatic channels-last layout;
- ``product``: `screening.screen_candidates` + `Workspace.screen_raced` as `compress` runs them (the race stops a
  candidate once it provably cannot be recovered or picked; a signal whose first candidates collapse stops).

"Same pick" compares what screening hands on: the most accurate candidate at the target and the top-k the
recover stage takes (k = the default `--finetune-top`), which the race keeps exact by construction.
Results: ``benchmarks/results/screening_speed.{json,md}`` with machine, versions and the command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from edgeprune.benchmarks.lab import RESULTS
from edgeprune.benchmarks.machine import command_line, machine_info, write_results

from edgeprune.evaluation import accuracy, weight_sparsity
from edgeprune.halving import Top
from edgeprune.masking import build_masks
from edgeprune.pipeline import SCREEN_PROBE, CompressConfig, ScreeningBar, Workspace, load_workspace_inputs
from edgeprune.recover import recovery_schedule
from edgeprune.recovery import recalibrate_bn
from edgeprune.screening import image_rungs, screen_candidates

VARIANTS = ("plain", "channels-last", "product")


def _plain(ws: Workspace, cplans: list, channels_last: bool) -> list[tuple[float, float]]:
    """(sparsity, BN-re-calibrated selection accuracy) of every candidate, every image."""
    d, bs = ws.data, ws.cfg.batch_size
    out = []
    for cp in cplans:
        ws.materialize(cp, recalibrate=False, masks=build_masks(cp.scores, cp.plan))
        sparsity = weight_sparsity(ws.model, ws.prunable)[0].sparsity
        accuracy(ws.model, d.eval_x, d.eval_y, bs, channels_last=channels_last)  # zero-shot, as screening does
        if ws.use_bn:
            recalibrate_bn(ws.model, d.calib_x, bs)
        out.append((sparsity, accuracy(ws.model, d.eval_x, d.eval_y, bs, channels_last=channels_last)))
    return out


def _product(ws: Workspace, cplans: list, dense_acc: float) -> list[tuple[float, float | None]]:
    """As `compress` screens: (sparsity, accuracy) of each candidate, accuracy None when the race or the probe
    stopped it (it can be neither recovered nor picked)."""
    cfg, d = ws.cfg, ws.data
    bar = ScreeningBar.for_run(cfg, dense_acc, recovery_schedule(cfg))
    rungs = image_rungs(len(d.eval_x))
    cands = [cp.candidate for cp in cplans]
    kept, _ = screen_candidates(
        cands,
        masks_of=lambda i: build_masks(cplans[i].scores, cplans[i].plan),
        evaluate=lambda i, masks: bar.add(ws.screen_raced(cplans[i], masks, rungs, bar.value)),
        num_classes=d.num_classes,
        dense_accuracy=dense_acc,
        probe=SCREEN_PROBE,
    )
    kept_set = set(kept)
    return [
        (c.sparsity, c.accuracy if i in kept_set and c.screened_images is None else None) for i, c in enumerate(cands)
    ]


def handed_on(scores: list[tuple[float, float | None]], target: float, k: int) -> tuple[int, list[int]]:
    """(the pick: most accurate at the target, the top-k at the target by accuracy) among completed ones."""
    at = [i for i, (s, a) in enumerate(scores) if a is not None and s >= target - 1e-6]
    ranked = sorted(at, key=lambda i: (-scores[i][1], i))
    return ranked[0], sorted(ranked[:k])


def run_model(name: str, eval_size: int, calib_size: int) -> dict:
    cfg = CompressConfig(model=name, data="fashion-mnist", eval_size=eval_size, calib_size=calib_size, test_size=16)
    torch.manual_seed(cfg.seed)
    model, data = load_workspace_inputs(cfg)
    ws = Workspace(cfg, model, data, with_hessian=True)
    cplans = ws.plans(cfg.method, cfg.sparsity, ws.ranges(cfg.sparsity, cfg.method))
    ws.model.load_state_dict(ws.original)
    dense_acc = accuracy(ws.model, data.eval_x, data.eval_y, cfg.batch_size)
    schedule = recovery_schedule(cfg)
    k = schedule.k if isinstance(schedule, Top) else 1
    row: dict = {"model": name, "candidates": len(cplans), "eval_images": len(data.eval_x), "top_k": k}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        if variant == "product":
            scores = _product(ws, cplans, dense_acc)
        else:
            scores = _plain(ws, cplans, channels_last=variant == "channels-last")
        wall = time.perf_counter() - t0
        pick, top = handed_on(scores, cfg.sparsity, k)
        row[variant] = {
            "wall_s": round(wall, 2),
            "evaluated_fully": sum(a is not None for _, a in scores),
            "pick": cplans[pick].candidate.name,
            "top_k": [cplans[i].candidate.name for i in top],
        }
        print(f"{name:20s} {variant:14s} {wall:7.1f}s pick {row[variant]['pick']}", flush=True)
    plain = row["plain"]
    for variant in VARIANTS[1:]:
        v = row[variant]
        v["speedup"] = round(plain["wall_s"] / max(v["wall_s"], 1e-9), 2)
        v["same_pick"] = v["pick"] == plain["pick"] and v["top_k"] == plain["top_k"]
    return row


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        "# Screening speed: product screening vs plain (every candidate, every image, NCHW)",
        "",
        f"`{info['command']}` on {info['cpu']} ({info['cores']} cores), {info['utc']}, load "
        f"{info.get('load_average_1m', 0) or 0:.2f} at the start; torch {info['versions'].get('torch', '?')}.",
        "",
        "| model | candidates | selection images | variant | screening s | speed-up | fully evaluated | pick | "
        "same pick and top-k |",
        "|---|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        for variant in VARIANTS:
            v = r[variant]
            speed = f"{v['speedup']:.2f}x" if "speedup" in v else ""
            same = "" if "same_pick" not in v else ("yes" if v["same_pick"] else "**no**")
            lines.append(
                f"| {r['model']} | {r['candidates']} | {r['eval_images']} | {variant} | {v['wall_s']} | {speed} "
                f"| {v['evaluated_fully']} | {v['pick']} | {same} |"
            )
    lines += [
        "",
        "Top-k: the candidates the default recover stage (`--recover top`) takes by screening accuracy. A "
        "candidate the race stops is one that can be neither among them nor the pick, so product and plain hand "
        "on the same ones by construction; the column checks it.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fmnist_mobilenetv3,fmnist_resnet18")
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--calib-size", type=int, default=1000)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--stem", default="screening_speed")
    a = p.parse_args(argv)
    info = machine_info()
    info["command"] = command_line("edgeprune.benchmarks.lab.screening_speed", argv)
    rows = [run_model(m.strip(), a.eval_size, a.calib_size) for m in a.models.split(",") if m.strip()]
    write_results(a.out, a.stem, {"machine": info, "rows": rows}, markdown(rows, info))
    return 0 if all(r[v]["same_pick"] for r in rows for v in VARIANTS[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())

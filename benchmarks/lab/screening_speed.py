"""Screening speed: the product's screening (a glance at every candidate, then the race over selection images,
the collapsed-signal probe) against plain screening (every candidate on every selection image), same pick.

    python -m edgeprune.benchmarks.lab.screening_speed --models fmnist_mobilenetv3,fmnist_resnet18

Per model: the pipeline's own candidates (Mix-and-Match, every signal, default sparsity) from the bundled
trained weights, on real Fashion-MNIST (`--eval-size` selection images, calibration from the training images),
screened two ways in one process (the ratio is what matters on a shared machine), each from the dense weights:

- ``plain``: each candidate masked, zero-shot evaluated, BN re-calibrated on every calibration image,
  evaluated on every selection image (`Workspace.screen`, as screening ran before the race);
- ``product``: `screening.screen_candidates` with `Workspace.glance`, then `Workspace.screen_raced`, as
  `compress` runs them: a quick BN re-calibration (64 images) and 256 images for every candidate; one the
  glance puts below the bar by `screening.Z_STOP` standard errors (paired against the bar-holder) stops
  there ("glance"); the others get the full re-calibration and the race: at each rung before the last, the
  same paired test on the images seen so far ("rung") and the exact bound ("bound").

"Same pick" compares what screening hands on: the most accurate candidate at the target and the top-k the
recover stage takes (k = the default `--finetune-top`). The bound stop keeps them exact by construction;
the glance and rung stops are 3-sigma tests, so the column is the check.
Results: ``benchmarks/results/screening_speed.{json,md}`` with machine, versions and the command.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from edgeprune.benchmarks.lab import RESULTS
from edgeprune.benchmarks.machine import command_line, machine_info, write_results

from edgeprune.evaluation import accuracy
from edgeprune.halving import Top
from edgeprune.pipeline import SCREEN_PROBE, CompressConfig, ScreeningBar, Workspace, load_workspace_inputs
from edgeprune.recover import recovery_schedule

STOPS = ("glance", "rung", "bound", "probe", "duplicates")  # the table's columns, in this order
VARIANTS = ("product", "plain")  # the product first: a failure in it shows before the long plain arm


def _plain(ws: Workspace, cplans: list) -> list[tuple[float, float | None]]:
    """(sparsity, BN-re-calibrated selection accuracy) of every candidate, every image."""
    return [(c.sparsity, c.accuracy) for c in (ws.screen(cp) for cp in cplans)]


def _product(ws: Workspace, cplans: list, dense_acc: float) -> tuple[list[tuple[float, float | None]], dict]:
    """As `compress` screens (`Workspace.screen_all`): (sparsity, accuracy) of each candidate, accuracy None
    when the glance, a rung, the bound or the probe stopped it (it is neither recovered nor picked); and how
    many each rule stopped."""
    cfg = ws.cfg
    cands = [cp.candidate for cp in cplans]
    bar = ScreeningBar.for_run(cfg, dense_acc, recovery_schedule(cfg))
    kept, summary = ws.screen_all(cplans, dense_acc, bar, SCREEN_PROBE)
    stops = dict.fromkeys(STOPS, 0) | {"probe": len(summary.skipped), "duplicates": len(summary.duplicates)}
    for rule in summary.stopped.values():
        stops[rule] += 1
    kept_set = set(kept)
    scores = [
        (c.sparsity, c.accuracy if i in kept_set and c.screened_images is None else None) for i, c in enumerate(cands)
    ]
    return scores, stops


def handed_on(scores: list[tuple[float, float | None]], target: float, k: int) -> tuple[int, list[int]]:
    """(the pick: most accurate at the target, the top-k at the target by accuracy) among completed ones."""
    at = [i for i, (s, a) in enumerate(scores) if a is not None and s >= target - 1e-6]
    ranked = sorted(at, key=lambda i: (-scores[i][1], i))
    return ranked[0], sorted(ranked[:k])


def run_model(name: str, eval_size: int, calib_size: int) -> dict:
    cfg = CompressConfig(
        model=name, pretrained=True, data="fashion-mnist", eval_size=eval_size, calib_size=calib_size, test_size=16
    )
    torch.manual_seed(cfg.seed)
    model, data = load_workspace_inputs(cfg)
    ws = Workspace(cfg, model, data, with_hessian=True)
    cplans = ws.plans(cfg.method, cfg.sparsity, ws.ranges(cfg.sparsity, cfg.method))
    ws.model.load_state_dict(ws.original)
    dense_acc = accuracy(ws.model, data.eval_x, data.eval_y, cfg.batch_size)
    schedule = recovery_schedule(cfg)
    k = schedule.k if isinstance(schedule, Top) else 1
    row: dict = {
        "model": name,
        "dense_accuracy": dense_acc,
        "candidates": len(cplans),
        "eval_images": len(data.eval_x),
        "calib_images": len(data.calib_x),
        "top_k": k,
    }
    for variant in VARIANTS:
        t0 = time.perf_counter()
        load = os.getloadavg()[0]
        stops = None
        if variant == "product":
            scores, stops = _product(ws, cplans, dense_acc)
        else:
            scores = _plain(ws, cplans)
        wall = time.perf_counter() - t0
        pick, top = handed_on(scores, cfg.sparsity, k)
        row[variant] = {
            "wall_s": round(wall, 2),
            "load_1m_start": round(load, 2),
            "load_1m_end": round(os.getloadavg()[0], 2),
            "evaluated_fully": sum(a is not None for _, a in scores),
            "pick": cplans[pick].candidate.name,
            "top_k": [cplans[i].candidate.name for i in top],
            "accuracies": {cplans[i].candidate.name: a for i, (_, a) in enumerate(scores) if a is not None},
        }
        if stops is not None:
            row[variant]["stopped"] = stops
        print(f"{name:20s} {variant:8s} {wall:7.1f}s pick {row[variant]['pick']} {stops or ''}", flush=True)
    plain, product = row["plain"], row["product"]
    product["speedup"] = round(plain["wall_s"] / max(product["wall_s"], 1e-9), 2)
    product["same_pick"] = product["pick"] == plain["pick"] and product["top_k"] == plain["top_k"]
    # every completed candidate's accuracy is the plain one: the glance decides who runs, never what they score
    product["exact_where_complete"] = all(plain["accuracies"][n] == a for n, a in product["accuracies"].items())
    return row


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        "# Screening speed: product screening vs plain (every candidate, every image)",
        "",
        f"`{info['command']}` on {info['cpu']} ({info['cores']} cores), {info['utc']}; torch "
        f"{info['versions'].get('torch', '?')}. Both arms in one process, one after the other, on a machine "
        "shared with other jobs: the 1-minute load average at each arm's start and end is in the table, and the "
        "speed-up (plain / product wall time) is the figure to read.",
        "",
        "| model | dense % | candidates | variant | screening s | load | speed-up | fully evaluated "
        "| stopped: glance / rung / bound / probe / shared | pick | same pick and top-k | exact where complete |",
        "|---|---:|---:|---|---:|---|---:|---:|---|---|---|---|",
    ]
    for r in rows:
        for variant in ("plain", "product"):
            v = r[variant]
            speed = f"{v['speedup']:.2f}x" if "speedup" in v else ""
            same = "" if "same_pick" not in v else ("yes" if v["same_pick"] else "**no**")
            exact = "" if "exact_where_complete" not in v else ("yes" if v["exact_where_complete"] else "**no**")
            st = v.get("stopped")
            stopped = " / ".join(str(st.get(k, 0)) for k in STOPS) if st else ""
            lines.append(
                f"| {r['model']} | {100 * r['dense_accuracy']:.2f} | {r['candidates']} | {variant} | {v['wall_s']} "
                f"| {v['load_1m_start']:.1f}-{v['load_1m_end']:.1f} | {speed} | {v['evaluated_fully']} | {stopped} "
                f"| {v['pick']} | {same} | {exact} |"
            )
    lines += [
        "",
        f"Selection split: {rows[0]['eval_images']} images; calibration: {rows[0]['calib_images']} images (BN "
        "re-calibration uses up to 1024). Top-k: the candidates the default recover stage (`--recover top`) takes "
        "by screening accuracy. Stopped: glance (the glance, 64-image BN re-calibration and 256 images, below "
        "the bar-holder's glance by more than 3 McNemar standard errors, and below the bar), rung (after the full "
        "re-calibration, the same test on the images seen so far at 256 or 512 images, against the bar-holder's "
        "answers on them), bound (every unseen image right would not reach the bar), probe (a signal whose first 3 "
        "candidates collapsed), shared (identical masks, screened once). Exact where complete: every candidate "
        "the product evaluates to the end scores exactly its plain accuracy.",
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
    rows: list[dict] = []
    for m in (m.strip() for m in a.models.split(",")):
        if m:
            rows.append(run_model(m, a.eval_size, a.calib_size))
            write_results(a.out, a.stem, {"machine": info, "rows": rows}, markdown(rows, info))  # each model kept
    return 0 if all(r["product"]["same_pick"] and r["product"]["exact_where_complete"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

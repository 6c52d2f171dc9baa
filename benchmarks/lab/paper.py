"""The paper's comparison on Fashion-MNIST: Mix-and-Match vs single-criterion pruning at matched sparsity.

    python -m edgeprune.benchmarks.lab.paper --out benchmarks/results            # the full run (five models)
    python -m edgeprune.benchmarks.lab.paper --quick --out /tmp/paper-quick      # smoke test (one small model)

For every reference model (``edgeprune/zoo.py``; trained weights bundled in ``edgeprune/assets/<name>.pt``,
trained by ``scripts/train_reference.py``, which this benchmark runs when a file is missing) and every
sparsity level:

1. **Mix-and-Match**: Phase 1 ranges, then the candidates of `edgeprune.pipeline.Workspace.plans` (per
   signal the strategies scaled to the level and the unscaled ones sparser than it, plus every range
   baseline's plan ranked by each signal and by its own scores; how many depends on the model and level,
   ``paper.json`` lists them), each masked and screened (zero-shot accuracy, then after BatchNorm
   re-calibration), all through `edgeprune.pipeline.Workspace`.
   One candidate is selected by compress's rule restricted to the matching window: the most accurate
   (after re-calibration) with sparsity in [level, level + 0.5 %]. When none lands in the window, the most
   accurate with sparsity >= level is taken (the sparsest when none reaches the level) and every baseline
   is run at *that* candidate's measured sparsity instead of the level, so the comparison stays matched.
2. **Baselines** MAG, SNIP, GraSP, LAMP (global thresholds) and ERK, uniform (layer-wise allocators) at the
   matched sparsity, screened the same way.
3. **Equal fine-tuning budget**: the selected Mix-and-Match candidate and every baseline are fine-tuned for
   the same ``--finetune-epochs`` on the same data (the calibration split, 10 % of it held out for early
   stopping), with their masks enforced: one `recover.recover` of all of a level's methods (one rung, the
   same epochs for each) on ``--cluster``'s executor (in this process by default; ``local:N``,
   ``ray://HOST:PORT``, ``HOST:PORT``, ``auto`` fan the recoveries out over Ray, with a GPU four to a card;
   the same numbers for the same seed and ``--threads``, which is also each recovery's torch threads).
4. **FP32 and INT8**: each pruned model, before and after fine-tuning, is exported to a verified ONNX graph
   and quantized to INT8 (static QDQ, per-channel, calibrated on 256 calibration images); both are scored
   by onnxruntime on the evaluation split. FP32 numbers are PyTorch's (the export checks parity).

Drops are in accuracy points against the dense FP32 model on the same evaluation split; the degradation
reduction of Mix-and-Match vs a baseline is ``1 - drop_mm / drop_baseline`` (undefined when the baseline
loses nothing).

Writes into ``--out``: ``paper.json`` (every model, level and method: ``sparsity``, ``fp32``, ``int8``,
``drop``, ``finetuned``), ``paper.md`` (tables, command, machine, versions, seeds, wall time) and
``paper_<model>.png`` (accuracy vs sparsity per model). Results are rewritten after every model, so an
interrupted run keeps the models that finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgeprune.benchmarks.lab.common import recovery_shared
from edgeprune.benchmarks.machine import command_line, cpu_model
from edgeprune.export import export_onnx
from edgeprune.export.quantize import onnx_accuracy, quantize_int8
from timm.layers.activations import HardSigmoid, HardSwish
from torch import nn

from edgeprune.cluster import Executor, InProcess, check_cluster_spec, executor_for
from edgeprune.errors import EdgepruneError
from edgeprune.halving import Top
from edgeprune.masking import build_masks
from edgeprune.pipeline import CandidatePlan, CompressConfig, Workspace, load_workspace_inputs
from edgeprune.recover import Job, MaskBuild, recover
from edgeprune.report import versions
from edgeprune.selection import Point, select_index
from edgeprune.zoo import bundled_weights

SCHEMA = "edgeprune.paper/1"
# Ordered by measured CPU time (eager PyTorch), not by MACs: MobileNetV3's depthwise convs ran ~7x slower per
# image than the ResNet-18 here, so it goes last and an interrupted run keeps the most models.
MODELS: tuple[str, ...] = ("fmnist_vgg", "fmnist_resnet18", "fmnist_vit", "fmnist_swin", "fmnist_mobilenetv3")
BASELINE_METHODS: tuple[str, ...] = ("mag", "snip", "grasp", "lamp", "erk", "uniform")
LEVELS: tuple[float, ...] = (0.8, 0.9, 0.95)
WINDOW = 0.005  # matched sparsity: the selected candidate lies in [level, level + WINDOW]
MM = "mix-and-match"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Settings:
    models: tuple[str, ...] = MODELS
    levels: tuple[float, ...] = LEVELS
    baselines: tuple[str, ...] = BASELINE_METHODS
    signals: tuple[str, ...] = ("magnitude", "gradient", "product")
    data: str = "fashion-mnist"
    calib_size: int = 2000
    eval_size: int = 2000
    gradient_samples: int = 512
    finetune_epochs: int = 2
    finetune_lr: float = 1e-4
    int8_calibration: int = 256
    threads: int = 2
    seed: int = 0
    out: str = "benchmarks/results"
    quick: bool = False
    resume: bool = False
    int8: bool = True
    merge: tuple[str, ...] = ()  # paper.json files to merge instead of running
    cluster: str | None = None  # where the fine-tuning runs (--cluster); not a setting of the numbers


@dataclass
class Row:
    """One method at one level, zero-shot (after BN re-calibration) or fine-tuned."""

    model: str
    level: float
    method: str
    finetuned: bool
    sparsity: float  # measured: zeros / prunable weights
    fp32: float  # accuracy on the evaluation split (PyTorch)
    int8: float | None  # accuracy of the INT8 ONNX graph (onnxruntime)
    drop: float  # dense FP32 - fp32, points
    int8_drop: float | None  # dense FP32 - int8, points
    candidate: str  # Mix-and-Match's signal/strategy, or the baseline's name
    target_sparsity: float  # what the baselines were asked for
    zero_shot_raw: float | None = None  # before BN re-calibration (zero-shot rows only)
    finetune_epochs: int = 0


@dataclass
class LevelResult:
    level: float
    target_sparsity: float
    matched: bool  # the selected candidate lies in [level, level + WINDOW]
    selection: str  # how the Mix-and-Match candidate was chosen
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every screened candidate (Workspace.plans)
    rows: list[Row] = field(default_factory=list)
    reduction: dict[str, dict[str, float | None]] = field(default_factory=dict)  # baseline -> {zero_shot, finetuned}


@dataclass
class ModelResult:
    model: str
    checkpoint: str
    dense_fp32: float
    dense_int8: float | None
    params: int
    activation_swaps: int  # Hardsigmoid/Hardswish replaced for GraSP's double backward (same values)
    levels: list[LevelResult]
    timings: dict[str, float]
    wall_s: float
    threads: int = 0  # torch threads of the run
    complete: bool = True  # False while levels are missing (an interrupted run)
    command: str = ""  # the command that produced this model's numbers (results of several runs are merged)
    finished: str = ""
    machine: dict[str, Any] = field(default_factory=dict)  # where this model ran (runs may be merged)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_checkpoint(name: str) -> Path:
    """The bundled weights of ``name``; trained by the committed script when missing (a separate, cached step)."""
    path = bundled_weights(name)
    if path is not None:
        return path
    log(f"{name}: no bundled weights, training them with scripts/train_reference.py (slow on a CPU)")
    script = REPO_ROOT / "scripts" / "train_reference.py"
    if not script.is_file():
        raise EdgepruneError(f"no weights for {name} and no {script}; run from a repository checkout")
    out = REPO_ROOT / "edgeprune" / "assets"
    subprocess.run([sys.executable, str(script), "--models", name, "--out", str(out)], check=True)
    path = bundled_weights(name)
    if path is None:
        raise EdgepruneError(f"training {name} did not produce {out / (name + '.pt')}")
    return path


class Evaluator:
    """FP32 export + INT8 quantization of the workspace's current model, scored by onnxruntime."""

    def __init__(self, ws: Workspace, s: Settings, tmp: Path):
        self.ws, self.s, self.tmp = ws, s, tmp
        d = ws.data
        self.example, self.check = d.eval_x[:1], d.eval_x[:64]
        self.calib = d.calib_x[: s.int8_calibration].numpy()
        self.x, self.y = d.eval_x.numpy(), d.eval_y.numpy()
        self.n = 0

    def int8_accuracy(self) -> float | None:
        if not self.s.int8:
            return None
        self.n += 1
        fp32 = self.tmp / f"m{self.n}.onnx"
        int8 = self.tmp / f"m{self.n}.int8.onnx"
        try:
            export_onnx(self.ws.model, self.example, fp32, check_inputs=self.check)
            quantize_int8(fp32, int8, self.calib, check_inputs=self.check)
            return onnx_accuracy(int8, self.x, self.y, threads=self.s.threads)
        except EdgepruneError as exc:  # reported, not fatal: the FP32 numbers still stand
            log(f"  INT8 failed: {exc}")
            return None
        finally:
            for p in (fp32, int8):
                p.unlink(missing_ok=True)


def plans(ws: Workspace, method: str, sparsity: float) -> list[CandidatePlan]:
    """`Workspace.plans` on the dense weights.

    Scores and ranges are computed from the model's live weights, which screening and fine-tuning overwrite:
    without the reload a baseline planned after another candidate ranks the previous mask's zeros first
    (SNIP then reproduced MAG's plan exactly).
    """
    ws.model.load_state_dict(ws.original)
    return ws.plans(method, sparsity)


def pick_candidate(cands: list, level: float) -> tuple[int, bool, str]:
    """Compress's rule inside the matching window; outside it, compress's rule as is."""
    window = [i for i, c in enumerate(cands) if level - 1e-6 <= c.sparsity <= level + WINDOW + 1e-9]
    if window:
        i = max(window, key=lambda j: (cands[j].accuracy, cands[j].sparsity))
        span = f"[{level:.1%}, {level + WINDOW:.1%}]"
        return i, True, f"most accurate of {len(window)} candidate(s) with sparsity in {span}"
    i, why = select_index([Point(c.accuracy, c.sparsity) for c in cands], sparsity=level)
    return i, False, f"no candidate in [{level:.1%}, {level + WINDOW:.1%}]: {why}; baselines run at its sparsity"


def run_level(
    ws: Workspace,
    ev: Evaluator,
    s: Settings,
    name: str,
    level: float,
    dense: float,
    t: dict,
    earlier: list[LevelResult] | None = None,
    executor: Executor | None = None,
) -> LevelResult:
    """One level; ``earlier`` levels of the same model whose comparison this one repeats are reused (below).
    The fine-tuning runs on ``executor`` (default: this process)."""
    executor = executor or InProcess()

    def timed(stage: str, t0: float) -> None:
        t[stage] = t.get(stage, 0.0) + time.perf_counter() - t0

    def zero_shot_row(method: str, cp: CandidatePlan, target: float) -> Row:
        c = cp.candidate
        t0 = time.perf_counter()
        int8 = ev.int8_accuracy()  # the workspace holds the screened (re-calibrated) model
        timed("int8", t0)
        return Row(
            name, level, method, False, c.sparsity, c.accuracy, int8, (dense - c.accuracy) * 100,
            None if int8 is None else (dense - int8) * 100, c.name, target, zero_shot_raw=c.zero_shot_accuracy,
        )  # fmt: skip

    def finetuned_rows(methods: list[str], cps: list[CandidatePlan], target: float) -> list[Row]:
        """Every method's candidate fine-tuned by one `recover` on the executor (same epochs for each), then
        loaded into the workspace and scored (FP32 on the evaluation split, INT8)."""
        t0 = time.perf_counter()
        out = finetune_all(ws, s, cps, methods, executor)
        timed("finetune", t0)
        rows = []
        for method, cp, state in zip(methods, cps, out, strict=True):
            ws.model.load_state_dict(state)
            acc = cp.candidate.finetuned_accuracy = ws.accuracy()
            t0 = time.perf_counter()
            int8 = ev.int8_accuracy()
            timed("int8", t0)
            rows.append(Row(
                name, level, method, True, cp.candidate.sparsity, acc, int8, (dense - acc) * 100,
                None if int8 is None else (dense - int8) * 100, cp.candidate.name, target,
                finetune_epochs=s.finetune_epochs,
            ))  # fmt: skip
        return rows

    t0 = time.perf_counter()
    cps = plans(ws, MM, level)
    for cp in cps:
        ws.screen(cp)
    timed("screen_mm", t0)
    cands = [cp.candidate for cp in cps]
    i, matched, why = pick_candidate(cands, level)
    chosen = cps[i]
    target = level if matched else chosen.candidate.sparsity
    log(
        f"  {level:.0%}: M&M {chosen.candidate.name} at {chosen.candidate.sparsity:.2%} "
        f"recal {chosen.candidate.accuracy:.2%} ({why})"
    )
    res = LevelResult(level, target, matched, why)
    res.candidates = [
        {
            "name": c.name,
            "signal": c.signal,
            "strategy": c.strategy,
            "sparsity": c.sparsity,
            "zero_shot_raw": c.zero_shot_accuracy,
            "fp32": c.accuracy,
            "selected": j == i,
        }
        for j, c in enumerate(cands)
    ]
    # When no candidate reaches this level or an earlier one, both compare the same sparsest candidate with the
    # baselines at the same sparsity: the rows are the same runs, so they are reused rather than recomputed.
    same = next((lv for lv in earlier or [] if not matched and not lv.matched and lv.target_sparsity == target), None)
    if same is not None and next(c["name"] for c in same.candidates if c["selected"]) == chosen.candidate.name:
        res.selection += f"; the same candidate and sparsity as at {same.level:.0%}, whose rows are reused"
        res.rows = [replace(r, level=level) for r in same.rows]
        res.reduction = {k: dict(v) for k, v in same.reduction.items()}
        log(f"  {level:.0%}: same comparison as at {same.level:.0%}; rows reused")
        return res
    ws.materialize(chosen)
    methods, chosen_plans, zero_shot = [MM], [chosen], [zero_shot_row(MM, chosen, target)]
    for method in s.baselines:
        cp = plans(ws, method, target)[0]
        t0 = time.perf_counter()
        ws.screen(cp)
        timed("screen_baselines", t0)
        methods.append(method)
        chosen_plans.append(cp)
        zero_shot.append(zero_shot_row(method, cp, target))
    for zs, ft in zip(zero_shot, finetuned_rows(methods, chosen_plans, target), strict=True):
        res.rows += [zs, ft]
        log(f"  {level:.0%}: {zs.method:8s} {zs.sparsity:.2%} zero-shot {zs.fp32:.2%} fine-tuned {ft.fp32:.2%}")
    mm = {r.finetuned: r for r in res.rows if r.method == MM}
    for method in s.baselines:
        b = {r.finetuned: r for r in res.rows if r.method == method}
        res.reduction[method] = {
            key: reduction(mm[ft].drop, b[ft].drop) for key, ft in (("zero_shot", False), ("finetuned", True))
        }
    return res


def finetune_all(
    ws: Workspace, s: Settings, cps: list[CandidatePlan], keys: list[str], executor: Executor
) -> list[dict[str, torch.Tensor]]:
    """The fine-tuned weights of each candidate (masks enforced, folded in), in order: one rung of
    ``s.finetune_epochs`` for all of them through `recover.recover` on ``executor``; early stopping on 10 %
    of the calibration split (`common.recovery_shared`), the evaluation split kept out of it."""
    cfg = ws.cfg
    shared = recovery_shared(
        ws.model, ws.data.calib_x, ws.data.calib_y, ws.recipe, ws.teacher(), lr=cfg.finetune_lr,
        batch_size=cfg.batch_size, seed=cfg.seed, threads=s.threads, device=cfg.device, bn_recal=ws.use_bn,
    )  # fmt: skip
    shared.dense.load_state_dict(ws.original)  # ws.model holds the last screened candidate's masks
    jobs = [Job(key, MaskBuild(build_masks(cp.scores, cp.plan))) for key, cp in zip(keys, cps, strict=True)]
    outcomes = recover(jobs, shared, Top(k=len(jobs), epochs=s.finetune_epochs), executor)
    return [o.state for o in outcomes]


def reduction(drop_mm: float, drop_base: float) -> float | None:
    """1 - drop_mm / drop_baseline; None when the baseline loses nothing (no degradation to reduce)."""
    return None if drop_base <= 1e-9 else 1.0 - drop_mm / drop_base


def twice_differentiable(model: nn.Module) -> int:
    """Swap torch's Hardsigmoid/Hardswish for timm's same-valued Python versions; returns how many were swapped.

    GraSP's Hessian-gradient product needs a double backward, which torch does not implement for
    ``hardsigmoid_backward`` (MobileNetV3's SE gates and activations); timm's ``relu6(x + 3) / 6`` forms compute
    the same values and have one.
    """
    swaps = {nn.Hardsigmoid: HardSigmoid, nn.Hardswish: HardSwish}
    n = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            new = swaps.get(type(child))
            if new is not None:
                setattr(parent, child_name, new())
                n += 1
    return n


def run_model(
    name: str,
    s: Settings,
    done: ModelResult | None = None,
    on_level: Callable[[ModelResult], None] | None = None,
    executor: Executor | None = None,
) -> ModelResult:
    """All levels of one model; levels already in ``done`` (an interrupted run's) are kept, not re-run;
    fine-tuning on ``executor`` (default: this process).

    ``on_level`` gets the model's result after every level (``complete`` False until the last), so an
    interrupted run keeps its finished levels.
    """
    t_start = time.perf_counter()
    ckpt = ensure_checkpoint(name) if name.startswith("fmnist_") else None
    cfg = CompressConfig(
        model=name,
        pretrained=True,
        data=s.data,
        calib_size=s.calib_size,
        eval_size=s.eval_size,
        signals=s.signals,
        gradient_samples=s.gradient_samples,
        finetune_lr=s.finetune_lr,
        recovery="paper",  # the paper's fine-tuning (Adam, cross-entropy), as the committed results used
        seed=s.seed,
    )
    torch.manual_seed(s.seed)
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    model, data = load_workspace_inputs(cfg)
    swapped = twice_differentiable(model)
    if swapped:
        log(f"{name}: {swapped} Hardsigmoid/Hardswish modules swapped for timm's double-differentiable forms")
    ws = Workspace(cfg, model, data, with_hessian=True)
    t["sensitivity"] = time.perf_counter() - t0
    dense = ws.accuracy()
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(prefix="edgeprune-paper-") as tmp:
        ev = Evaluator(ws, s, Path(tmp))
        dense_int8 = ev.int8_accuracy()
        log(f"{name}: dense FP32 {dense:.2%}, INT8 {dense_int8 if dense_int8 is None else f'{dense_int8:.2%}'}")
        levels = [lv for lv in (done.levels if done else []) if lv.level in s.levels]
        if levels:
            log(f"{name}: resuming; levels {', '.join(f'{lv.level:.0%}' for lv in levels)} kept from the last run")

        def result() -> ModelResult:
            timings = dict(done.timings) if done else {}
            for k, v in t.items():
                timings[k] = round(timings.get(k, 0.0) + v, 1)
            return ModelResult(
                model=name,
                checkpoint=str(ckpt.relative_to(REPO_ROOT)) if ckpt and ckpt.is_relative_to(REPO_ROOT) else str(ckpt),
                dense_fp32=dense,
                dense_int8=dense_int8,
                params=params,
                activation_swaps=swapped,
                levels=sorted(levels, key=lambda lv: lv.level),
                timings=timings,
                wall_s=round((done.wall_s if done else 0.0) + time.perf_counter() - t_start, 1),
                threads=torch.get_num_threads(),
                complete={lv.level for lv in levels} >= set(s.levels),
                machine=machine(),
            )

        for lv in s.levels:
            if lv in {x.level for x in levels}:
                continue
            levels.append(run_level(ws, ev, s, name, lv, dense, t, earlier=levels, executor=executor))
            if on_level is not None:
                on_level(result())
    return result()


# ---------------------------------------------------------------------------------------------- outputs


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def to_json(results: list[ModelResult], s: Settings, meta: dict[str, Any]) -> dict[str, Any]:
    rows = [asdict(r) for m in results for lv in m.levels for r in lv.rows]
    return {
        "schema": SCHEMA,
        **meta,
        "settings": {**asdict(s), "window": WINDOW},
        "results": rows,
        "models": {m.model: asdict(m) for m in results},
        "checks": targets_check(results),
    }


def targets_check(results: list[ModelResult]) -> dict[str, Any]:
    """The issue's numbers: >= 40 % less degradation than MAG at the highest level (fine-tuned and zero-shot),
    and beating the best of SNIP/GraSP/LAMP/ERK (lowest drop) on at least 3 of 5 models."""
    out: dict[str, Any] = {}
    for key, ft in (("finetuned", True), ("zero_shot", False)):
        vs_mag, beats_best = {}, {}
        for m in results:
            if not m.complete:  # the highest level may be the one missing
                continue
            top = max(m.levels, key=lambda lv: lv.level)
            rows = {r.method: r for r in top.rows if r.finetuned == ft}
            if "mag" in rows:
                red = reduction(rows[MM].drop, rows["mag"].drop)
                vs_mag[m.model] = {"reduction": red, "ok": red is not None and red >= 0.4}
            others = [rows[b] for b in ("snip", "grasp", "lamp", "erk") if b in rows]
            if others:
                best = min(others, key=lambda r: r.drop)
                beats_best[m.model] = {"best": best.method, "best_drop": best.drop, "mm_drop": rows[MM].drop,
                                       "ok": rows[MM].drop < best.drop}  # fmt: skip
        out[key] = {
            "vs_mag_at_highest_level": vs_mag,
            "beats_best_of_snip_grasp_lamp_erk": beats_best,
            "models_beating_best": sum(v["ok"] for v in beats_best.values()),
        }
    return out


def _p(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.2f}"


def _d(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def _r(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.0%}"


def candidate_counts(results: list[ModelResult]) -> str:
    """How many candidates a level screened, as the tables' text says it: ``"57"``, or ``"41–57"`` when the
    models and levels differ."""
    counts = sorted({len(lv.candidates) for m in results for lv in m.levels})
    if not counts:
        return "0"
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def render_markdown(results: list[ModelResult], s: Settings, meta: dict[str, Any]) -> str:
    L = ["# Mix-and-Match vs single-criterion pruning on Fashion-MNIST (edgeprune reference benchmark)", ""]
    L += [
        "Command(s): " + ", ".join(f"`{c}`" for c in meta["commands"]) + " (each model's own in paper.json)  ",
        f"Machine: {meta['machine']['platform']}, {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
        f"{s.threads} torch thread(s); load average at the end {meta['machine']['load_average']} "
        "(the cores were shared with other jobs, so timings are pessimistic)  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "  ",
        f"Seed {s.seed} (data split, baselines, fine-tuning order); data `{s.data}` test split: "
        f"{s.calib_size} calibration / {s.eval_size} evaluation images (disjoint, stratified); "
        f"gradient signals on {s.gradient_samples} calibration images  ",
        f"Fine-tuning budget (every method): {s.finetune_epochs} epoch(s) Adam lr {s.finetune_lr:g} on the "
        f"calibration split (10 % held out for early stopping), masks enforced; INT8: static QDQ, per-channel, "
        f"{s.int8_calibration} calibration images  ",
        f"Wall time: {meta['wall_s'] / 60:.1f} min for {len(results)} model(s) (sum of per-model times)"
        + (f"; missing or partial: {', '.join(meta['missing'])}" if meta.get("missing") else ""),
        "",
        "Sparsity = zeros / prunable weights (biases and norms excluded). Drop = dense FP32 − accuracy, in points. "
        "Zero-shot = masked, BatchNorm re-calibrated on the calibration split, no training. "
        f"Mix-and-Match's candidate: the most accurate (after re-calibration) of its {candidate_counts(results)} "
        "candidates (`Workspace.plans`, each listed in the JSON) with sparsity in "
        f"[level, level + {WINDOW:.1%}]; if none lands there, the most accurate above the level, and the baselines "
        "run at its sparsity (marked ✱). **Bold** = lowest drop in the column at that level.",
        "",
    ]
    for m in results:
        partial = "" if m.complete else f" (partial: only {', '.join(f'{lv.level:.0%}' for lv in m.levels)} finished)"
        L += [f"## {m.model}{partial}", ""]
        L += [
            f"Dense: FP32 {_p(m.dense_fp32)} %, INT8 {_p(m.dense_int8)} %, {m.params:,} params; "
            f"weights `{m.checkpoint}`; {m.wall_s / 60:.1f} min on {m.threads} thread(s) "
            + (f"of {m.machine.get('cpu', '?')} ({m.machine.get('cores', '?')} cores) " if m.machine else "")
            + f"({', '.join(f'{k} {v:.0f} s' for k, v in m.timings.items())})",
            "",
            "| level | method | candidate | sparsity % | zero-shot FP32 | zero-shot INT8 | drop | "
            f"fine-tuned FP32 ({s.finetune_epochs} ep) | fine-tuned INT8 | drop |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for lv in m.levels:
            zs = [r for r in lv.rows if not r.finetuned]
            ft = {r.method: r for r in lv.rows if r.finetuned}
            best_zs = min(r.drop for r in zs)
            best_ft = min(r.drop for r in ft.values())
            for r in zs:
                f = ft[r.method]
                bz = f"**{_d(r.drop)}**" if r.drop == best_zs else _d(r.drop)
                bf = f"**{_d(f.drop)}**" if f.drop == best_ft else _d(f.drop)
                lvl = f"{lv.level:.0%}" + ("" if lv.matched else " ✱")
                L.append(
                    f"| {lvl} | {r.method} | {r.candidate} | {r.sparsity * 100:.2f} | {_p(r.fp32)} | {_p(r.int8)} | "
                    f"{bz} | {_p(f.fp32)} | {_p(f.int8)} | {bf} |"
                )
        L.append("")
        unmatched = [lv for lv in m.levels if not lv.matched]
        for lv in unmatched:
            L.append(f"✱ {lv.level:.0%}: {lv.selection} ({lv.target_sparsity:.2%}).  ")
        mag_gap = []
        for lv in m.levels:
            mag = next((r for r in lv.rows if r.method == "mag" and not r.finetuned), None)
            if mag is not None and mag.drop < 2.0:
                mag_gap.append(f"{lv.level:.0%} ({mag.drop:.2f})")
        if mag_gap:
            L.append(
                "Global magnitude loses < 2 points zero-shot at " + ", ".join(mag_gap) + ": these levels are "
                "below the range the issue asks for on this model.  "
            )
        L.append("")
    L += [
        "## Degradation reduction of Mix-and-Match vs each baseline",
        "",
        "1 − drop(M&M) / drop(baseline), zero-shot / fine-tuned; positive = Mix-and-Match loses less. "
        "n/a: the baseline lost nothing.",
        "",
        "| model | level | " + " | ".join(s.baselines) + " |",
        "|---|---|" + "---|" * len(s.baselines),
    ]
    for m in results:
        for lv in m.levels:
            cells = [f"{_r(lv.reduction[b]['zero_shot'])} / {_r(lv.reduction[b]['finetuned'])}" for b in s.baselines]
            L.append(f"| {m.model} | {lv.level:.0%}{'' if lv.matched else ' ✱'} | " + " | ".join(cells) + " |")
    checks = targets_check(results)
    L += ["", "## The issue's targets", ""]
    for key in ("finetuned", "zero_shot"):
        c = checks[key]
        vm = c["vs_mag_at_highest_level"]
        L.append(
            f"- {key.replace('_', '-')}: ≥ 40 % less degradation than MAG at the highest level on "
            f"{sum(v['ok'] for v in vm.values())}/{len(vm)} models ("
            + ", ".join(f"{k} {_r(v['reduction'])}" for k, v in vm.items())
            + f"); beats the best of SNIP/GraSP/LAMP/ERK on {c['models_beating_best']}/"
            f"{len(c['beats_best_of_snip_grasp_lamp_erk'])} models ("
            + ", ".join(
                f"{k}: {v['mm_drop']:.2f} vs {v['best']} {v['best_drop']:.2f}"
                for k, v in c["beats_best_of_snip_grasp_lamp_erk"].items()
            )
            + ")"
        )
    L.append("")
    return "\n".join(L)


def plot_model(m: ModelResult, path: Path) -> None:
    """Accuracy vs sparsity: every candidate of each level (re-calibrated), each method zero-shot and fine-tuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colors = {"magnitude": "tab:blue", "gradient": "tab:orange", "product": "tab:green"}
    seen: set[str] = set()
    front: list[tuple[float, float]] = []
    for lv in m.levels:
        for c in lv.candidates:
            label = f"M&M {c['signal']} candidates (BN re-calibrated)" if c["signal"] not in seen else None
            seen.add(c["signal"])
            color = colors.get(c["signal"])
            ax.scatter(c["sparsity"] * 100, c["fp32"] * 100, s=14, alpha=0.5, color=color, label=label)
            front.append((c["sparsity"], c["fp32"]))
    # Pareto front of all candidates (no other is both sparser and more accurate).
    pts = sorted(set(front), key=lambda p: (-p[0], -p[1]))
    best, line = -1.0, []
    for sp, acc in pts:
        if acc > best:
            line.append((sp, acc))
            best = acc
    ax.plot([p[0] * 100 for p in line], [p[1] * 100 for p in line], "k:", lw=1, label="M&M candidates' Pareto front")
    markers = {"mix-and-match": "*", "mag": "s", "snip": "^", "grasp": "v", "lamp": "D", "erk": "P", "uniform": "X"}
    cmap = plt.get_cmap("tab10")
    methods = list(dict.fromkeys(r.method for lv in m.levels for r in lv.rows))
    for k, method in enumerate(methods):
        rows = [r for lv in m.levels for r in lv.rows if r.method == method]
        color = "crimson" if method == MM else cmap(3 + k % 7)
        size = 140 if method == MM else 45
        zs = [r for r in rows if not r.finetuned]
        ft = [r for r in rows if r.finetuned]
        mk = markers.get(method, "o")
        ax.scatter([r.sparsity * 100 for r in zs], [r.fp32 * 100 for r in zs], marker=mk, s=size,
                   facecolors="none", edgecolors=color)  # fmt: skip
        ax.scatter([r.sparsity * 100 for r in ft], [r.fp32 * 100 for r in ft], marker=mk, s=size, color=color,
                   label=f"{method} (hollow: zero-shot, filled: fine-tuned)")  # fmt: skip
    ax.axhline(m.dense_fp32 * 100, color="grey", lw=1, ls="--", label="dense")
    lo = min([r.fp32 for lv in m.levels for r in lv.rows] + [m.dense_fp32 - 0.1]) * 100
    ax.set_ylim(max(0.0, lo - 2), m.dense_fp32 * 100 + 2)
    ax.set_xlabel("sparsity of prunable weights (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{m.model}: accuracy vs sparsity (Fashion-MNIST)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower left")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# Settings that change the numbers: results of runs that agree on them can share one paper.json.
COMPARABLE = ("levels", "baselines", "signals", "data", "calib_size", "eval_size", "gradient_samples",
              "finetune_epochs", "finetune_lr", "int8_calibration", "seed")  # fmt: skip
# (``int8`` is not among them: a run without INT8 only leaves those cells empty.)


def model_from_dict(d: dict[str, Any]) -> ModelResult:
    levels = []
    for lv in d["levels"]:
        rows = [Row(**r) for r in lv["rows"]]
        levels.append(LevelResult(**{**lv, "rows": rows}))
    return ModelResult(**{**d, "levels": levels})


def previous_models(path: Path, s: Settings) -> list[ModelResult]:
    """Models already in ``path`` from a run with the same comparable settings (others are not mixed in)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    mine = json.loads(json.dumps(asdict(s)))
    old = doc.get("settings", {})
    if doc.get("schema") != SCHEMA or any(old.get(k) != mine[k] for k in COMPARABLE):
        log(f"{path}: written with other settings; its models are replaced, not merged")
        return []
    return [model_from_dict(m) for m in doc.get("models", {}).values()]


def write_outputs(results: list[ModelResult], s: Settings, meta: dict[str, Any], out: Path, stem: str) -> None:
    """Write JSON, Markdown and plots; models that an earlier compatible run left in ``out`` are kept.

    The file is re-read right before writing, so runs over different ``--models`` can share ``out``.
    """
    out.mkdir(parents=True, exist_ok=True)
    mine = {m.model for m in results}
    if len(mine) != len(results):
        raise ValueError("write_outputs got the same model twice")
    merged = [m for m in previous_models(out / f"{stem}.json", s) if m.model not in mine] + results
    order = {name: i for i, name in enumerate(MODELS)}
    merged.sort(key=lambda m: order.get(m.model, len(order)))
    meta["machine"] = machine()
    meta["wall_s"] = round(sum(m.wall_s for m in merged), 1)
    meta["commands"] = sorted({m.command for m in merged if m.command})
    meta["missing"] = [] if s.quick else [m for m in MODELS if m not in {r.model for r in merged if r.complete}]
    write_atomic(out / f"{stem}.json", json.dumps(to_json(merged, s, meta), indent=1) + "\n")
    write_atomic(out / f"{stem}.md", render_markdown(merged, s, meta))
    for m in merged:
        plot_model(m, out / f"{stem}_{m.model}.png")


def merge_runs(paths: list[Path], out: Path) -> Path:
    """Merge paper.json files of runs that split the work (per model or per level, e.g. on several machines)
    into one ``out/paper.json|md|png``; same-model results are joined level by level.

    The runs must agree on every setting in ``COMPARABLE`` except ``levels``, which become their union; a model is
    complete when it has every level that its own runs were asked for.
    """
    docs = [json.loads(p.read_text()) for p in paths]
    first = docs[0]["settings"]
    for p, d in zip(paths, docs):
        if d.get("schema") != SCHEMA:
            raise EdgepruneError(f"{p}: not a {SCHEMA} file")
        diff = [k for k in COMPARABLE if k != "levels" and d["settings"].get(k) != first.get(k)]
        if diff:
            raise EdgepruneError(f"{p}: settings {diff} differ from {paths[0]}'s; these runs cannot be merged")
    fields = set(Settings.__dataclass_fields__)
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in first.items() if k in fields})
    s.levels = tuple(sorted({lv for d in docs for lv in d["settings"]["levels"]}))
    by_model: dict[str, ModelResult] = {}
    asked: dict[str, set[float]] = {}  # the levels the runs of each model were asked for
    for d in docs:
        for m in map(model_from_dict, d["models"].values()):
            asked.setdefault(m.model, set()).update(d["settings"]["levels"])
            old = by_model.get(m.model)
            if old is None:
                by_model[m.model] = m
                continue
            have = {lv.level for lv in old.levels}
            old.levels = sorted(old.levels + [lv for lv in m.levels if lv.level not in have], key=lambda lv: lv.level)
            old.timings = {k: round(old.timings.get(k, 0.0) + m.timings.get(k, 0.0), 1)
                           for k in dict.fromkeys([*old.timings, *m.timings])}  # fmt: skip
            old.wall_s = round(old.wall_s + m.wall_s, 1)
            old.command = "; ".join(dict.fromkeys([*old.command.split("; "), m.command]))
    results = list(by_model.values())
    for m in results:  # complete: every level its runs were asked for (models may use different levels)
        m.complete = {lv.level for lv in m.levels} >= asked[m.model]
    meta = {k: docs[0][k] for k in ("versions", "seed", "started") if k in docs[0]}
    meta["command"] = "python -m edgeprune.benchmarks.lab.paper --merge " + ",".join(map(str, paths))
    write_outputs(results, s, meta, out, "paper")
    return out / "paper.json"


# ---------------------------------------------------------------------------------------------- CLI


def parse_settings(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: demo model and data, one level, one signal")
    p.add_argument("--models", default=None, help=f"comma-separated zoo names (default: {','.join(MODELS)})")
    p.add_argument("--levels", default=None, help="comma-separated sparsity levels (default: 0.8,0.9,0.95)")
    p.add_argument("--baselines", default=None, help=f"comma-separated (default: {','.join(BASELINE_METHODS)})")
    p.add_argument("--data", default=None, help="fashion-mnist (default) or demo")
    p.add_argument("--calib-size", type=int, default=None)
    p.add_argument("--eval-size", type=int, default=None)
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--no-int8", action="store_true", help="skip INT8 export and accuracy (FP32 only)")
    p.add_argument("--resume", action="store_true", help="keep models and levels already in --out (same settings)")
    p.add_argument("--merge", default=None, help="comma-separated paper.json files of split runs: merge into --out")
    p.add_argument(
        "--cluster",
        default=None,
        help="where fine-tuning runs: this process (default), local:N, ray://HOST:PORT, HOST:PORT or auto",
    )
    a = p.parse_args(argv)
    s = Settings(threads=a.threads, seed=a.seed, out=a.out, quick=a.quick, resume=a.resume, int8=not a.no_int8)
    s.cluster = a.cluster
    if a.cluster:
        check_cluster_spec(a.cluster)  # a bad spec now; connecting comes before the first model
    s.merge = tuple(x.strip() for x in a.merge.split(",") if x.strip()) if a.merge else ()
    if a.quick:
        s.models, s.levels, s.signals = ("fmnist_resnet",), (0.9,), ("product",)
        s.data, s.calib_size, s.eval_size, s.gradient_samples = "demo", 256, 256, 128
        s.finetune_epochs, s.int8_calibration = 1, 64
        s.baselines = ("mag", "snip", "erk")
    if a.models:
        s.models = tuple(m.strip() for m in a.models.split(",") if m.strip())
    if a.levels:
        s.levels = tuple(float(v) for v in a.levels.split(","))
    if a.baselines:
        s.baselines = tuple(b.strip() for b in a.baselines.split(",") if b.strip())
    for key in ("data", "calib_size", "eval_size", "finetune_epochs"):
        if getattr(a, key) is not None:
            setattr(s, key, getattr(a, key))
    if any(not 0.0 < lv < 1.0 for lv in s.levels):
        raise EdgepruneError(f"--levels must lie in (0, 1), got {s.levels}")
    if "mag" not in s.baselines:
        raise EdgepruneError("--baselines must include mag (the reference for the degradation targets)")
    return s


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(argv)
    if s.merge:
        try:
            path = merge_runs([Path(p) for p in s.merge], Path(s.out))
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: cannot merge {', '.join(s.merge)}: {exc}", file=sys.stderr)
            return 2
        except EdgepruneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        log(f"merged {len(s.merge)} run(s) into {path}")
        return 0
    torch.set_num_threads(s.threads)
    stem = "paper_quick" if s.quick else "paper"
    out = Path(s.out)
    meta: dict[str, Any] = {
        "command": command_line("edgeprune.benchmarks.lab.paper", argv),
        "versions": versions(),
        "seed": s.seed,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results: list[ModelResult] = []
    previous = {m.model: m for m in previous_models(out / f"{stem}.json", s)} if s.resume else {}
    try:
        executor = executor_for(s.cluster)
    except EdgepruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if s.cluster:
            log(f"fine-tuning runs on {executor.describe()}")
        return run_models(s, meta, out, stem, results, previous, executor)
    finally:
        executor.close()


def run_models(
    s: Settings,
    meta: dict[str, Any],
    out: Path,
    stem: str,
    results: list[ModelResult],
    previous: dict[str, ModelResult],
    executor: Executor,
) -> int:
    """Every model of ``s`` in turn (those complete in ``previous`` kept), results written after each level."""

    def save(partial: ModelResult) -> None:
        partial.command, partial.finished = meta["command"], time.strftime("%Y-%m-%d %H:%M:%S")
        write_outputs([r for r in results if r.model != partial.model] + [partial], s, meta, out, stem)

    for name in s.models:
        done = previous.get(name)
        if done is not None and done.complete:
            log(f"{name}: complete in {out / stem}.json, kept (--resume)")
            results.append(done)
            continue
        log(f"{name}: start")
        try:
            results.append(run_model(name, s, done=done, on_level=save, executor=executor))
        except EdgepruneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        save(results[-1])
        log(f"{name}: done in {results[-1].wall_s / 60:.1f} min; wrote {out / stem}.json|md")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())

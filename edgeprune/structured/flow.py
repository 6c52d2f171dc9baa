"""``--granularity channel``: structured Mix-and-Match, compacted ONNX, selection on measured latency.

groups (DependencyGraph) → dense eval + dense ONNX → group signals → ranges (3 signals x 3 global
targets, one threshold each, clipped by ``rules/structured.json``) → ten strategies per signal → widths
rounded to ``round_to`` → screening (compact + BN re-calibration + eval + ONNX export with parity) →
latency of every distinct architecture (onnxruntime, the target's threads, interleaved with dense) →
fine-tune the best few → Pareto on accuracy vs measured latency → select → export + benchmark → report.

Candidates of different signals but equal widths are the same architecture: their latency is measured
once (their accuracy is not: different channels survive).
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import EdgepruneError
from ..evaluation import accuracy, params_and_macs
from ..inventory import Layer
from ..ranges import LayerRange, Rule, apply_rules, baseline_ranges, parse_rules, range_targets
from ..recovery import finetune, has_batchnorm, recalibrate_bn
from ..report import Candidate, DenseSummary, LayerReport, Report, SelectedSummary, render_markdown, versions
from ..selection import Point, pareto_mask, select_index
from ..strategies import STRATEGY_NAMES, LayerStats, make_all_plans
from .groups import ROOT_TYPES, ChannelGroup, GroupGraph, check_forward
from .planning import Widths, allowed_keeps, max_ratio, min_keep_units, units_to_remove, widths_for
from .signals import accumulate_gradients, global_threshold_ratios, group_scores

RANGE_SIGNALS: tuple[str, ...] = ("magnitude", "gradient", "product")
CHECK_IMAGES = 64  # evaluation images every exported candidate is compared on (ONNX vs PyTorch)


@dataclass
class ChannelCandidate:
    """One structured candidate: which units go, and what screening measured."""

    candidate: Candidate
    widths: Widths
    remove: dict[str, list[int]]
    onnx: Path | None = None
    parity: float | None = None
    params: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def shape_key(self) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(self.widths.items()))


# -- rules ------------------------------------------------------------------------------------------------


def load_structured_rules(user_file: str | Path | None = None) -> list[Rule]:
    """``rules/structured.json``, then the ``structured`` list of the user's rules file, if it has one."""
    res = resources.files("edgeprune.rules").joinpath("structured.json")
    rules = parse_rules(json.loads(res.read_text()), "structured.json")
    if user_file is not None:
        path = Path(user_file)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise EdgepruneError(f"rules file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise EdgepruneError(f"rules file {path} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and "structured" in data:
            rules += parse_rules({"rules": data["structured"]}, f"{path} (structured)")
    return rules


def group_layer(g: ChannelGroup) -> Layer:
    """A group as the rules see it: its name, role and the weights it runs through."""
    return Layer(
        name=g.name,
        role=g.role,
        kind="conv",
        shape=(g.channels,),
        numel=g.params,
        prunable=True,
        index=g.index,
        depth=g.depth,
    )


def group_ranges(
    groups: list[ChannelGroup],
    base: dict[str, tuple[float, float]],
    rules: list[Rule],
    round_to: int,
) -> dict[str, LayerRange]:
    """Baseline ranges clipped by the rules, then by how far each group can shrink at ``round_to``."""
    ranges = apply_rules([group_layer(g) for g in groups], rules, base)
    for g in groups:
        r, cap = ranges[g.name], max_ratio(g, round_to)
        if r.hi > cap:
            r.rules.append(f"at most {cap:.0%} of its units can go at round_to={round_to}")
        r.lo, r.hi = min(r.lo, cap), min(r.hi, cap)
    return ranges


# -- targets and selection ----------------------------------------------------------------------------------


def validate_selection(cfg) -> None:
    if cfg.latency_budget_ms is not None and cfg.speedup is not None:
        raise EdgepruneError("give either --latency-budget or --speedup, not both")
    if cfg.latency_budget_ms is not None and not cfg.latency_budget_ms > 0:
        raise EdgepruneError(f"--latency-budget must be a positive number of milliseconds, got {cfg.latency_budget_ms}")
    if cfg.speedup is not None and not cfg.speedup >= 1.0:
        raise EdgepruneError(f"--speedup must be >= 1 (times faster than dense), got {cfg.speedup}")
    if cfg.round_to is not None and cfg.round_to < 1:
        raise EdgepruneError(f"--round-to must be >= 1, got {cfg.round_to}")
    if cfg.method != "mix-and-match":
        raise EdgepruneError(
            f"--granularity channel supports --method mix-and-match only, got '{cfg.method}'; "
            "use --granularity unstructured for the baselines"
        )


def channel_target(cfg, dense_ms: float) -> float:
    """Fraction of channels to remove around which the three baseline targets are placed.

    Removing a fraction r of every layer's channels leaves about (1 - r)^2 of the MACs and weights, so a
    speedup X needs r = 1 - 1/sqrt(X) and a weight sparsity s needs r = 1 - sqrt(1 - s).
    """
    if cfg.latency_budget_ms is not None:
        r = 1.0 - 1.0 / math.sqrt(max(1.0, dense_ms / cfg.latency_budget_ms))
    elif cfg.speedup is not None:
        r = 1.0 - 1.0 / math.sqrt(cfg.speedup)
    else:
        r = 1.0 - math.sqrt(1.0 - cfg.sparsity)
    return min(0.85, max(0.05, r))


def meets(c: Candidate, cfg, dense_ms: float) -> bool:
    """Whether a candidate satisfies the user's constraint (before accuracy is looked at)."""
    if cfg.latency_budget_ms is not None:
        return c.latency_ms is not None and c.latency_ms <= cfg.latency_budget_ms
    if cfg.speedup is not None:
        return c.latency_ms is not None and dense_ms / c.latency_ms >= cfg.speedup - 1e-9
    if cfg.max_drop is not None:
        return True
    return c.sparsity >= cfg.sparsity - 1e-6


def select_structured(cands: list[Candidate], cfg, dense_accuracy: float, dense_ms: float) -> tuple[int, str]:
    """Pick the candidate to ship; returns (index, why).

    ``--latency-budget MS``: the most accurate candidate measured at <= MS; ``--speedup X``: the most
    accurate one at least X times faster than dense; else ``--max-drop`` (the fastest within D points) or
    ``--sparsity`` (the most accurate with at least that fraction of weights removed).
    """
    if not cands:
        raise EdgepruneError("no candidates to select from")
    if cfg.latency_budget_ms is not None or cfg.speedup is not None:
        what = (
            f"latency <= {cfg.latency_budget_ms:g} ms"
            if cfg.latency_budget_ms is not None
            else f"speedup >= {cfg.speedup:g}x"
        )
        ok = [i for i, c in enumerate(cands) if meets(c, cfg, dense_ms)]
        if ok:
            i = max(ok, key=lambda j: (cands[j].final_accuracy, -cands[j].latency_ms))
            return i, f"most accurate candidate with {what} (measured)"
        i = min(range(len(cands)), key=lambda j: cands[j].latency_ms)
        return i, f"no candidate reached {what}; picked the fastest"
    if cfg.max_drop is not None:
        ok = [i for i, c in enumerate(cands) if (dense_accuracy - c.final_accuracy) * 100 <= cfg.max_drop + 1e-9]
        if ok:
            i = min(ok, key=lambda j: (cands[j].latency_ms, -cands[j].final_accuracy))
            return i, f"fastest candidate within {cfg.max_drop:g} points of dense"
        i = max(range(len(cands)), key=lambda j: cands[j].final_accuracy)
        return i, f"no candidate within {cfg.max_drop:g} points of dense; picked the most accurate"
    points = [Point(c.final_accuracy, c.sparsity) for c in cands]
    return select_index(points, sparsity=cfg.sparsity)


# -- model surgery ----------------------------------------------------------------------------------------


def prunable_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, ROOT_TYPES))


def compact(model: nn.Module, example: torch.Tensor, remove: dict[str, list[int]]) -> nn.Module:
    """A pruned deep copy of ``model``: the given units of each group physically removed."""
    pruned = copy.deepcopy(model)
    pruned.zero_grad(set_to_none=True)
    GroupGraph(pruned, example).remove(remove)
    check_forward(pruned, example)
    return pruned.eval()


# -- the flow ---------------------------------------------------------------------------------------------


def compress_channels(cfg, target, model: nn.Module, data, staging: Path, progress, t) -> Report:
    """Structured Mix-and-Match (see the module docstring). Writes ``model.onnx``, ``dense.onnx``,
    ``report.md`` and ``pareto.png`` into ``staging``; returns the report (the caller writes the JSON)."""
    from ..benchmarks.runner import bench
    from ..export import export_onnx
    from ..pipeline import bench_threads

    validate_selection(cfg)
    round_to = cfg.round_to or target.round_to
    threads = bench_threads(cfg, target)
    model = model.eval()
    calib_x, calib_y, eval_x, eval_y = data.calib_x, data.calib_y, data.eval_x, data.eval_y
    example, check = eval_x[:1], eval_x[:CHECK_IMAGES]
    sample = eval_x[:1].numpy().astype(np.float32)

    with t("groups"):
        progress.start("dependency graph: channel groups and attention heads")
        graph = GroupGraph(model, example)
        groups = [g for g in graph.groups if len(allowed_keeps(g, round_to)) > 1]
        progress.finish()
    if not groups:
        raise EdgepruneError(
            f"model '{cfg.model}' has no channel group that can shrink in multiples of {round_to}; "
            "pass a smaller --round-to or use --granularity unstructured"
        )
    with t("groups"):
        # Shrink every group to its narrowest width once, so a layer the graph cannot follow fails here,
        # named, before any slow work.
        probe = {g.name: list(range(g.units - min_keep_units(g, round_to))) for g in groups}
        compact(model, example, probe)
    progress.log(
        f"{len(groups)} prunable groups ({sum(g.kind == 'heads' for g in groups)} attention), round_to={round_to}"
    )

    with t("dense_eval"):
        progress.start("evaluate dense model")
        dense_acc = accuracy(model, eval_x, eval_y, cfg.batch_size)
        params, macs = params_and_macs(model, example)
        dense_weights = prunable_weights(model)
        progress.finish()
    progress.log(f"dense accuracy {dense_acc:.2%}, {params:,} params, {macs / 1e6:.1f} MMACs")

    with t("export"):
        progress.start("export dense ONNX")
        dres = export_onnx(
            model,
            example,
            staging / "dense.onnx",
            check_inputs=check,
            opset=target.opset,
            metadata={"source_model": cfg.model, "strategy": "dense", "target": target.name},
        )
        progress.finish()
    dense_ms_first = None
    if cfg.latency_budget_ms is not None:
        with t("latency"):
            dense_ms_first = bench(
                [str(staging / "dense.onnx")], sample, threads=threads, warmup=5, runs=cfg.bench_runs
            )[0]["latency_ms"]["p50"]

    with t("sensitivity"):
        progress.start("group signals (magnitude, Taylor gradient, product)")
        n = min(cfg.gradient_samples, len(calib_x))
        accumulate_gradients(model, calib_x[:n], calib_y[:n], cfg.batch_size)
        scores = group_scores(graph)
        model.zero_grad(set_to_none=True)
        progress.finish()

    with t("ranges"):
        r = channel_target(cfg, dense_ms_first or 0.0)
        targets = range_targets(r)
        progress.start("Phase 1: group baseline ranges", total=len(RANGE_SIGNALS) * len(targets))
        runs = []
        for signal in RANGE_SIGNALS:
            for tgt in targets:
                runs.append(global_threshold_ratios(groups, scores[signal], tgt, round_to))
                progress.advance()
        ranges = group_ranges(groups, baseline_ranges(runs), load_structured_rules(cfg.rules), round_to)
        progress.finish()

    with t("strategies"):
        stats = {g.name: LayerStats(ranges[g.name].lo, ranges[g.name].hi, g.params, g.depth) for g in groups}
        plans = make_all_plans(stats)
        cands: list[ChannelCandidate] = []
        for signal in cfg.signals:
            for strategy in STRATEGY_NAMES:
                widths = widths_for(groups, plans[strategy], round_to)
                cand = Candidate(
                    name=f"{signal}/{strategy}",
                    signal=signal,
                    strategy=strategy,
                    method="mix-and-match",
                    sparsity=0.0,
                    accuracy=0.0,
                )
                cands.append(ChannelCandidate(cand, widths, units_to_remove(groups, widths, scores[signal])))

    use_bn = cfg.bn_recal and has_batchnorm(model)
    tmp = tempfile.TemporaryDirectory(prefix="edgeprune-channel-")
    try:
        with t("screening"):
            progress.start(
                f"screen {len(cands)} candidates (compact{' + BN re-calibration' if use_bn else ''} + ONNX check)",
                total=len(cands),
            )
            seen: dict[tuple, ChannelCandidate] = {}
            for i, cc in enumerate(cands):
                key = (cc.candidate.signal, cc.shape_key)
                if key in seen:  # e.g. balanced and p50 are the same plan
                    _copy_screening(seen[key], cc)
                    progress.advance()
                    continue
                seen[key] = cc
                pruned = compact(model, example, cc.remove)
                c = cc.candidate
                c.zero_shot_accuracy = accuracy(pruned, eval_x, eval_y, cfg.batch_size)
                if use_bn:
                    recalibrate_bn(pruned, calib_x, cfg.batch_size)
                    c.accuracy = accuracy(pruned, eval_x, eval_y, cfg.batch_size)
                else:
                    c.accuracy = c.zero_shot_accuracy
                cc.params, c.macs = params_and_macs(pruned, example)
                c.sparsity = 1.0 - prunable_weights(pruned) / dense_weights
                res = export_onnx(
                    pruned, example, Path(tmp.name) / f"c{i}.onnx", check_inputs=check, opset=target.opset
                )
                cc.onnx, cc.parity = res.path, res.parity_max_abs_diff
                progress.advance()
            progress.finish()

        with t("latency"):
            shapes: dict[tuple, ChannelCandidate] = {}
            for cc in cands:
                shapes.setdefault(cc.shape_key, cc)
            progress.start(f"measure latency of {len(shapes)} architectures + dense (onnxruntime, {threads} thread(s))")
            paths = [str(staging / "dense.onnx")] + [str(cc.onnx) for cc in shapes.values()]
            results = bench(paths, sample, threads=threads, warmup=5, runs=cfg.bench_runs)
            progress.finish()
        dense_ms = results[0]["latency_ms"]["p50"]
        latency = {key: res["latency_ms"]["p50"] for key, res in zip(shapes, results[1:], strict=True)}
        for cc in cands:
            cc.candidate.latency_ms = latency[cc.shape_key]
    finally:
        tmp.cleanup()

    finetuned: dict[int, nn.Module] = {}
    with t("finetune"):
        if cfg.finetune_epochs > 0 and cfg.finetune_top > 0:
            pool = [i for i, cc in enumerate(cands) if meets(cc.candidate, cfg, dense_ms)] or list(range(len(cands)))
            top = sorted(pool, key=lambda i: -cands[i].candidate.accuracy)[: cfg.finetune_top]
            progress.start(
                f"fine-tune top {len(top)} ({cfg.finetune_epochs} epochs each)", total=len(top) * cfg.finetune_epochs
            )
            for i in top:
                pruned = _rebuild(model, example, cands[i], calib_x, cfg.batch_size, use_bn)
                finetune(
                    pruned,
                    {},
                    calib_x,
                    calib_y,
                    epochs=cfg.finetune_epochs,
                    lr=cfg.finetune_lr,
                    batch_size=cfg.batch_size,
                    seed=cfg.seed,
                    on_epoch=lambda e, v: progress.advance(),
                )
                cands[i].candidate.finetuned_accuracy = accuracy(pruned, eval_x, eval_y, cfg.batch_size)
                finetuned[i] = pruned
            progress.finish()

    plain = [cc.candidate for cc in cands]
    for c, on_front in zip(plain, pareto_mask([Point(c.final_accuracy, -c.latency_ms) for c in plain]), strict=True):
        c.pareto = on_front
    idx, why = select_structured(plain, cfg, dense_acc, dense_ms)
    chosen = cands[idx]
    chosen.candidate.selected = True
    final = finetuned.get(idx) or _rebuild(model, example, chosen, calib_x, cfg.batch_size, use_bn)

    c = chosen.candidate
    selected = SelectedSummary(
        name=c.name,
        signal=c.signal,
        strategy=c.strategy,
        sparsity=c.sparsity,
        accuracy=c.final_accuracy,
        why=why,
        accuracy_drop=(dense_acc - c.final_accuracy) * 100,
    )
    dense = DenseSummary(accuracy=dense_acc, params=params, macs=macs, onnx_bytes=dres.onnx_bytes)

    with t("export"):
        progress.start("export + verify the selected compacted ONNX")
        res = export_onnx(
            final,
            example,
            staging / "model.onnx",
            check_inputs=check,
            opset=target.opset,
            metadata={
                "source_model": cfg.model,
                "strategy": c.strategy,
                "signal": c.signal,
                "target": target.name,
                "granularity": "channel",
                "round_to": str(round_to),
                "calibration_size": str(len(calib_x)),
                "group_widths": json.dumps(chosen.widths),
            },
        )
        progress.finish()
    selected.onnx = "model.onnx"
    selected.onnx_zeros, selected.onnx_sparsity = res.zeros_onnx, res.sparsity_onnx
    selected.parity_max_abs_diff, selected.onnx_bytes = res.parity_max_abs_diff, res.onnx_bytes

    with t("benchmark"):
        progress.start(f"benchmark dense vs selected (onnxruntime, {threads} thread(s))")
        x, y = eval_x.numpy().astype(np.float32), eval_y.numpy()
        final_bench = bench(
            [str(staging / "dense.onnx"), str(staging / "model.onnx")],
            sample,
            threads=threads,
            warmup=10,
            runs=cfg.bench_runs,
            x=x,
            y=y,
        )
        progress.finish()
    dense.latency_ms, dense.onnx_accuracy = final_bench[0]["latency_ms"], final_bench[0]["accuracy"]
    selected.latency_ms, selected.onnx_accuracy = final_bench[1]["latency_ms"], final_bench[1]["accuracy"]

    layer_reports = [
        LayerReport(
            name=g.name,
            role=g.role,
            shape=[g.units, g.unit_size] if g.kind == "heads" else [g.channels],
            params=g.params,
            range=[ranges[g.name].lo, ranges[g.name].hi],
            sparsity=1.0 - chosen.widths[g.name] / g.units,
            baseline_range=list(ranges[g.name].baseline) if ranges[g.name].baseline else None,
            rules=ranges[g.name].rules,
        )
        for g in groups
    ]
    cfg_dict = asdict(cfg)
    cfg_dict["signals"] = list(cfg.signals)
    cfg_dict["round_to"] = round_to
    report = Report(
        model=cfg.model,
        data=data.name,
        target=target.name,
        granularity="channel",
        method=cfg.method,
        sparsity_target=cfg.sparsity,
        dense=dense,
        strategies=plain,
        selected=selected,
        layers=layer_reports,
        timings={k: round(v, 3) for k, v in t.seconds.items()},
        versions=versions(),
        config=cfg_dict,
    )
    report.timings["total"] = round(sum(t.seconds.values()), 3)
    (staging / "report.md").write_text(render_markdown(report) + render_structured(report, dense_ms, groups, chosen))
    plot_latency_pareto(report, dense_ms, staging / "pareto.png")
    return report


def _copy_screening(src: ChannelCandidate, dst: ChannelCandidate) -> None:
    for name in ("zero_shot_accuracy", "accuracy", "sparsity", "macs"):
        setattr(dst.candidate, name, getattr(src.candidate, name))
    dst.params, dst.onnx, dst.parity = src.params, src.onnx, src.parity


def _rebuild(model, example, cc: ChannelCandidate, calib_x, batch_size: int, use_bn: bool) -> nn.Module:
    pruned = compact(model, example, cc.remove)
    if use_bn:
        recalibrate_bn(pruned, calib_x, batch_size)
    return pruned


# -- report additions ------------------------------------------------------------------------------------------


def render_structured(report: Report, dense_ms: float, groups: list[ChannelGroup], chosen: ChannelCandidate) -> str:
    """Markdown appended to the common report: latency, speedup and MACs of every candidate, group widths."""
    d = report.dense
    lines = [
        "",
        "## Structured candidates (measured latency)",
        "",
        f"Latency: onnxruntime p50 at batch 1, {report.config.get('threads') or 'target'} thread(s), measured "
        f"interleaved with dense ({dense_ms:.3f} ms in that run). Pareto front: accuracy vs measured latency.",
        "",
        "| name | weights removed % | MMACs | MAC ratio | latency ms | speedup | accuracy % | Pareto |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for c in sorted(report.strategies, key=lambda c: c.latency_ms or 0.0):
        mark = "**" if c.selected else ""
        lines.append(
            f"| {mark}{c.name}{mark} | {c.sparsity * 100:.1f} | {(c.macs or 0) / 1e6:.2f} "
            f"| {d.macs / max(1, c.macs or 1):.2f} | {c.latency_ms:.3f} | {dense_ms / c.latency_ms:.2f} "
            f"| {c.final_accuracy * 100:.2f} | {'●' if c.pareto else ''} |"
        )
    lines += ["", "## Group widths (selected)", "", "| group | role | kind | kept / original |", "|---|---|---|---:|"]
    for g in groups:
        lines.append(f"| {g.name} | {g.role} | {g.kind} | {chosen.widths[g.name]} / {g.units} |")
    return "\n".join(lines) + "\n"


def plot_latency_pareto(report: Report, dense_ms: float, path: Path) -> None:
    """Accuracy vs measured latency (left) and vs MACs (right); Pareto front and selection marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110, sharey=True)
    cands = report.strategies
    for ax, key, label, dense_x in (
        (axes[0], lambda c: c.latency_ms, "latency p50 (ms, onnxruntime)", dense_ms),
        (axes[1], lambda c: (c.macs or 0) / 1e6, "MMACs", report.dense.macs / 1e6),
    ):
        for signal in sorted({c.signal for c in cands}):
            sub = [c for c in cands if c.signal == signal]
            ax.scatter([key(c) for c in sub], [c.final_accuracy * 100 for c in sub], label=signal, alpha=0.75)
        front = sorted((c for c in cands if c.pareto), key=key)
        if front and ax is axes[0]:
            ax.plot([key(c) for c in front], [c.final_accuracy * 100 for c in front], "k--", lw=1, label="Pareto front")
        sel = [c for c in cands if c.selected]
        if sel:
            ax.scatter(
                [key(sel[0])],
                [sel[0].final_accuracy * 100],
                s=200,
                facecolors="none",
                edgecolors="red",
                linewidths=2,
                label=f"selected: {sel[0].name}",
            )
        ax.scatter([dense_x], [report.dense.accuracy * 100], marker="*", s=150, color="grey", label="dense")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{report.model}: structured Mix-and-Match on {report.target}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

"""The one report schema (``report.json``), its Markdown rendering and the Pareto plot.

Every command that produces results fills these dataclasses; ``Report.to_dict`` is the JSON schema.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1


@dataclass
class DenseSummary:
    accuracy: float  # on the selection split (what every decision compared against)
    params: int
    macs: int
    test_accuracy: float | None = None  # on the sealed test split, opened once after the pick: the reported figure
    onnx_bytes: int | None = None
    latency_ms: dict | None = None  # {"p50", "p90", "p99", "mean"}
    onnx_accuracy: float | None = None
    int8_accuracy: float | None = None
    int8_latency_ms: dict | None = None


@dataclass
class RecoveryRung:
    """One rung of a candidate's recovery (`recover.RungResult`): cumulative epochs, optimizer steps and the
    selection-split accuracy before and after it."""

    rung: int
    epochs: int
    epochs_run: int
    steps: int
    accuracy: float
    start_accuracy: float
    seconds: float
    reused: bool = False
    loglik: float | None = None  # the kept weights' mean log-probability of the right class (selection split)


@dataclass
class Candidate:
    name: str  # e.g. "product/p70" or "mag"
    signal: str  # magnitude | gradient | product | the baseline's name
    strategy: str  # one of the ten strategies, or "baseline"
    method: str  # "mix-and-match" or a baseline name
    sparsity: float
    accuracy: float  # after screening recovery (BN re-calibration)
    zero_shot_accuracy: float | None = None  # before BN re-calibration (None: not measured; compress skips it with BN)
    finetuned_accuracy: float | None = None
    pareto: bool = False
    selected: bool = False
    macs: int | None = None
    latency_ms: float | None = None
    # accuracy, zero_shot_accuracy, finetuned_accuracy: the selection split. test_accuracy: the test split,
    # measured after the pick for the pick and the baselines only (None for the others)
    test_accuracy: float | None = None
    # screening stopped early (its glance was 3 standard errors below the bar, or even every unseen image
    # right could not lift it there): accuracy is on this many selection images, not all; None: all of them
    screened_images: int | None = None
    recovery: list[RecoveryRung] = field(default_factory=list)  # its rungs when the recover stage trained it
    improved: bool | None = None  # None: not recovered; False: the start weights stayed the most accurate
    recovery_lr: float | None = None  # the rate of the recovery it kept (channel mode races two per candidate)
    # after recovery, the mean log-probability of the right class on the selection split (a diagnostic: top-1
    # ranks; ranking by it was measured worse, benchmarks/results/paper_protocol_loglik_pick/); None: not recovered
    finetuned_loglik: float | None = None

    @classmethod
    def mix_and_match(cls, signal: str, strategy: str) -> Candidate:
        """A not-yet-evaluated Mix-and-Match candidate, named ``signal/strategy``."""
        return cls(f"{signal}/{strategy}", signal, strategy, "mix-and-match", sparsity=0.0, accuracy=0.0)

    @property
    def final_accuracy(self) -> float:
        return self.finetuned_accuracy if self.finetuned_accuracy is not None else self.accuracy


@dataclass
class PickEvidence:
    """How firmly the selection split backs the pick, read per image (both models on the same images, so only
    the images they disagree on carry error: `selection.paired_points`). A gap under one standard error is one
    the split's images cannot resolve."""

    images: int  # the selection split's size
    drop: float  # points the pick is below dense on it
    drop_se: float  # its standard error
    runner_up: str | None = None  # the most accurate other candidate that meets the same goal (None: the goal
    # ranks by something else than accuracy, e.g. --max-drop's sparsest or fastest, or no other one meets it)
    margin: float | None = None  # points the pick is ahead of the runner-up
    margin_se: float | None = None


@dataclass
class SelectedSummary:
    name: str
    signal: str
    strategy: str
    sparsity: float
    accuracy: float  # on the selection split (the pick and --max-drop used it)
    why: str
    onnx: str | None = None
    onnx_sparsity: float | None = None
    onnx_zeros: int | None = None
    parity_max_abs_diff: float | None = None
    latency_ms: dict | None = None
    onnx_bytes: int | None = None
    onnx_accuracy: float | None = None
    int8_accuracy: float | None = None
    int8_latency_ms: dict | None = None
    accuracy_drop: float | None = None  # points, dense - selected, on the selection split
    test_accuracy: float | None = None  # on the test split: the reported figure
    test_accuracy_drop: float | None = None  # points, dense - selected, on the test split
    shipping: dict | None = None  # INT8 / packing / ORT files and their sizes (edgeprune.export.ship)
    evidence: PickEvidence | None = None  # the pick against dense and its runner-up, per selection image

    @classmethod
    def of(cls, c: Candidate, why: str, dense_accuracy: float, dense_test: float) -> SelectedSummary:
        """The pick as both granularities report it: selection-split accuracy and drop, test-split beside it."""
        return cls(
            name=c.name,
            signal=c.signal,
            strategy=c.strategy,
            sparsity=c.sparsity,
            accuracy=c.final_accuracy,
            why=why,
            accuracy_drop=(dense_accuracy - c.final_accuracy) * 100,
            test_accuracy=c.test_accuracy,
            test_accuracy_drop=(dense_test - c.test_accuracy) * 100,
        )


@dataclass
class LayerReport:
    """One prunable unit lattice: a weight tensor (unstructured) or a channel / head group (channel mode).

    ``unit`` says what is counted: ``weight`` (one element), ``channel`` or ``head``; ``units`` of them, ``kept``
    after pruning, ``removed`` = 1 - kept / units, ``range`` the Phase-1 range of ``removed``. ``shape`` is the
    weight tensor's shape, None for a group (it spans several tensors); ``unit_size`` is a head's width."""

    name: str
    role: str
    unit: str  # "weight" | "channel" | "head"
    units: int
    kept: int
    removed: float
    params: int
    range: list[float]
    shape: list[int] | None = None
    unit_size: int = 1
    baseline_range: list[float] | None = None
    rules: list[str] = field(default_factory=list)


@dataclass
class ShippedArtifact:
    """One file `deliver` wrote: ``role`` dense (the reference) or selected; timed on the bench device."""

    file: str
    role: str  # "dense" | "selected"
    format: str  # "fp32" | "int8" | "fp32-ort" | "int8-ort"
    packing: str  # "dense" | "sparse" (ONNX sparse initializers)
    bytes: int
    gzip_bytes: int
    accuracy: float | None  # onnxruntime on the test split's images, on the bench device
    latency_ms: dict | None  # {"p50", "p90", "p99", "mean"}; None when not timed (emulated, .ort over ssh)


@dataclass
class GroupReport:
    """A channel group as the selected model has it."""

    name: str
    kind: str  # "channels" | "heads"
    units: int
    kept: int
    range: list[float]  # Phase-1 range of the removed fraction


@dataclass
class LatencyLineReport:
    """Latency vs MACs through dense and the narrowest model the rules allow (see structured.flow.LatencyLine)."""

    dense_ms: float
    dense_macs: int
    floor_ms: float
    floor_macs: int


@dataclass
class GoalRound:
    """A Phase-1 round as the run saw it when it decided whether to run another: every later round re-times
    all candidates, so only this record says why the next round ran."""

    removed_fraction: float  # the Phase-1 fraction of channels this round aimed to remove
    dense_ms: float  # dense's p50 in the timing run that closed this round
    fastest_ms: float  # the fastest candidate of every round so far, in that run
    best_drop: float  # points below dense of the most accurate candidate so far, after recovery


@dataclass
class StructuredReport:
    """What only channel mode has: widths, the measured latency line, the latency model's scale."""

    round_to: int
    groups: list[GroupReport]
    latency_line: LatencyLineReport
    screening_dense_ms: float  # dense's p50 in the run that timed every candidate
    timed_on: str  # the device that timed probe and candidates: --latency-from, or local under emulation
    latency_model_scale: float | None = None  # --latency-costs: the per-layer model's calibration factor
    goal_rounds: list[GoalRound] = field(default_factory=list)  # --max-drop / a latency goal: one per round


@dataclass
class Report:
    model: str
    data: str
    target: str
    granularity: str
    method: str
    sparsity_target: float | None
    dense: DenseSummary
    strategies: list[Candidate]
    selected: SelectedSummary
    layers: list[LayerReport]
    timings: dict[str, float]
    versions: dict[str, str]
    config: dict = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    bench: dict | None = None  # the benchmark device and every artifact's raw results
    screening: dict | None = None  # candidates evaluated, shared (identical masks) and skipped (signal at chance)
    shipped: list[ShippedArtifact] = field(default_factory=list)  # every file written, dense reference first
    structured: StructuredReport | None = None  # channel mode only
    notes: list[str] = field(default_factory=list)  # what the run could not do as asked, and why
    splits: list[dict] = field(default_factory=list)  # calibration / selection / test (`data.SplitInfo`)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        """The report back from its JSON: every key must be a declared field, every value of its declared type
        (a `SchemaError` names the first one that is not)."""
        return _build(cls, data, "report")


class SchemaError(ValueError):
    """report.json does not match the `Report` dataclass tree."""


def _check(hint, value, where: str):
    """``value`` as type ``hint`` (a dataclass, ``list[X]``, ``dict[K, V]``, ``X | None`` or a JSON scalar)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(inner[0], value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise SchemaError(f"{where}: expected a list, got {type(value).__name__}")
        return [_check(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected an object, got {type(value).__name__}")
        return {k: _check(args[1], v, f"{where}.{k}") for k, v in value.items()} if args else value
    want = (int, float) if hint is float else hint  # JSON writes 1.0 as 1.0, but a float field may hold an int
    if not isinstance(value, want) or (hint in (int, float) and isinstance(value, bool)):
        raise SchemaError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")
    return value


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected an object for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(data) - fields)
    if extra:
        raise SchemaError(f"{where}: undeclared key(s) {extra} in {cls.__name__}")
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in data and _required(f))
    if missing:
        raise SchemaError(f"{where}: missing key(s) {missing} of {cls.__name__}")
    return cls(**{k: _check(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def versions() -> dict[str, str]:
    import platform

    import numpy
    import onnx
    import onnxruntime
    import timm
    import torch

    from . import __version__

    return {
        "edgeprune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }


def evidence_line(e: PickEvidence) -> str:
    """report.md's sentence on `PickEvidence`."""
    line = f"On the {e.images} selection images, paired per image: {e.drop:.2f} ± {e.drop_se:.2f} points below dense"
    if e.runner_up is not None and e.margin is not None:
        line += f"; {e.margin:+.2f} ± {e.margin_se:.2f} points against the runner-up `{e.runner_up}`"
    return line + " (± one standard error)."


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.2f}"


def _ms(lat: dict | None) -> str:
    return "—" if not lat else f"{lat['p50']:.3f} / {lat['p90']:.3f}"


SHIPPED_COLUMNS = ("file", "KB", "gzip KB", "size × dense", "gzip × dense", "acc %", "p50 ms", "p90 ms", "speedup")


def shipped_rows(report: Report) -> list[tuple[str, ...]]:
    """The artifact table both the terminal summary and report.md lead with (`SHIPPED_COLUMNS`): every shipped
    file, then dense.onnx and its companions as the reference; sizes raw and gzip against dense.onnx's,
    accuracy, latency p50 / p90 and speedup against dense.onnx on the bench device."""
    ref = next((a for a in report.shipped if a.file == "dense.onnx"), None)
    ref_lat = ref.latency_ms if ref else None
    rows = []
    for a in sorted(report.shipped, key=lambda a: a.role != "selected"):  # stable: the order deliver wrote them
        lat = a.latency_ms
        rows.append(
            (
                a.file if a.role == "selected" else f"{a.file} (ref)",
                f"{a.bytes / 1024:,.0f}",
                f"{a.gzip_bytes / 1024:,.0f}",
                f"{a.bytes / ref.bytes:.3f}" if ref else "—",
                f"{a.gzip_bytes / ref.gzip_bytes:.3f}" if ref else "—",
                _pct(a.accuracy),
                f"{lat['p50']:.3f}" if lat else "—",
                f"{lat['p90']:.3f}" if lat else "—",
                f"{ref_lat['p50'] / lat['p50']:.2f}×" if lat and ref_lat and lat["p50"] > 0 else "—",
            )
        )
    return rows


def render_shipped(report: Report) -> list[str]:
    if not report.shipped:
        return []
    lines = [
        "## Shipped",
        "",
        "| " + " | ".join(SHIPPED_COLUMNS) + " |",
        "|---|" + "---:|" * (len(SHIPPED_COLUMNS) - 1),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in shipped_rows(report)]
    device = (report.bench or {}).get("device") or {}
    where = device.get("spec", "local")
    threads = (report.bench or {}).get("threads")
    lines.append(
        f"\nLatency: onnxruntime, batch 1, {threads} thread(s), on `{where}`"
        + (f" ({device.get('cpu_model') or device.get('machine')})" if device else "")
        + "; speedup against dense.onnx; sizes against dense.onnx."
    )
    lines += [f"- note: {n}" for n in report.notes]
    return lines + [""]


def _screened(c: Candidate) -> str:
    return _pct(c.accuracy) if c.screened_images is None else f"~{_pct(c.accuracy)} ({c.screened_images})"


def split_line(report: Report) -> str:
    """Which split decided and which is reported, with sizes (one line, for report.md and the terminal)."""
    size = {sp["name"]: sp["size"] for sp in report.splits}
    if "test" not in size:
        return "Accuracy on the selection split (this run had no test split)."
    return (
        f"Reported accuracy: the test split ({size['test']} images), opened once after the pick; every decision "
        f"(screening, early stopping, selection, --max-drop) used the selection split ({size.get('selection')} "
        f"images); calibration: {size.get('calibration')} images."
    )


def render_recovery(report: Report) -> list[str]:
    """The recover stage's rungs per candidate, and which ones recovery did not improve."""
    trained = [c for c in report.strategies if c.recovery]
    if not trained:
        return []
    cfg = report.config
    calib = next((s.get("size") for s in report.splits if s.get("name") == "calibration"), None)
    lines = [
        "",
        "## Recovery",
        "",
        f"Recipe `{cfg.get('recovery')}`, batch {cfg.get('finetune_batch')} ({calib} calibration images), early "
        "stopping on the selection split.",
        "",
        "| name | rung | epochs | steps | start % | after % | s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in trained:
        for r in c.recovery:
            lines.append(
                f"| {c.name} | {r.rung + 1} | {r.epochs} | {r.steps} | {_pct(r.start_accuracy)} | {_pct(r.accuracy)} "
                f"| {r.seconds:.1f}{' (reused)' if r.reused else ''} |"
            )
    same = [c.name for c in trained if c.improved is False]
    if same:
        lines.append(f"\nrecovery did not improve: {', '.join(same)} (the start weights stayed the most accurate).")
    return lines


def render_markdown(report: Report) -> str:
    d, s = report.dense, report.selected
    lines = [
        f"# edgeprune report — {report.model}",
        "",
        f"- data: `{report.data}`, target: `{report.target}`, granularity: `{report.granularity}`, "
        f"method: `{report.method}`",
        f"- selected: **{s.name}** ({s.why})",
        "",
        *render_shipped(report),
        "## Dense vs selected",
        "",
        "| | test acc % | selection acc % | sparsity % | ONNX bytes | latency p50 / p90 ms | ONNX acc % "
        "| INT8 acc % | INT8 p50 / p90 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| dense | {_pct(d.test_accuracy)} | {_pct(d.accuracy)} | 0.00 | {d.onnx_bytes or '—'} "
        f"| {_ms(d.latency_ms)} | {_pct(d.onnx_accuracy)} | {_pct(d.int8_accuracy)} | {_ms(d.int8_latency_ms)} |",
        f"| selected | {_pct(s.test_accuracy)} | {_pct(s.accuracy)} | {_pct(s.sparsity)} | {s.onnx_bytes or '—'} "
        f"| {_ms(s.latency_ms)} | {_pct(s.onnx_accuracy)} | {_pct(s.int8_accuracy)} | {_ms(s.int8_latency_ms)} |",
        "",
        split_line(report),
        "",
    ]
    if s.test_accuracy_drop is not None:
        lines.append(
            f"Accuracy drop on the test split: **{s.test_accuracy_drop:.2f} points** "
            f"(selection split: {s.accuracy_drop:.2f}). "
        )
    elif s.accuracy_drop is not None:
        lines.append(f"Accuracy drop: **{s.accuracy_drop:.2f} points**. ")
    if s.evidence is not None:
        lines.append(evidence_line(s.evidence))
    if s.parity_max_abs_diff is not None:
        lines.append(
            f"ONNX check: max |ONNX − PyTorch| = {s.parity_max_abs_diff:.2e}; zeros in the ONNX weights: "
            f"{s.onnx_zeros} ({_pct(s.onnx_sparsity)} %)."
        )
    lines += [
        "",
        "## Candidates",
        "",
        "Selection-split accuracies (the search's); test: the pick and the baselines only. `~N (n)`: screening "
        "stopped after n images, once the candidate could be neither recovered nor picked: its glance (BN "
        "re-calibrated on a few images) was 3 standard errors below the bar, or even every unseen image right "
        "could not lift it there (which rule: `report.json` screening.stopped). Log-lik.: the fine-tuned model's "
        "mean log-probability of the right class on the selection split (a diagnostic; top-1 ranks).",
        "",
        "| name | signal | sparsity % | zero-shot % | + BN recal % | fine-tuned % | log-lik. | test % | Pareto |",
        "|---|---|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for c in sorted(report.strategies, key=lambda c: -c.sparsity):
        mark = "**" if c.selected else ""
        lines.append(
            f"| {mark}{c.name}{mark} | {c.signal} | {_pct(c.sparsity)} | {_pct(c.zero_shot_accuracy)} "
            f"| {_screened(c)} | {_pct(c.finetuned_accuracy)} "
            f"| {'—' if c.finetuned_loglik is None else f'{c.finetuned_loglik:.4f}'} | {_pct(c.test_accuracy)} "
            f"| {'●' if c.pareto else ''} |"
        )
    lines += render_recovery(report)
    sc = report.screening
    if sc:
        lines.append(
            f"\n{sc['candidates']} candidates, {sc['evaluated']} distinct models evaluated; "
            f"{len(sc['duplicates'])} shared identical masks with another candidate"
            + "".join(
                f"; signal {k} dropped: {v} ({sum(n.startswith(k + '/') for n in sc['skipped'])} not screened)"
                for k, v in sc["skipped_signals"].items()
            )
            + "."
        )
    lines += [
        "",
        "## Layers",
        "",
        "| layer | role | params | unit | kept / units | range % | removed % |",
        "|---|---|---:|---|---:|---|---:|",
    ]
    for layer in report.layers:
        lines.append(
            f"| {layer.name} | {layer.role} | {layer.params} | {layer.unit} | {layer.kept} / {layer.units} "
            f"| {layer.range[0] * 100:.0f}–{layer.range[1] * 100:.0f} | {_pct(layer.removed)} |"
        )
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report.timings.items()]
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in report.versions.items()), ""]
    return "\n".join(lines)


PARETO_AXES: dict[str, tuple[str, object]] = {  # x axis -> (label, candidate -> x)
    "sparsity": ("global sparsity (%)", lambda c: c.sparsity * 100),
    "latency": ("latency p50 (ms, onnxruntime)", lambda c: c.latency_ms),
    "macs": ("MMACs", lambda c: (c.macs or 0) / 1e6),
}


def plot_pareto(report: Report, path: Path, axes: tuple[str, ...] = ("sparsity",), dense_x: dict | None = None) -> None:
    """Accuracy vs each x axis in ``axes`` (``PARETO_AXES``: sparsity, measured latency, MACs), one panel each:
    every candidate by signal, the Pareto front drawn (the report's own front on the first panel, recomputed
    for the others), the selection circled, dense marked (``dense_x``: dense's x per axis; else a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .pareto import Point, pareto_mask

    fig, panels = plt.subplots(1, len(axes), figsize=(6.5 * len(axes), 4.5), dpi=110, sharey=True, squeeze=False)
    cands = report.strategies
    for n, (ax, axis) in enumerate(zip(panels[0], axes, strict=True)):
        label, key = PARETO_AXES[axis]
        for signal in sorted({c.signal for c in cands}):
            sub = [c for c in cands if c.signal == signal]
            marker = "o" if sub[0].method == "mix-and-match" else "s"
            ax.scatter(
                [key(c) for c in sub], [c.final_accuracy * 100 for c in sub], label=signal, marker=marker, alpha=0.75
            )
        # sparsity: more is better; latency and MACs: less is better
        sign = 1.0 if axis == "sparsity" else -1.0
        on_front = (
            [c.pareto for c in cands]
            if n == 0
            else pareto_mask([Point(c.final_accuracy, sign * key(c)) for c in cands])
        )
        front = sorted((c for c, f in zip(cands, on_front, strict=True) if f), key=key)
        if front:
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
        if dense_x and axis in dense_x:
            ax.scatter([dense_x[axis]], [report.dense.accuracy * 100], marker="*", s=150, color="grey", label="dense")
        else:
            ax.axhline(report.dense.accuracy * 100, color="grey", lw=1, label="dense")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    panels[0][0].set_ylabel("accuracy (%)")
    panels[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{report.model}: {report.method}, {report.granularity} on {report.target}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

"""The one report schema (``report.json``), its Markdown rendering and the Pareto plot.

Every command that produces results fills these dataclasses; ``Report.to_dict`` is the JSON schema.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1


@dataclass
class DenseSummary:
    accuracy: float
    params: int
    macs: int
    onnx_bytes: int | None = None
    latency_ms: dict | None = None  # {"p50", "p90", "p99", "mean"}
    onnx_accuracy: float | None = None
    int8_accuracy: float | None = None
    int8_latency_ms: dict | None = None


@dataclass
class Candidate:
    name: str  # e.g. "product/p70" or "mag"
    signal: str  # magnitude | gradient | product | the baseline's name
    strategy: str  # one of the ten strategies, or "baseline"
    method: str  # "mix-and-match" or a baseline name
    sparsity: float
    accuracy: float  # after screening recovery (BN re-calibration)
    zero_shot_accuracy: float | None = None  # before BN re-calibration
    finetuned_accuracy: float | None = None
    pareto: bool = False
    selected: bool = False
    macs: int | None = None
    latency_ms: float | None = None

    @classmethod
    def mix_and_match(cls, signal: str, strategy: str) -> Candidate:
        """A not-yet-evaluated Mix-and-Match candidate, named ``signal/strategy``."""
        return cls(f"{signal}/{strategy}", signal, strategy, "mix-and-match", sparsity=0.0, accuracy=0.0)

    @property
    def final_accuracy(self) -> float:
        return self.finetuned_accuracy if self.finetuned_accuracy is not None else self.accuracy


@dataclass
class SelectedSummary:
    name: str
    signal: str
    strategy: str
    sparsity: float
    accuracy: float
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
    accuracy_drop: float | None = None  # points, dense - selected
    shipping: dict | None = None  # INT8 / packing / ORT files and their sizes (edgeprune.export.ship)


@dataclass
class LayerReport:
    name: str
    role: str
    shape: list[int]
    params: int
    range: list[float]
    sparsity: float
    baseline_range: list[float] | None = None
    rules: list[str] = field(default_factory=list)


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
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


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


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.2f}"


def _ms(lat: dict | None) -> str:
    return "—" if not lat else f"{lat['p50']:.3f} / {lat['p90']:.3f}"


def render_markdown(report: Report) -> str:
    d, s = report.dense, report.selected
    lines = [
        f"# edgeprune report — {report.model}",
        "",
        f"- data: `{report.data}`, target: `{report.target}`, granularity: `{report.granularity}`, "
        f"method: `{report.method}`",
        f"- selected: **{s.name}** ({s.why})",
        "",
        "| | accuracy % | sparsity % | ONNX bytes | latency p50 / p90 ms | ONNX acc % | INT8 acc % "
        "| INT8 p50 / p90 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| dense | {_pct(d.accuracy)} | 0.00 | {d.onnx_bytes or '—'} | {_ms(d.latency_ms)} "
        f"| {_pct(d.onnx_accuracy)} | {_pct(d.int8_accuracy)} | {_ms(d.int8_latency_ms)} |",
        f"| selected | {_pct(s.accuracy)} | {_pct(s.sparsity)} | {s.onnx_bytes or '—'} | {_ms(s.latency_ms)} "
        f"| {_pct(s.onnx_accuracy)} | {_pct(s.int8_accuracy)} | {_ms(s.int8_latency_ms)} |",
        "",
    ]
    if s.accuracy_drop is not None:
        lines.append(f"Accuracy drop: **{s.accuracy_drop:.2f} points**. ")
    if s.parity_max_abs_diff is not None:
        lines.append(
            f"ONNX check: max |ONNX − PyTorch| = {s.parity_max_abs_diff:.2e}; zeros in the ONNX weights: "
            f"{s.onnx_zeros} ({_pct(s.onnx_sparsity)} %)."
        )
    if s.shipping and s.shipping.get("sizes"):
        lines += ["", "## Shipped files", "", "| file | bytes | gzip bytes | × dense.onnx |", "|---|---:|---:|---:|"]
        for name, size in s.shipping["sizes"].items():
            lines.append(f"| {name} | {size['bytes']} | {size['gzip_bytes']} | {size['ratio']:.3f} |")
    if report.bench and report.bench.get("device"):
        dev = report.bench["device"]
        lines.append(f"\nBenchmarked on {dev.get('cpu_model') or dev.get('machine')} ({dev.get('uname', '')}).")
    lines += [
        "",
        "## Candidates",
        "",
        "| name | signal | sparsity % | zero-shot % | + BN recal % | fine-tuned % | Pareto |",
        "|---|---|---:|---:|---:|---:|:-:|",
    ]
    for c in sorted(report.strategies, key=lambda c: -c.sparsity):
        mark = "**" if c.selected else ""
        lines.append(
            f"| {mark}{c.name}{mark} | {c.signal} | {_pct(c.sparsity)} | {_pct(c.zero_shot_accuracy)} "
            f"| {_pct(c.accuracy)} | {_pct(c.finetuned_accuracy)} | {'●' if c.pareto else ''} |"
        )
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
    lines += ["", "## Layers", "", "| layer | role | params | range % | sparsity % |", "|---|---|---:|---|---:|"]
    for layer in report.layers:
        lines.append(
            f"| {layer.name} | {layer.role} | {layer.params} | {layer.range[0] * 100:.0f}–{layer.range[1] * 100:.0f} "
            f"| {_pct(layer.sparsity)} |"
        )
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report.timings.items()]
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in report.versions.items()), ""]
    return "\n".join(lines)


def plot_pareto(report: Report, path: Path) -> None:
    """Accuracy vs sparsity of every candidate, the Pareto front drawn, the selection circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    by_signal: dict[str, list[Candidate]] = {}
    for c in report.strategies:
        by_signal.setdefault(c.signal, []).append(c)
    for signal, cands in sorted(by_signal.items()):
        marker = "o" if cands[0].method == "mix-and-match" else "s"
        ax.scatter(
            [c.sparsity * 100 for c in cands],
            [c.final_accuracy * 100 for c in cands],
            label=signal,
            marker=marker,
            alpha=0.75,
        )
    front = sorted((c for c in report.strategies if c.pareto), key=lambda c: c.sparsity)
    if front:
        ax.plot(
            [c.sparsity * 100 for c in front],
            [c.final_accuracy * 100 for c in front],
            "k--",
            lw=1,
            label="Pareto front",
        )
    sel = [c for c in report.strategies if c.selected]
    if sel:
        ax.scatter(
            [sel[0].sparsity * 100],
            [sel[0].final_accuracy * 100],
            s=200,
            facecolors="none",
            edgecolors="red",
            linewidths=2,
            label=f"selected: {sel[0].name}",
        )
    ax.axhline(report.dense.accuracy * 100, color="grey", lw=1, label="dense")
    ax.set_xlabel("global sparsity (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{report.model}: {report.method}, {report.granularity}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

"""The one seam between the granularities and the rest of `compress`.

`pipeline._compress` is one flow for both granularities: load → the granularity's search → `finish` (open the
test split once, deliver, report). What differs by granularity is one function, a `Search`: it takes the run's
`SearchInputs` and runs its middle stages (dense evaluation, signals, Phase 1 ranges, Phase 2 strategies,
screening, the shared recover stage, goal rounds, the shared selection rules), and returns a `Found`: the
candidates, the pick, how to build what ships, and the granularity's parts of the one report schema
(``layers`` in its units, the ``structured`` block, its notes). Unstructured candidates are masks applied to
the dense model (`pipeline.search_unstructured`); channel candidates are compacted models timed on the target
(`structured.flow.search_channels`). Everything after the pick is here, the same for both: the sealed test
split opened once, `deliver.deliver` (export → INT8 → pack → ORT → verify → benchmark on local / ssh /
qemu), `report.Report`, ``report.md`` and the Pareto plot.

A search never opens the test split and never writes a shipped file (channel mode writes ``dense.onnx``
early: its candidates are timed against it, so ``Found.dense_exported`` says so); `finish` never reaches back
into a search's internals: all it reads is the `Found`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from .cluster import Executor
from .deliver import BenchDevice, deliver
from .evaluation import accuracy, right_answers
from .recover import ResultStore
from .report import (
    Candidate,
    DenseSummary,
    LayerReport,
    Report,
    SelectedSummary,
    StructuredReport,
    plot_pareto,
    render_markdown,
    versions,
)
from .selection import evidence_note, pick_evidence
from .stages import FINAL_EVALUATION, Progress, Timings
from .targets import Target, threads_note


@dataclass
class SearchInputs:
    """What every search reads: the options, the target, the loaded model and data, where it stages files,
    its progress and timings, where recovery runs and what it may reuse."""

    cfg: Any  # pipeline.CompressConfig (not imported: the pipeline imports this module)
    target: Target
    model: nn.Module
    data: Any  # data.DataBundle
    staging: Path
    progress: Progress
    t: Timings
    executor: Executor
    store: ResultStore | None
    threads: int  # onnxruntime threads of every latency figure (targets.bench_threads)


@dataclass
class Found:
    """A search's result: the one handoff from a granularity to the shared end of the flow."""

    dense: DenseSummary  # the dense model on the selection split: accuracy, params, MACs
    dense_model: nn.Module  # the unpruned model every figure is measured against
    dense_exported: bool  # dense.onnx is in the staging folder already (channel mode timed candidates against it)
    candidates: list[Candidate]  # every candidate, in the report's order
    chosen: int  # index into candidates
    why: str  # the selection rule that picked it
    ship: Callable[[], nn.Module]  # the model to ship (recovered when it was); called after every `on_test`
    metadata: dict[str, str]  # model.onnx's metadata
    layers: list[LayerReport]  # per layer (unstructured: weights) or per group (channel: units)
    # other candidates whose test accuracy the report gives (unstructured: the baselines' own runs), each with
    # how to build it; they may reuse one module, so each is evaluated before the next is built and before ship
    on_test: list[tuple[int, Callable[[], nn.Module]]] = field(default_factory=list)
    screening: dict | None = None  # `screening.ScreeningSummary` as a dict (unstructured)
    structured: StructuredReport | None = None  # channel mode's block: groups, widths, latency line
    notes: list[str] = field(default_factory=list)  # what ran differently from what was asked, and why
    config: dict = field(default_factory=dict)  # the options as the report records them (`stages.config_dict`)
    markdown: Callable[[Report], str] | None = None  # the granularity's sections after report.md's common ones
    plot_axes: tuple[str, ...] = ("sparsity",)  # `report.plot_pareto`'s x axes
    plot_dense_x: dict | None = None  # dense's x per plot axis (else a line)
    # the pick's closest rival on the same goal (`selection.runner_up`) and how to build any candidate (recovered
    # when it was): the rival is built after the ``on_test`` ones (or is one of them) and before ``ship``
    runner_up: int | None = None
    build: Callable[[int], nn.Module] | None = None


class Search(Protocol):
    """One granularity's middle stages: `SearchInputs` in, `Found` out (`pipeline.SEARCHES`)."""

    def __call__(self, inputs: SearchInputs) -> Found: ...


def finish(inp: SearchInputs, found: Found, check_images: int = 64) -> Report:
    """The shared end of `compress`: the sealed test split opened once (dense, every ``on_test`` candidate,
    the pick), the pick's evidence on the selection split (`report.PickEvidence`), the deliver step (when
    ``cfg.export``) and the report, ``report.md`` and ``pareto.png`` written into the staging folder. Returns
    the report (the caller writes ``report.json``)."""
    cfg, data, t = inp.cfg, inp.data, inp.t
    chosen = found.candidates[found.chosen]
    chosen.selected = True
    # the pick against dense and its runner-up, re-read per selection image (`selection.pick_evidence`) while
    # each model is built anyway: a candidate may share the pick's module, so none is built twice
    select = (data.eval_x, data.eval_y)
    rival = None
    test = data.test_split(FINAL_EVALUATION)
    dense_test = accuracy(found.dense_model, *test, cfg.batch_size)
    for i, build in found.on_test:
        if i != found.chosen:
            m = build()
            found.candidates[i].test_accuracy = accuracy(m, *test, cfg.batch_size)
            if i == found.runner_up:
                rival = right_answers(m, *select, cfg.batch_size)
    if found.runner_up is not None and rival is None and found.build is not None:
        rival = right_answers(found.build(found.runner_up), *select, cfg.batch_size)
    model = found.ship()
    chosen.test_accuracy = accuracy(model, *test, cfg.batch_size)
    model.eval()
    evidence = pick_evidence(
        right_answers(model, *select, cfg.batch_size),
        right_answers(found.dense_model, *select, cfg.batch_size),
        rival,
        None if rival is None else found.candidates[found.runner_up].name,
    )
    note = evidence_note(evidence, cfg.max_drop)
    if note:
        found.notes.append(note)

    selected = SelectedSummary.of(chosen, found.why, found.dense.accuracy, dense_test)
    selected.evidence = evidence
    found.dense.test_accuracy = dense_test
    delivery = None
    if cfg.export:
        delivery = deliver(
            cfg,
            inp.target,
            data,
            inp.staging,
            model,
            found.metadata,
            device=BenchDevice.from_config(cfg, inp.threads),
            test=test,
            dense=None if found.dense_exported else found.dense_model,
            t=t,
            progress=inp.progress,
            check_images=check_images,
        )
        delivery.fill(found.dense, selected)
    capped = threads_note(cfg.threads, inp.target, inp.threads) if found.dense_exported or delivery else None
    timing_notes = [capped] if capped else []
    report = Report(
        model=cfg.model,
        data=data.name,
        target=inp.target.name,
        granularity=cfg.granularity,
        method=cfg.method,
        sparsity_target=cfg.sparsity,
        dense=found.dense,
        strategies=found.candidates,
        selected=selected,
        layers=found.layers,
        timings={k: round(v, 3) for k, v in t.seconds.items()},
        versions=versions(),
        config=found.config,
        bench=delivery.bench if delivery else None,
        screening=found.screening,
        shipped=delivery.artifacts if delivery else [],
        structured=found.structured,
        notes=found.notes + (delivery.notes if delivery else []) + timing_notes,
        splits=[asdict(s) for s in data.splits()],
    )
    report.timings["total"] = round(sum(t.seconds.values()), 3)
    md = render_markdown(report) + (found.markdown(report) if found.markdown else "")
    (inp.staging / "report.md").write_text(md)
    plot_pareto(report, inp.staging / "pareto.png", axes=found.plot_axes, dense_x=found.plot_dense_x)
    return report

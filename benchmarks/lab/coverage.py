"""Architecture coverage: which timm families go through compress -> export -> parity -> zeros, and what stops the rest.

For each architecture (<= ~10 M parameters, CNN / mobile / re-parameterisable / ViT / hierarchical /
hybrid) and each granularity, one `edgeprune.pipeline.compress` at the model's natural input size, on
the bundled demo images resized to it (1 channel: timm builds the stem for ``in_chans=1``; coverage is
about the graph, not accuracy), magnitude signal only with the magnitude range baseline only (GraSP's
Hessian product and the other baselines' plans add screening time, not graph coverage), 16 calibration
and 16 evaluation images, no fine-tuning. A row passes when the pipeline
returns a report: the export itself checks parity and follows every pruned weight's zeros into the graph
(`edgeprune.export.sparsity.account_zeros`). A row that fails records the one-line `EdgepruneError`
(it names the layer or op); any other exception is a finding and records its type, message and last frame.

    python -m edgeprune.benchmarks.lab.coverage                      # every model, both granularities
    python -m edgeprune.benchmarks.lab.coverage --models levit_128s,repvgg_a0 --granularity unstructured
    python -m edgeprune.benchmarks.lab.coverage --merge part1.json part2.json   # later parts win per row

A shared machine runs the list in batches (``--models ... --stem part1 --out DIR``); ``--merge`` joins the
parts into ``coverage.{json,md}`` in the built-in order, a later part's row replacing an earlier one (a
re-run after a fix), and keeps every part's machine record and command. Each row records the 1-minute load
average when it finished: wall times on a loaded machine are upper bounds.

Results: ``benchmarks/results/coverage.{json,md}`` with machine, versions and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeprune.benchmarks.lab import RESULTS
from edgeprune.benchmarks.machine import command_line, machine_info, write_results

# (family, timm name): every name checked against the installed timm at start-up (an unknown one is a row
# that says so, not a crash). Kept at <= ~10 M parameters so a full run fits a CPU afternoon.
MODELS: tuple[tuple[str, str], ...] = (
    ("resnet", "resnet10t"),
    ("resnet", "resnet18"),
    ("regnet", "regnetx_002"),
    ("regnet", "regnety_002"),
    ("mobilenetv2", "mobilenetv2_050"),
    ("mobilenetv2", "mobilenetv2_100"),
    ("mobilenetv3", "mobilenetv3_small_050"),
    ("mobilenetv3", "mobilenetv3_large_100"),
    ("mobilenetv4", "mobilenetv4_conv_small"),
    ("mobilenetv4", "mobilenetv4_hybrid_medium_075"),
    ("efficientnet", "efficientnet_b0"),
    ("efficientnet", "efficientnet_lite0"),
    ("ghostnet", "ghostnet_050"),
    ("ghostnet", "ghostnetv2_100"),
    ("mnasnet", "mnasnet_050"),
    ("mnasnet", "mnasnet_small"),
    ("tinynet", "tinynet_e"),
    ("tinynet", "tinynet_a"),
    ("lcnet", "lcnet_050"),
    ("mixnet", "mixnet_s"),
    ("mobileone", "mobileone_s0"),
    ("mobileone", "mobileone_s1"),
    ("repvgg", "repvgg_a0"),
    ("repghost", "repghostnet_050"),
    ("fastvit", "fastvit_t8"),
    ("levit", "levit_128s"),
    ("levit", "levit_conv_128s"),
    ("vit", "deit_tiny_patch16_224"),
    ("vit", "vit_tiny_patch16_224"),
    ("vit", "deit_tiny_distilled_patch16_224"),
    ("swin", "swin_s3_tiny_224"),  # the smallest Swin in timm is ~28 M: an upper-bound row
    ("efficientvit", "efficientvit_b0"),
    ("efficientvit", "efficientvit_m0"),
    ("efficientformer", "efficientformerv2_s0"),
    ("mobilevit", "mobilevit_xxs"),
    ("mobilevit", "mobilevitv2_050"),
    ("edgenext", "edgenext_xx_small"),
    ("convnext", "convnext_atto"),
    ("convnext", "convnext_femto"),
    ("hgnet", "hgnetv2_b0"),
    ("dla", "dla46_c"),
    ("densenet", "densenet121"),
    ("tiny_vit", "tiny_vit_5m_224"),
    ("pit", "pit_ti_224"),
)
GRANULARITIES = ("unstructured", "channel")


@dataclass
class Row:
    model: str
    family: str
    granularity: str
    image_size: int | None = None
    params_m: float | None = None
    # "pass" | "fail" (EdgepruneError: a named, user-facing stop) | "crash" (a finding) | "timeout" (over
    # --row-minutes on this machine: neither a pass nor a stop) | "not run" (merge only)
    status: str = "fail"
    stopped_by: str = ""  # the one-line message, or "Type: message @ file:line in func" for a crash
    pruned: float | None = None  # the selected candidate's sparsity: zeroed weights, or removed parameters (channel)
    sparsity_onnx: float | None = None  # zeros recounted in the ONNX weights (0 for channel: the zeros are gone)
    parity_max_abs_diff: float | None = None
    wall_s: float = 0.0
    load_1m: float | None = None  # 1-minute load average when the row finished (`uptime`)


def natural_size(name: str) -> tuple[int, float]:
    """(input side in pixels from the timm config, parameters in millions) without building twice."""
    import timm

    model = timm.create_model(name, pretrained=False)
    size = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return size, sum(p.numel() for p in model.parameters()) / 1e6


def _last_frame(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" @ {Path(f.filename).name}:{f.lineno} in {f.name}"


class RowTimeout(BaseException):
    """Raised by SIGALRM when one row runs past --row-minutes (checked between Python bytecodes); a
    BaseException so that the product's `except Exception` wrappers (which name a layer) pass it through."""


def _alarm(signum: int, frame: object) -> None:
    raise RowTimeout


def run_row(
    family: str, name: str, granularity: str, eval_size: int, calib_size: int, sparsity: float, minutes: float = 0
) -> Row:
    import timm

    from edgeprune.errors import EdgepruneError
    from edgeprune.pipeline import CompressConfig, compress

    row = Row(model=name, family=family, granularity=granularity)
    start = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix=f"coverage-{name}-"))
    if minutes > 0:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(minutes * 60))
    try:
        if name not in timm.list_models():
            row.stopped_by = f"not in the installed timm {timm.__version__}"
            return row
        row.image_size, row.params_m = natural_size(name)
        cfg = CompressConfig(
            model=name,
            image_size=row.image_size,
            data="demo",
            calib_size=calib_size,
            eval_size=eval_size,
            test_size=eval_size,  # the reported split: coverage is about the graph, 16 images suffice
            granularity=granularity,
            method="mix-and-match",
            signals=("magnitude",),
            range_baselines=("mag",),
            sparsity=sparsity,
            finetune_epochs=0,
            quantize="none",
            bench_runs=3,
            out=str(out / "out"),
            batch_size=32,
        )
        report = compress(cfg)
        selected = report.selected
        row.status = "pass"
        row.pruned = selected.sparsity
        row.sparsity_onnx = getattr(selected, "onnx_sparsity", None)
        row.parity_max_abs_diff = getattr(selected, "parity_max_abs_diff", None)
    except RowTimeout:
        row.status = "timeout"
        row.stopped_by = f"stopped after {minutes:g} min on this machine (not a failure of the graph)"
    except EdgepruneError as exc:
        row.stopped_by = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    except Exception as exc:  # a traceback is a finding: record what and where, keep going
        row.status = "crash"
        message = str(exc).splitlines()[0][:200] if str(exc) else ""
        row.stopped_by = f"{type(exc).__name__}: {message}{_last_frame(exc)}"
    finally:
        signal.alarm(0)
        row.wall_s = round(time.perf_counter() - start, 1)
        row.load_1m = round(os.getloadavg()[0], 2)
        shutil.rmtree(out, ignore_errors=True)
    return row


def markdown(rows: list[Row], runs: list[dict]) -> str:
    """The README table: one row per (model, granularity), pass counts per granularity, every run's machine."""
    lines = ["# Architecture coverage: compress -> export -> parity -> zeros", ""]
    for info in runs:
        lines.append(
            f"- `{info['command']}` on {info['cpu']} ({info['cores']} cores), {info['utc']}, "
            f"load {info.get('load_average_1m', 0) or 0:.2f} at the start"
        )
    lines += [
        "",
        "| family | model | params (M) | px | granularity | result | pruned | ONNX zeros | parity | s | load "
        "| stopped by |",
        "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        sp = "" if r.sparsity_onnx is None else f"{r.sparsity_onnx:.3f}"
        pruned = "" if r.pruned is None else f"{r.pruned:.3f}"
        par = "" if r.parity_max_abs_diff is None else f"{r.parity_max_abs_diff:.2g}"
        params = "" if r.params_m is None else f"{r.params_m:.1f}"
        load = "" if r.load_1m is None else f"{r.load_1m:.1f}"
        why = r.stopped_by.replace("|", "\\|")
        wall = "" if r.status == "not run" else r.wall_s
        lines.append(
            f"| {r.family} | {r.model} | {params} | {r.image_size or ''} | {r.granularity} | {r.status} "
            f"| {pruned} | {sp} | {par} | {wall} | {load} | {why} |"
        )
    lines.append("")
    for g, (passed, failed, crashed, slow, missing) in pass_counts(rows).items():
        lines.append(
            f"- {g}: {passed} pass, {failed} stop with a named one-line reason, {crashed} crash, "
            f"{slow} over the time limit, {missing} not run"
        )
    lines += [
        "",
        "Wall time (s) is the whole `compress` on a shared machine (load = 1-minute load average when the row "
        "finished); crashes are findings (exception type and last frame).",
    ]
    return "\n".join(lines) + "\n"


STATUSES = ("pass", "fail", "crash", "timeout", "not run")


def pass_counts(rows: list[Row]) -> dict[str, tuple[int, ...]]:
    """granularity -> counts in `STATUSES` order (pass, fail, crash, timeout, not run)."""
    out: dict[str, tuple[int, ...]] = {}
    for g in dict.fromkeys(r.granularity for r in rows):
        mine = [r for r in rows if r.granularity == g]
        out[g] = tuple(sum(r.status == s for r in mine) for s in STATUSES)
    return out


def merge(parts: list[dict]) -> tuple[list[Row], list[dict]]:
    """Rows of several result files in the built-in order (MODELS x GRANULARITIES, then any others); a later
    part's row for the same (model, granularity) replaces an earlier one (a part may be a merge itself); a
    built-in pair no part ran is a "not run" row, so the table always shows the whole list. Returns (rows,
    each run's machine)."""
    by_key: dict[tuple[str, str], Row] = {}
    runs = []
    for part in parts:
        runs.extend(part["runs"] if "runs" in part else [part["machine"]])  # a merged file merges again
        for d in part["rows"]:
            row = Row(**d)
            by_key[(row.model, row.granularity)] = row
    order = {(name, g): k for k, (name, g) in enumerate((n, g) for _, n in MODELS for g in GRANULARITIES)}
    for family, name in MODELS:
        for g in GRANULARITIES:
            by_key.setdefault((name, g), Row(model=name, family=family, granularity=g, status="not run"))
    rows = sorted(by_key.values(), key=lambda r: order.get((r.model, r.granularity), len(order)))
    return rows, runs


def _settings(a: argparse.Namespace) -> dict:
    return {
        "eval_size": a.eval_size,
        "calib_size": a.calib_size,
        "sparsity": a.sparsity,
        "signals": ["magnitude"],
        "range_baselines": ["mag"],
        "finetune_epochs": 0,
        "row_minutes": a.row_minutes,
        "data": "demo images resized to the model's natural size (1 channel)",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="comma-separated timm names (default: the built-in list)")
    p.add_argument("--granularity", default="both", choices=(*GRANULARITIES, "both"))
    p.add_argument("--eval-size", type=int, default=16)
    p.add_argument("--calib-size", type=int, default=16)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--stem", default="coverage", help="results file name (without extension)")
    p.add_argument("--row-minutes", type=float, default=0, help="stop a row after this long (0: no limit)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="join result files instead of running")
    a = p.parse_args(argv)

    if a.merge:
        parts = [json.loads(f.read_text()) for f in a.merge]
        rows, runs = merge(parts)
        result = {"runs": runs, "settings": parts[-1]["settings"], "rows": [asdict(r) for r in rows]}
        result["pass_counts"] = {g: dict(zip(STATUSES, c)) for g, c in pass_counts(rows).items()}
        write_results(a.out, a.stem, result, markdown(rows, runs))
        return 0

    families = dict((name, fam) for fam, name in MODELS)
    names = [n.strip() for n in a.models.split(",") if n.strip()] or [name for _, name in MODELS]
    grans = GRANULARITIES if a.granularity == "both" else (a.granularity,)
    info = machine_info()
    info["command"] = command_line("edgeprune.benchmarks.lab.coverage", argv)
    rows: list[Row] = []
    for name in names:
        for granularity in grans:
            row = run_row(
                families.get(name, "?"), name, granularity, a.eval_size, a.calib_size, a.sparsity, a.row_minutes
            )
            rows.append(row)
            print(f"{name:32s} {granularity:12s} {row.status:5s} {row.wall_s:7.1f}s {row.stopped_by}", flush=True)
            # Written after every row: a long run stopped half-way still leaves its results.
            result = {"machine": info, "settings": _settings(a), "rows": [asdict(r) for r in rows]}
            write_results(a.out, a.stem, result, markdown(rows, [info]))
    return 0 if all(r.status == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`edgeprune compress`: prune, recover, select, export and benchmark in one command."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..baselines import RANGE_BASELINES
from ..pipeline import METHODS, CompressConfig, compress
from ..recovery import RECIPES
from ..report import SHIPPED_COLUMNS, Report, evidence_line, shipped_rows, split_line
from ..sensitivity import SIGNALS
from ._app import CheckpointOpt, InChansOpt, ModelOpt, NumClassesOpt, PretrainedOpt, TargetOpt, app
from .progress import RichProgress


@app.command("compress")
def compress_cmd(
    model: ModelOpt = "demo",
    checkpoint: CheckpointOpt = None,
    pretrained: PretrainedOpt = False,
    num_classes: NumClassesOpt = None,
    in_chans: InChansOpt = None,
    image_size: int | None = typer.Option(None, help="input size in pixels (default: from the data / model)"),
    data: str = typer.Option("demo", help="'demo', 'fashion-mnist' or 'imagefolder:PATH'"),
    calib_size: int = typer.Option(1000, help="calibration images (gradients, BN re-calibration, fine-tuning)"),
    eval_size: int | None = typer.Option(
        None,
        help="selection images: every decision (screening, early stopping, the pick, --max-drop) is made on them "
        "(default: what the held-out images leave beside the test split, 1000 to 4000: 4000 for fashion-mnist, "
        "1000 for the demo)",
    ),
    test_size: int = typer.Option(
        2000,
        "--test-size",
        help="test images (sealed): opened once after the pick; the reported accuracy and the shipped files' "
        "accuracy. The three splits are disjoint",
    ),
    target: TargetOpt = "arm64",
    sparsity: float = typer.Option(0.8, help="global sparsity to reach, in [0, 1)"),
    max_drop: float | None = typer.Option(
        None,
        help="instead: sparsest (channel: fastest) candidate within this many accuracy points; not with --speedup "
        "or --latency-budget",
    ),
    method: str = typer.Option("mix-and-match", help=f"one of: {', '.join(METHODS)}"),
    signals: str = typer.Option(",".join(SIGNALS), help="sensitivity signals for mix-and-match"),
    range_baselines: str = typer.Option(
        ",".join(RANGE_BASELINES), help="mix-and-match Phase 1 baselines; their own plans also compete as candidates"
    ),
    rules: Path | None = typer.Option(None, help="extra architecture rules (JSON, same format as edgeprune/rules)"),
    granularity: str = typer.Option(
        "unstructured", help="unstructured (zeroed weights) or channel (channels/heads removed: faster)"
    ),
    latency_budget: float | None = typer.Option(None, help="channel: most accurate candidate under this p50 (ms)"),
    speedup: float | None = typer.Option(None, help="channel: most accurate candidate at least this much faster (> 1)"),
    round_to: int | None = typer.Option(None, help="channel: keep widths multiples of this (default: the target's)"),
    latency_costs: bool = typer.Option(
        False,
        help="channel, experimental: time each group narrowed alone, fit a per-layer latency model and add "
        "candidates that remove units by score per millisecond saved",
    ),
    bn_recal: bool = typer.Option(True, help="re-calibrate BatchNorm statistics after masking"),
    finetune_epochs: int = typer.Option(3, help="fine-tuning epochs for the best candidates (0 = none)"),
    finetune_top: int = typer.Option(2, help="how many screened candidates to fine-tune"),
    finetune_lr: float | None = typer.Option(
        None,
        help="Adam learning rate for fine-tuning (default: the paper's 1e-4 for CNNs, 5e-5 for attention models; "
        "channel mode races that and 3e-3 / 1.5e-3 per candidate, keeping the better on the selection split)",
    ),
    finetune_batch: int | None = typer.Option(
        None,
        help="fine-tuning batch (default: enough for 32 optimizer steps an epoch, a power of two in 16..--batch-size: "
        "32 for 1000 calibration images)",
    ),
    recover: str = typer.Option(
        "top",
        help="recovery schedule: top (the --finetune-top best screened candidates, --finetune-epochs each) or "
        "halving (every candidate 1 epoch, the better half twice as long, ... up to --finetune-epochs, keeping "
        "at least --finetune-top); both rank on the selection split",
    ),
    cluster: str | None = typer.Option(
        None, help="run recovery on a Ray cluster: ray://HOST:PORT, HOST:PORT, auto (RAY_ADDRESS) or local:N"
    ),
    resume: bool = typer.Option(
        False, "--resume", help="keep finished recovery rungs in --out/.edgeprune-recover and reuse them on a re-run"
    ),
    recover_threads: int = typer.Option(
        1, help="torch threads per recovery task (part of the result: the same in-process and on --cluster)"
    ),
    recovery: str = typer.Option(
        "distill", help="fine-tuning recipe: " + "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values())
    ),
    device: str = typer.Option(
        "auto",
        help="where screening, BN re-calibration and fine-tuning run: auto (a CUDA GPU when torch sees one), cpu "
        "or cuda (export, parity and the test split's figures stay on the CPU)",
    ),
    quantize: str | None = typer.Option(None, help="int8 or none (default: the target profile's choice)"),
    pack: str = typer.Option(
        "dense", help="dense, or sparse: store zeroed weights as ONNX sparse initializers (unstructured only)"
    ),
    ort_format: bool = typer.Option(False, help="also write .ort files for onnxruntime mobile/minimal builds"),
    latency_from: str = typer.Option(
        "local",
        help="benchmark on: local, ssh://user@host[:port] (login checked before the run) or qemu-arm64; channel "
        "mode also times its candidates there (on this machine under qemu's emulation)",
    ),
    identity: Path | None = typer.Option(None, help="ssh private key for --latency-from ssh://…"),
    ssh_option: list[str] = typer.Option([], help="extra `ssh -o` option, repeatable"),
    remote_python: str = typer.Option(
        "python3", help="Python on the ssh:// device, with numpy + onnxruntime (e.g. ~/ort/bin/python3)"
    ),
    out: Path = typer.Option(Path("edgeprune-out"), help="output directory"),
    threads: int | None = typer.Option(
        None, help="benchmark threads, >= 1 (default: the target's; on this machine at most its cores minus one)"
    ),
    bench_runs: int = typer.Option(50, help="timed benchmark runs per artifact"),
    seed: int = typer.Option(0, help="random seed (data splits, fine-tuning)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Prune a model with Mix-and-Match (or a baseline), recover, export a verified ONNX and benchmark it."""
    cfg = CompressConfig(
        model=model,
        checkpoint=str(checkpoint) if checkpoint else None,
        pretrained=pretrained,
        num_classes=num_classes,
        in_chans=in_chans,
        image_size=image_size,
        data=data,
        calib_size=calib_size,
        eval_size=eval_size,
        test_size=test_size,
        target=target,
        granularity=granularity,
        method=method,
        sparsity=sparsity,
        max_drop=max_drop,
        signals=tuple(s.strip() for s in signals.split(",") if s.strip()),
        range_baselines=tuple(b.strip() for b in range_baselines.split(",") if b.strip()),
        rules=str(rules) if rules else None,
        bn_recal=bn_recal,
        finetune_epochs=finetune_epochs,
        finetune_top=finetune_top,
        finetune_lr=finetune_lr,
        finetune_batch=finetune_batch,
        recover=recover,
        cluster=cluster,
        resume=resume,
        recover_threads=recover_threads,
        recovery=recovery,
        device=device,
        latency_budget_ms=latency_budget,
        speedup=speedup,
        round_to=round_to,
        latency_costs=latency_costs,
        quantize=quantize,
        pack=pack,
        ort_format=ort_format,
        latency_from=latency_from,
        identity=str(identity) if identity else None,
        ssh_options=tuple(ssh_option),
        remote_python=remote_python,
        out=str(out),
        threads=threads,
        bench_runs=bench_runs,
        seed=seed,
    )
    console = Console(stderr=True)
    report = compress(cfg, RichProgress(console, quiet=quiet))
    print_summary(report, Console())


TERMINAL_DROPS = ("p90 ms", "size × dense")  # report.md has every column; the terminal keeps to 80 characters


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.2f}"


def _points(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} points"


def print_summary(report: Report, console: Console, folder: Path | None = None) -> None:
    """What ships first (every file against dense.onnx: size, accuracy, latency, speedup), then the pick and how
    firmly the selection split backs it; ``folder``: where the artifacts are (default: the run's --out)."""
    d, s = report.dense, report.selected
    title = f"edgeprune: {report.model} → {report.target} ({report.method}, {report.granularity})"
    if report.shipped:
        console.print(title)
        table = Table(title="shipped files", padding=(0, 1))
        keep = [i for i, col in enumerate(SHIPPED_COLUMNS) if col not in TERMINAL_DROPS]
        for i in keep:
            table.add_column(SHIPPED_COLUMNS[i], justify="left" if i == 0 else "right", no_wrap=i == 0)
        for row in shipped_rows(report):
            table.add_row(*(row[i] for i in keep))
        console.print(table)
        where = ((report.bench or {}).get("device") or {}).get("spec", "local")
        console.print(f"latency: onnxruntime, batch 1, {(report.bench or {}).get('threads')} thread(s), on {where}")
    else:  # --no-export: nothing shipped, the accuracies are PyTorch's
        console.print(f"{title} (no export)")
    for note in report.notes:
        console.print(f"note: {note}")
    console.print(f"selected {s.name} ({_pct(s.sparsity)} % of the weights removed): {s.why}")
    console.print(
        f"accuracy, test split: dense {_pct(d.test_accuracy)} %, selected {_pct(s.test_accuracy)} % "
        f"(drop {_points(s.test_accuracy_drop)}); selection split: dense {_pct(d.accuracy)} %, selected "
        f"{_pct(s.accuracy)} % (drop {_points(s.accuracy_drop)})"
    )
    console.print(split_line(report))
    if s.evidence is not None:
        console.print(evidence_line(s.evidence))
    if s.parity_max_abs_diff is not None:
        console.print(f"ONNX verified: max |ONNX − PyTorch| = {s.parity_max_abs_diff:.2e}, zeros kept: {s.onnx_zeros}")
    where = (folder or Path(report.config["out"])).resolve()
    console.print(f"total {report.timings.get('total', 0):.1f} s; artifacts in {where}")

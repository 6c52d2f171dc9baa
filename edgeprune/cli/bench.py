"""`edgeprune bench ARTIFACT [ARTIFACT …]`: latency, throughput, RSS and accuracy on a device.

Several artifacts are timed interleaved (A B A B …) and reported as ratios to the first one, so a device
that drifts (heat, background jobs) still gives a fair comparison.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ..benchmarks.device import DEVICES_HELP, BenchReport, bench_artifacts, input_shape, sample_input
from ..benchmarks.runner import NOISY_CV
from ..errors import DataError, EdgepruneError
from ..export.load import load_onnx_checked
from ..export.metadata import read_metadata
from ..targets import ENV_VAR, bench_threads, get_target
from ._app import app


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


SPLIT_KEYS = ("calibration_size", "selection_size", "test_size", "split_seed")


def _artifact_splits(path: Path) -> dict[str, int]:
    """The split sizes and seed `edgeprune compress` recorded in the artifact (`DataBundle.split_metadata`):
    those present and whole numbers (`read_metadata` leaves a value that is not one a string); an artifact
    from elsewhere has none."""
    meta = read_metadata(path)
    return {k: meta[k] for k in SPLIT_KEYS if isinstance(meta.get(k), int)}


def _data_inputs(
    spec: str,
    shape: tuple,
    eval_size: int,
    batch: int,
    calib_size: int,
    seed: int,
    select_size: int | None = None,
    test_size: int = 2000,
) -> tuple[np.ndarray, ...]:
    """(sample, x, y) from a data spec, with the channels and image size the artifact expects.

    The splits are `load_data`'s with compress's calibration, selection and test sizes and seed, and the
    images are the first ``eval_size`` of compress's test split: never images the artifact was calibrated
    on or selected by, and the same images compress reported its accuracy on.
    """
    from ..data import load_data

    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise DataError(f"--data needs an image model with a fixed (N, C, H, W) input; this one has {shape}")
    _, channels, height, width = shape
    if height != width:
        raise DataError(f"--data supports square inputs only; the artifact expects {height}x{width}")
    bundle = load_data(
        spec, calib_size=calib_size, eval_size=select_size, test_size=test_size, image_size=height, seed=seed
    )
    if bundle.eval_x.shape[1] != channels:
        bundle = bundle.with_channels(channels)
    if tuple(bundle.eval_x.shape[2:]) != (height, width):
        bundle = bundle.resized(height)
    test_x, test_y = bundle.test_split("edgeprune bench accuracy")
    x = _numpy(test_x[:eval_size]).astype(np.float32)
    y = _numpy(test_y[:eval_size]).astype(np.int64)
    if len(x) == 0:
        raise DataError(f"--data {spec} gave no evaluation images")
    n = shape[0] or batch
    sample = x[:n]
    if len(sample) < n:  # fewer images than one fixed batch: repeat them
        sample = np.resize(sample, (n, *x.shape[1:])).astype(np.float32)
    return sample, x, y


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _short_names(names: list[str]) -> list[str]:
    """File names when they are unique (keeps the table narrow), else the paths as given."""
    base = [Path(n).name for n in names]
    return base if len(set(base)) == len(base) else names


def _print_report(report: BenchReport, console: Console) -> None:
    d = report.device
    facts = [
        str(d.get("spec")),
        *([d["board"]] if d.get("board") else []),
        d.get("cpu_model") or "unknown CPU",
        f"{d.get('machine')}",
        f"{d.get('cpu_count')} cores",
        f"onnxruntime {d.get('onnxruntime')}",
        f"governor {d.get('governor') or 'n/a'}",
        f"INT8 flags: {', '.join(d.get('int8_flags') or []) or 'none'}",
        f"{report.threads} thread(s)",
    ]
    console.print("device: " + " · ".join(facts), highlight=False)
    wide = console.width >= 110  # mean and throughput only when there is room
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("artifact", overflow="fold", min_width=12)
    table.add_column("size", justify="right", no_wrap=True)
    timing_cols = ["p50 ms", "p90 ms", "p99 ms"] + (["mean ms"] if wide else []) + ["CV", "vs 1st"]
    timing_cols += ["per s"] if wide else []
    if report.emulated:
        table.add_column("latency", no_wrap=True)
    else:
        for col in timing_cols:
            table.add_column(col, justify="right", no_wrap=True)
    table.add_column("accuracy", justify="right", no_wrap=True)
    names = _short_names([r["artifact"] for r in report.results])
    for name, r in zip(names, report.results, strict=True):
        size = f"{r['bytes'] / 1e6:.2f}MB" if r["bytes"] >= 1e5 else f"{r['bytes'] / 1e3:.1f}kB"
        acc = "—" if r.get("accuracy") is None else f"{r['accuracy']:.4f}"
        if report.emulated:
            table.add_row(name, size, "[dim]emulated: not measured[/dim]", acc)
            continue
        lat = r["latency_ms"]
        cells = [_fmt_ms(lat[k]) for k in ("p50", "p90", "p99")] + ([_fmt_ms(lat["mean"])] if wide else [])
        cells.append(f"{r['cv'] * 100:.1f}%" + ("[yellow]*[/yellow]" if r["noisy"] else " "))
        ratio = r.get("ratio_to_first")
        cells.append("—" if ratio is None else f"{ratio:.2f}×")
        cells += [f"{r['throughput_per_s']:.1f}"] if wide else []
        table.add_row(name, size, *cells, acc)
    console.print(table)
    if report.peak_rss_mb is not None:
        console.print(f"peak RSS of the runner (all artifacts loaded): {report.peak_rss_mb:.1f} MB", highlight=False)
    if report.emulated:
        console.print(
            "[yellow]emulated arm64 (QEMU): outputs and accuracy are those of the arm64 onnxruntime build; "
            "timings under an emulator are meaningless and are not reported as latency.[/yellow]"
        )
    elif any(r["noisy"] for r in report.results):
        console.print(
            f"[yellow]* noisy: CV above {NOISY_CV:.0%}; stop other jobs, set the CPU governor to "
            "'performance', or raise --runs. Ratios to the first stay fair (runs were interleaved).[/yellow]"
        )


def _write_json(path: Path, report: BenchReport) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise EdgepruneError(f"cannot write --json {path}: {exc.strerror or exc}") from None


def _target_mismatch(profile, device: dict) -> list[str]:
    """Ways the measured device contradicts the --target profile (the profile may need a user override)."""
    out = []
    if device.get("machine") and device["machine"] != profile.arch:
        out.append(f"target {profile.name} is {profile.arch} but the device is {device['machine']}")
    elif device.get("dotprod") is False and profile.int8_worth_it:
        out.append(
            f"target {profile.name} assumes fast INT8, but this CPU has no dot-product instructions "
            "(asimddp); INT8 may not pay off here"
        )
    return out


@app.command("bench")
def bench_command(
    artifacts: list[Path] = typer.Argument(..., help="ONNX artifacts; ratios are relative to the first."),
    device: str = typer.Option("local", "--device", "-d", help=f"Where to run: {DEVICES_HELP}."),
    threads: int | None = typer.Option(
        None,
        "--threads",
        "-t",
        help="onnxruntime intra-op threads (default: the --target's, here at most the cores minus one; else 1).",
    ),
    runs: int = typer.Option(50, "--runs", help="Timed runs per artifact."),
    warmup: int = typer.Option(10, "--warmup", help="Untimed runs per artifact first."),
    data: str | None = typer.Option(
        None, "--data", help="Real images + labels for accuracy: demo, fashion-mnist or imagefolder:PATH."
    ),
    eval_size: int = typer.Option(
        500, "--eval-size", help="Test-split images shipped for accuracy when --data is given (compress's test split)."
    ),
    select_size: int | None = typer.Option(
        None,
        "--select-size",
        help="compress's --eval-size (selection split), skipped (default: from the artifact, else compress's rule).",
    ),
    test_size: int | None = typer.Option(
        None,
        "--test-size",
        help="compress's --test-size, the split accuracy is on (default: from the artifact, else 2000).",
    ),
    calib_size: int | None = typer.Option(
        None,
        "--calib-size",
        help="Calibration images compress held out, skipped here (default: from the artifact, else 1000).",
    ),
    seed: int | None = typer.Option(None, "--seed", help="Data split seed (default: from the artifact, else 0)."),
    batch: int = typer.Option(1, "--batch", help="Batch size of the timed input (if the model's is dynamic)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results as JSON to this file."),
    identity: Path | None = typer.Option(None, "--identity", "-i", help="SSH private key for the device."),
    ssh_option: list[str] = typer.Option(
        [], "--ssh-option", "-o", help="Extra ssh -o Key=Value (repeatable), e.g. StrictHostKeyChecking=accept-new."
    ),
    remote_python: str = typer.Option(
        "python3", "--remote-python", help="Python interpreter on the SSH device (needs numpy + onnxruntime)."
    ),
    target: str | None = typer.Option(
        None, "--target", help="Target profile: default --threads, and a warning if the device differs."
    ),
    targets_file: Path | None = typer.Option(None, "--targets-file", envvar=ENV_VAR, help="Extra target profiles."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds before a device step is given up."),
) -> None:
    """Measure latency (p50/p90/p99/mean), throughput, peak RSS and accuracy of ONNX artifacts on a device."""
    profile = get_target(target, targets_file) if target else None
    if threads is None:  # a profile's count as compress times it: on this machine, one core left free
        threads = bench_threads(None, profile, device) if profile else 1
    for p in artifacts:
        load_onnx_checked(p)  # a text file, a folder or an empty graph: one line here, not a runner traceback
    if min(batch, eval_size) < 1 or any(n is not None and n < 1 for n in (select_size, test_size, calib_size)):
        raise EdgepruneError("--batch, --eval-size, --select-size, --test-size and --calib-size must be >= 1")
    x = y = None
    if data:
        # compress's splits, as the artifact recorded them, unless an option says otherwise
        rec = _artifact_splits(artifacts[0])
        calib = calib_size or rec.get("calibration_size") or 1000
        select = select_size if select_size is not None else rec.get("selection_size")
        test = test_size if test_size is not None else rec.get("test_size") or 2000
        split_seed = seed if seed is not None else rec.get("split_seed", 0)
        shape = input_shape(artifacts[0])
        sample, x, y = _data_inputs(data, shape, eval_size, batch, calib, split_seed, select, test)
    else:
        sample = sample_input(artifacts[0], batch=batch)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=140)
    with console.status(f"benchmarking {len(artifacts)} artifact(s) on {device} …"):
        report = bench_artifacts(
            artifacts,
            device,
            sample=sample,
            threads=threads,
            warmup=warmup,
            runs=runs,
            x=x,
            y=y,
            identity=str(identity) if identity else None,
            ssh_options=ssh_option,
            timeout=timeout,
            remote_python=remote_python,
        )
    _print_report(report, console)
    for warning in _target_mismatch(profile, report.device) if profile else []:
        console.print(f"[yellow]warning: {warning}[/yellow]", highlight=False)
    if json_out is not None:
        _write_json(json_out, report)
        console.print(f"wrote {json_out}", highlight=False)

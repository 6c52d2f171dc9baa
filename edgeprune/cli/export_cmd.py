"""`edgeprune export` (a model + checkpoint -> verified artifacts) and `edgeprune verify` (check one artifact)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..errors import EdgepruneError
from ..outdir import is_int8_name
from ._app import CheckpointOpt, InChansOpt, ModelOpt, NumClassesOpt, PretrainedOpt, TargetOpt, app


def check_export_options(
    *,
    quantize: str | None,
    pack: str,
    opset: int | None,
    calib_size: int,
    eval_size: int,
    image_size: int | None,
    num_classes: int | None,
    in_chans: int | None,
) -> None:
    """One-line errors for `edgeprune export` options that cannot work (before anything loads)."""
    from edgeprune.export.ship import PACK_CHOICES, QUANTIZE_CHOICES

    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise EdgepruneError(f"--quantize must be {' or '.join(QUANTIZE_CHOICES)}, got '{quantize}'")
    if pack not in PACK_CHOICES:
        raise EdgepruneError(f"--pack must be {' or '.join(PACK_CHOICES)}, got '{pack}'")
    if calib_size < 1 or eval_size < 1:
        raise EdgepruneError(f"--calib-size and --eval-size must be >= 1, got {calib_size} and {eval_size}")
    sizes = {"--opset": opset, "--image-size": image_size, "--num-classes": num_classes, "--in-chans": in_chans}
    for flag, value in sizes.items():  # None: the default
        if value is not None and value < 1:
            raise EdgepruneError(f"{flag} must be >= 1 (omit it for the default), got {value}")


@app.command("export")
def export_cmd(
    model: ModelOpt = "demo",
    checkpoint: CheckpointOpt = None,
    pretrained: PretrainedOpt = False,
    num_classes: NumClassesOpt = None,
    in_chans: InChansOpt = None,
    image_size: int | None = typer.Option(None, help="input size in pixels (default: from the data)"),
    data: str = typer.Option("demo", help="'demo', 'fashion-mnist' or 'imagefolder:PATH' (calibration, checks)"),
    calib_size: int = typer.Option(256, help="calibration images for INT8"),
    eval_size: int = typer.Option(500, help="evaluation images (parity check, ONNX accuracy)"),
    target: TargetOpt = "arm64",
    quantize: str | None = typer.Option(None, help="int8 or none (default: the target profile's)"),
    pack: str = typer.Option("dense", help="dense, or sparse: zeroed weights as ONNX sparse initializers"),
    ort_format: bool = typer.Option(False, "--ort-format", help="also write model.ort for onnxruntime mobile"),
    opset: int | None = typer.Option(None, help="ONNX opset (default: the target profile's)"),
    simplify: bool = typer.Option(True, help="simplify the graph (zeros are checked to survive)"),
    out: Path = typer.Option(Path("edgeprune-out"), help="output directory"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Export a (pruned) model to a verified model.onnx, with INT8 / sparse-packed / ORT-format companions."""
    import torch

    from edgeprune.data import load_data
    from edgeprune.export import build_metadata, export_onnx
    from edgeprune.export.ship import ship_artifacts
    from edgeprune.models import load_model
    from edgeprune.outdir import claim_output_dir
    from edgeprune.pipeline import match_data_to_model
    from edgeprune.targets import get_target

    console = Console(stderr=True)
    # Every option is checked before any slow work (loading the model and data, exporting).
    profile = get_target(target)
    check_export_options(
        quantize=quantize,
        pack=pack,
        opset=opset,
        calib_size=calib_size,
        eval_size=eval_size,
        image_size=image_size,
        num_classes=num_classes,
        in_chans=in_chans,
    )
    torch.set_num_threads(max(1, min(torch.get_num_threads(), profile.threads)))

    with console.status("loading model and data"):
        # export decides nothing, so no test split is needed: the smallest one (1 image) leaves the folder's
        # images to calibration and the checks (the default 2000 would shrink them on a small folder)
        bundle = load_data(data, calib_size=calib_size, eval_size=eval_size, test_size=1, image_size=image_size)
        net = load_model(
            model,
            checkpoint=checkpoint,
            pretrained=pretrained,
            num_classes=num_classes or bundle.num_classes,
            in_chans=in_chans or bundle.in_chans,
            img_size=bundle.image_size,
        )
        bundle = match_data_to_model(net, bundle)

    with claim_output_dir(out, log=console.print) as od:
        staging = od.staging
        with console.status("exporting to ONNX and checking it against PyTorch"):
            metadata = build_metadata(
                source_model=model if checkpoint is None else f"{model} ({checkpoint.name})",
                strategy="as-is",
                target=profile.name,
                calibration_size=len(bundle.calib_x),
            )
            result = export_onnx(
                net,
                bundle.eval_x[:1],
                staging / "model.onnx",
                check_inputs=bundle.eval_x[:64],
                opset=opset or profile.opset,
                simplify=simplify,
                metadata=metadata,
            )
        with console.status("writing INT8 / packed / ORT-format artifacts and checking each"):
            shipped = ship_artifacts(
                result.path,
                target=profile,
                quantize=quantize,
                pack=pack,
                ort_format=ort_format,
                calibration=bundle.calib_x,
                check_inputs=bundle.eval_x[:256],
                eval_x=bundle.eval_x,
                eval_y=bundle.eval_y,
            )
        published = od.publish()

    summary = {
        "model": model,
        "target": profile.name,
        "artifacts": published,
        "sparsity": result.sparsity_onnx,
        "zeros_torch": result.zeros_torch,
        "zeros_onnx": result.zeros_onnx,
        "parity_max_abs_diff": result.parity_max_abs_diff,
        "parity_max_rel_diff": result.parity_max_rel_diff,
        "simplified": result.simplified,
        **shipped.to_dict(),
    }
    for key in ("fp32", "int8", "ort"):  # staging paths: the published ones are under "artifacts"
        summary.pop(key, None)
    if summary.get("quantize"):
        summary["quantize"].pop("path", None)
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    _print_export(summary, Console())


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _print_export(s: dict, console: Console) -> None:
    table = Table(title=f"{s['model']} -> {s['target']}: sparsity {_pct(s['sparsity'])}, packing {s['packing']}")
    for col in ("artifact", "bytes", "gzip", "of dense", "floor", "accuracy"):
        table.add_column(col, justify="left" if col == "artifact" else "right")
    for name, size in s["sizes"].items():
        acc = s["int8_accuracy"] if is_int8_name(name) else s["fp32_accuracy"]
        table.add_row(
            name,
            f"{size['bytes']:,}",
            f"{size['gzip_bytes']:,}",
            _pct(size["ratio"]),
            _pct(size["floor_ratio"]),
            _pct(acc) if name.endswith(".onnx") else "",
        )
    console.print(table)
    console.print(
        f"parity vs PyTorch: max |diff| {s['parity_max_abs_diff']:.2g}; zeros PyTorch {s['zeros_torch']:,} "
        f"-> ONNX {s['zeros_onnx']:,}"
    )
    q = s.get("quantize")
    if q:
        console.print(
            f"INT8 ({q['int8_format']}, {q['calibration_size']} calibration images): top-1 agreement with FP32 "
            f"{q['top1_agreement']:.3f}, zeros kept {q['zeros_fp32']:,} -> {q['zeros_int8']:,}"
        )
    for name, path in s["artifacts"].items():
        console.print(f"  {name}: {path}")


@app.command("verify")
def verify_cmd(
    artifact: Path = typer.Argument(..., help="an .onnx or .ort artifact"),
    target: str | None = typer.Option(
        None, help="target profile; an arm64 one runs the artifact with aarch64 onnxruntime under QEMU"
    ),
    data: str | None = typer.Option(None, help="images to compare on ('demo', 'imagefolder:PATH'; default random)"),
    samples: int = typer.Option(16, help="how many images from --data"),
    image_size: int | None = typer.Option(None, help="resize --data images to this size"),
    cache_dir: Path | None = typer.Option(None, help="QEMU rootfs cache (default ~/.cache/edgeprune/qemu-arm64)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Check an artifact: graph, weights digest, sparsity, reference outputs, and (arm64) emulated run."""
    from edgeprune.export import verify_artifact

    console = Console(stderr=True)
    inputs = None
    if data is not None:
        from edgeprune.data import load_data

        bundle = load_data(data, calib_size=1, eval_size=max(1, samples), test_size=1, image_size=image_size)
        inputs = bundle.eval_x[:samples]
    report = verify_artifact(
        artifact,
        target=target,
        inputs=inputs,
        cache_dir=cache_dir,
        progress=lambda m: console.print(f"  {m}"),
    )
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        table = Table(title=f"verify {artifact} ({report.format}, {report.precision})")
        for col in ("check", "result", "detail"):
            table.add_column(col)
        for c in report.checks:
            style = {"ok": "green", "FAILED": "bold red", "skipped": "dim"}[c.status]
            table.add_row(c.name, f"[{style}]{c.status}[/{style}]", c.detail)
        Console().print(table)
    if not report.ok:
        failed = ", ".join(c.name for c in report.failures())
        first = report.failures()[0]  # its detail names the problem (the table went to stdout)
        raise EdgepruneError(f"{artifact} failed verification ({failed}): {first.detail}")

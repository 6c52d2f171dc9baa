"""`edgeprune inspect`: the layer table of a model (roles and rule ranges), what an ONNX artifact holds, or what
a `compress` run shipped (its ``--out`` folder or report.json)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..data import check_image_size
from ..errors import EdgepruneError
from ._app import app


@app.command("inspect")
def inspect_cmd(
    artifact: Path | None = typer.Argument(
        None,
        help="an exported .onnx / .ort artifact, or a compress --out folder or its report.json (omit to inspect "
        "--model)",
    ),
    model: str = typer.Option("demo", help="model spec, as for `compress`"),
    checkpoint: Path | None = typer.Option(None, help="state_dict to load"),
    num_classes: int | None = typer.Option(None),
    in_chans: int | None = typer.Option(None),
    image_size: int | None = typer.Option(None, help="input size for models that need it at creation (ViT, Swin)"),
    rules: Path | None = typer.Option(None, help="extra rules file, to see its effect on the ranges"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Print every weight tensor's role, shape, size and allowed sparsity range (from the rules); with an
    artifact, what it holds; with a run's folder, what it shipped and how firmly its data backed the pick."""
    console = Console()
    check_image_size(image_size)
    if artifact is not None:
        given = {"--checkpoint": checkpoint, "--num-classes": num_classes, "--in-chans": in_chans,
                 "--image-size": image_size, "--rules": rules}  # fmt: skip
        extra = ["--model"] * (model != "demo") + [flag for flag, value in given.items() if value is not None]
        if extra:
            raise EdgepruneError(
                f"{', '.join(extra)}: a model's options, which do not apply to {artifact}; drop "
                f"{'them' if len(extra) > 1 else 'it'}, or drop the path to inspect the model"
            )
        if artifact.is_dir() or artifact.suffix == ".json":
            _inspect_run(artifact, console, as_json)
        else:
            _inspect_artifact(artifact, console, as_json)
        return
    from ..inventory import build_inventory
    from ..models import load_model, model_family
    from ..ranges import apply_rules, load_rules

    net = load_model(model, checkpoint=checkpoint, num_classes=num_classes, in_chans=in_chans, img_size=image_size)
    layers = build_inventory(net)
    family = model_family(net)
    ranges = apply_rules(layers, load_rules(family, rules))
    rows = [
        {
            "name": layer.name,
            "role": layer.role,
            "shape": list(layer.shape),
            "params": layer.numel,
            "range": [ranges[layer.name].lo, ranges[layer.name].hi],
        }
        for layer in layers
    ]
    if as_json:
        print(json.dumps({"model": model, "family": family, "layers": rows}, indent=2))
        return
    table = Table(
        title=f"{model} ({family}): {sum(r['params'] for r in rows if r['role'] != 'norm'):,} prunable weights"
    )
    for col in ("layer", "role", "shape", "params", "rule range %"):
        table.add_column(col, justify="right" if col in ("params",) else "left")
    for r in rows:
        lo, hi = r["range"]
        table.add_row(r["name"], r["role"], "×".join(map(str, r["shape"])), f"{r['params']:,}", f"{lo:.0%}–{hi:.0%}")
    console.print(table)
    console.print("Ranges shown are the rules' bounds; `compress` narrows them with the MAG/SNIP/GraSP baselines.")


def _inspect_artifact(path: Path, console: Console, as_json: bool) -> None:
    from ..export.load import load_onnx_checked
    from ..export.metadata import describe_artifact

    if path.suffix != ".ort":  # ORT-format files are flatbuffers; describe_artifact loads those itself
        load_onnx_checked(path)
    elif not path.is_file():
        raise EdgepruneError(f"artifact not found: {path}")

    info = describe_artifact(path)
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    table = Table(title=str(path), show_header=False)
    table.add_column("key")
    table.add_column("value")
    for key, value in info.items():
        text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
        table.add_row(key, text if len(text) < 200 else text[:197] + "...")
    console.print(table)


def _inspect_run(path: Path, console: Console, as_json: bool) -> None:
    """A finished run: its report.json read back into the report schema, summarized as `compress` printed it."""
    from ..report import Report, SchemaError
    from ..schema import read_json_file
    from .compress import print_summary

    file = path / "report.json" if path.is_dir() else path
    if path.is_dir() and not file.exists():
        raise EdgepruneError(f"{path} has no report.json; pass the --out folder of a finished `edgeprune compress`")
    raw = read_json_file(file, "report")
    try:
        report = Report.from_dict(raw)
    except SchemaError as exc:
        raise EdgepruneError(
            f"{file} is not an edgeprune report this version reads ({exc}); inspect it with a JSON viewer"
        ) from None
    if as_json:
        print(report.to_json())
        return
    print_summary(report, console, file.parent)

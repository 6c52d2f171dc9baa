"""`edgeprune targets`: list the target profiles (built-in plus a user's file) as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ..targets import ENV_VAR, available_targets
from ._app import app


@app.command("targets")
def targets_command(
    targets_file: Path | None = typer.Option(
        None,
        "--targets-file",
        envvar=ENV_VAR,
        help=(
            "JSON file with extra profiles, e.g. "
            '{"my-board": {"base": "rpi4", "threads": 2, "description": "..."}}; '
            f"also read from ${ENV_VAR}."
        ),
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the profiles as JSON instead of a table."),
) -> None:
    """List target profiles: architecture, threads, channel multiple, INT8 format, opset."""
    targets = available_targets(targets_file)
    if as_json:
        typer.echo(json.dumps({name: t.to_dict() for name, t in targets.items()}, indent=2))
        return
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze into 80 columns
        console = Console(width=160)
    # On a narrow terminal the descriptions go below the table instead of being squeezed into it.
    wide = console.width >= 76 + max(len(t.description) for t in targets.values())
    table = Table(
        title="edgeprune target profiles",
        caption="thr: default threads · round: channel multiple for structured pruning · INT8?: INT8 by default",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1, 0, 0),
    )
    columns = ["name", "arch", "thr", "round", "INT8 format", "INT8?", "opset"]
    for col in columns + (["description"] if wide else []):
        table.add_column(col, no_wrap=col != "description", style="bold" if col == "name" else None)
    for t in targets.values():
        row = [t.name, t.arch, str(t.threads), str(t.round_to), t.int8_format, "yes" if t.int8_worth_it else "no"]
        row.append(str(t.opset))
        table.add_row(*(row + ([t.description] if wide else [])))
    console.print(table)
    if not wide:
        for t in targets.values():
            console.print(f"  [bold]{t.name}[/bold]: {t.description}", highlight=False)

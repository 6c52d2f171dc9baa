"""The Typer application shared by every sub-command module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="edgeprune",
    help="Prune a PyTorch vision model with Mix-and-Match sparsification and ship a verified ONNX artifact.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

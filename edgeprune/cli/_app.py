"""The Typer application shared by every sub-command module."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="edgeprune",
    help="Prune a PyTorch vision model with Mix-and-Match sparsification and ship a verified ONNX artifact.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Options shared by the commands that load a model (one declaration, the same help everywhere).
ModelOpt = Annotated[
    str, typer.Option(help="'demo', a timm name (resnet18, timm:vit_tiny_patch16_224) or pkg.mod:factory")
]
CheckpointOpt = Annotated[Path | None, typer.Option(help="state_dict to load (torch.load with weights_only=True)")]
PretrainedOpt = Annotated[bool, typer.Option(help="download timm's pretrained weights (needs internet)")]
NumClassesOpt = Annotated[int | None, typer.Option(help="classifier outputs (default: from the data)")]
InChansOpt = Annotated[int | None, typer.Option(help="input channels (default: from the data)")]
TargetOpt = Annotated[str, typer.Option(help="deployment target profile (see `edgeprune targets`)")]

"""Zero accounting: a model whose layer is not what the exporter writes fails naming that layer, in one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import Case, Outcome
from .runner import run_cli

# A factory module written into the scratch folder: its conv adds 1 to its weight inside forward, so the
# graph holds W + 1 (constant-folded), which is no copy, transpose or BN fold of the pruned W.
_SHIFTED = """
import torch
from torch import nn


class Shifted(nn.Conv2d):
    def forward(self, x):
        return nn.functional.conv2d(x, self.weight + 1.0, self.bias, self.stride, self.padding)


class Net(nn.Module):
    def __init__(self, num_classes=10, in_chans=1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_chans, 8, 3, padding=1), nn.ReLU(), Shifted(8, 8, 3, padding=1))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.features(x)).mean((2, 3)))


def build(num_classes=10, in_chans=1):
    return Net(num_classes, in_chans)
"""


def _run_shifted(s: Path) -> Outcome:
    module = "edgeprune_hostile_shifted"
    (s / f"{module}.py").write_text(_SHIFTED)
    here = os.getcwd()
    os.chdir(s)  # models.py imports pkg.mod:factory from the working directory
    try:
        return run_cli(
            [
                "compress",
                "--model",
                f"{module}:build",
                "--method",
                "mag",
                "--sparsity",
                "0.5",
                "--finetune-epochs",
                "0",
                "--calib-size",
                "32",
                "--eval-size",
                "32",
                "--quantize",
                "none",
                "--bench-runs",
                "1",
                "--out",
                str(s / "out"),
                "-q",
            ]
        )
    finally:
        os.chdir(here)
        sys.modules.pop(module, None)


CASES = [
    Case(
        name="zeros-weight-rewritten-in-forward",
        what="a `pkg.mod:factory` conv that uses `weight + 1` in forward: the graph holds no copy of the pruned weight",
        expect="layer features.2.weight is not in the exported graph",
        run=_run_shifted,
        slow=True,
    ),
]

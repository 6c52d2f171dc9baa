"""Example cases (a template for the other modules): bad numbers refused before anything loads."""

from __future__ import annotations

from . import Case

CASES = [
    Case(
        name="sparsity-above-one",
        what="`compress --sparsity 1.5`",
        expect="--sparsity must be in [0, 1)",
        argv=lambda s: ["compress", "--sparsity", "1.5", "--out", str(s / "out"), "-q"],
    ),
]

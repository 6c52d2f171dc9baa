"""Every hostile input and interruption in ``tests/hostile`` ends with one line, a non-zero exit, a clean --out."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hostile import ALL_CASES
from tests.hostile.runner import check


def test_enough_cases() -> None:
    assert len(ALL_CASES) >= 50, f"only {len(ALL_CASES)} hostile cases"


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in ALL_CASES]
)
def test_hostile(case, tmp_path: Path) -> None:
    check(case, tmp_path)

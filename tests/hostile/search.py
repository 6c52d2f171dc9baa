"""The Mix-and-Match search's own inputs (issue 15): Phase 1 baselines and the rules files' sparsity band."""

from __future__ import annotations

import json
from pathlib import Path

from . import Case


def _band_rules(band: object):
    def argv(s: Path) -> list[str]:
        path = s / "rules.json"
        path.write_text(json.dumps({"band": band, "rules": [{"roles": ["conv"], "range": [0.1, 0.5]}]}))
        return ["compress", "--rules", str(path), "--out", str(s / "out"), "-q"]

    return argv


CASES = [
    Case(
        name="search-range-baselines-unknown",
        what="`compress --range-baselines mag,obs` (no such baseline)",
        expect="unknown --range-baselines ['obs']",
        argv=lambda s: ["compress", "--range-baselines", "mag,obs", "--out", str(s / "out"), "-q"],
    ),
    Case(
        name="search-range-baselines-empty",
        what="`compress --range-baselines ,` (nothing to build the ranges from)",
        expect="--range-baselines is empty",
        argv=lambda s: ["compress", "--range-baselines", ",", "--out", str(s / "out"), "-q"],
    ),
    Case(
        name="search-rules-band-inverted",
        what='rules file with `"band": [0.6, 0.3]`',
        expect="must satisfy 0 <= min <= max < 1",
        argv=_band_rules([0.6, 0.3]),
    ),
    Case(
        name="search-rules-band-not-a-pair",
        what='rules file with `"band": "high"`',
        expect="'band' must be [min, max]",
        argv=_band_rules("high"),
    ),
    Case(
        name="search-rules-band-above-one",
        what='rules file with `"band": [0.5, 1.2]`',
        expect="band [0.5, 1.2] must satisfy",
        argv=_band_rules([0.5, 1.2]),
    ),
]

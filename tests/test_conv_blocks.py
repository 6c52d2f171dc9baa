"""benchmarks/conv_blocks: which widths run no faster than the next one (pure), and a tiny real run."""

from __future__ import annotations

import json

from edgeprune.benchmarks.lab.conv_blocks import main, steps


def test_steps_flags_widths_that_are_padded_up():
    # 8 runs as slow as 16 and 24 as 32 (16-channel blocks); 16 -> 24 and 32 -> 48 are real steps
    widths, ms = [8, 16, 24, 32, 48], [1.0, 0.98, 2.0, 2.05, 3.0]
    assert steps(widths, ms) == [8, 24]
    assert steps(widths, [1.0, 2.0, 3.0, 4.0, 5.0]) == []  # every width cheaper than the next
    assert steps([16], [1.0]) == []


def test_tiny_run_writes_latencies_for_every_width(tmp_path):
    assert main(["--widths", "8,16", "--sizes", "7", "--depth", "2", "--runs", "5", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "conv_blocks.json").read_text())
    assert r["widths"] == [8, 16] and r["machine"]["cores"] >= 1
    (row,) = r["rows"]
    assert row["input"] == 7 and all(v > 0 for v in row["ms_1t"].values()) and set(row["ms_1t"]) == {"8", "16"}
    assert "| 7 |" in (tmp_path / "conv_blocks.md").read_text()

"""benchmarks/lab/timing_protocol: a tiny real run over two convolution stacks and one fill model."""

from __future__ import annotations

import json

import torch
from edgeprune.benchmarks.lab.timing_protocol import PROTOCOLS, main
from edgeprune.export import export_onnx
from torch import nn


def test_tiny_run_times_every_protocol_and_the_wider_model_is_slower(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    paths = {}
    for name, width in (("dense", 64), ("model", 8), ("fill", 16)):
        net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))
        paths[name] = export_onnx(net.eval(), x, tmp_path / f"{name}.onnx").path
    argv = ["--dense", str(paths["dense"]), "--model", str(paths["model"]), "--fill", str(tmp_path / "*.onnx")]
    assert (
        main([*argv, "--threads", "1", "--runs", "20", "--burst", "5", "--repeats", "2", "--out", str(tmp_path)]) == 0
    )
    r = json.loads((tmp_path / "timing_protocol.json").read_text())
    assert [p.endswith("fill.onnx") for p in r["fill"]] == [True]  # dense and the pick are not their own fill
    assert {(x["spinning"], x["protocol"]) for x in r["rows"]} == {(s, p) for s in (True, False) for p in PROTOCOLS}
    for row in r["rows"]:
        assert row["models"] == (3 if row["protocol"] in ("interleaved", "burst") else 2)
        assert len(row["speedup"]) == 2 and all(s > 1.5 for s in row["speedup"])  # 64 vs 8 channels
    assert "| 1 | on |" in (tmp_path / "timing_protocol.md").read_text()

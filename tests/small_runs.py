"""Small real `compress` runs shared by test modules (each runs once per test session, on first use)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from edgeprune.pipeline import CompressConfig, compress
from edgeprune.report import Report

# one signal, no fine-tuning, few images and timing runs: the flow end to end in as little time as it allows
SMALL = dict(
    model="demo",
    data="demo",
    signals=("magnitude",),
    calib_size=128,
    eval_size=200,
    gradient_samples=64,
    finetune_epochs=0,
    bench_runs=3,
    threads=1,
)
CHANNEL = dict(SMALL, granularity="channel")


@functools.cache
def channel_int8() -> tuple[Report, Path]:
    """Channel mode on the demo shipping INT8 and ORT-format files."""
    out = Path(tempfile.mkdtemp(prefix="edgeprune-test-channel-")) / "out"
    return compress(CompressConfig(**CHANNEL, quantize="int8", ort_format=True, out=str(out))), out


@functools.cache
def unstructured_int8() -> tuple[Report, Path]:
    """Unstructured mode on the demo (one range baseline), shipping INT8 and sparse-packed files."""
    out = Path(tempfile.mkdtemp(prefix="edgeprune-test-unstructured-")) / "out"
    cfg = CompressConfig(**SMALL, range_baselines=("mag",), quantize="int8", pack="sparse", out=str(out))
    return compress(cfg), out

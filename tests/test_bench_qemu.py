"""`--device qemu-arm64`: the aarch64 onnxruntime build under QEMU gives the same outputs and accuracy."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from edgeprune.benchmarks.device import bench_artifacts, sample_input

from .test_bench import make_tiny_classifier, ort_logits

qemu = pytest.importorskip("edgeprune.benchmarks.qemu_arm64")


def _skip_reason() -> str | None:
    if not (shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")):
        return "qemu-user-static not installed (apt-get install qemu-user-static debootstrap)"
    if not qemu.QemuArm64(progress=None).is_ready() and not (
        shutil.which("debootstrap") or Path("/usr/sbin/debootstrap").exists()
    ):
        return "arm64 emulation not set up and debootstrap missing (apt-get install debootstrap)"
    # Otherwise the first bench on qemu-arm64 sets it up (once, ~1-2 min, cached): a failure there fails.
    return None


@pytest.mark.slow
@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_qemu_arm64_outputs_and_accuracy_match_local(tmp_path):
    a = make_tiny_classifier(tmp_path / "a.onnx", [32], seed=0)
    b = make_tiny_classifier(tmp_path / "b.onnx", [64, 16], seed=5)
    x = np.random.default_rng(6).standard_normal((32, 1, 4, 4)).astype(np.float32)
    y = ort_logits(a, x).argmax(1).astype(np.int64)
    sample = sample_input(a, batch=4)
    kw = dict(sample=sample, x=x, y=y, runs=2, warmup=0, return_outputs=True, timeout=300)
    local = bench_artifacts([a, b], "local", **kw)
    emu = bench_artifacts([a, b], "qemu-arm64", **kw)

    assert emu.emulated and emu.device["machine"] == "aarch64" and emu.device["emulated_cpu"]
    for out_local, out_emu in zip(local.outputs, emu.outputs, strict=True):
        assert out_emu.shape == (4, 4)
        np.testing.assert_allclose(out_emu, out_local, rtol=1e-4, atol=1e-5)
    assert [r["accuracy"] for r in emu.results] == [r["accuracy"] for r in local.results]
    assert emu.results[0]["accuracy"] == 1.0
    # Emulated timings are never presented as latency.
    for r in emu.results:
        assert r["latency_ms"] is None and r["ratio_to_first"] is None and r["cv"] is None
        assert r["emulated_timings_ms"]["p50"] > 0
    assert emu.to_dict()["emulated"] is True

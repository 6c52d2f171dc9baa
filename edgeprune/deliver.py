"""Deliver: from the selected (and dense) PyTorch model to every shipped file, verified and measured.

One step for both granularities (`deliver`): export ``model.onnx`` (and ``dense.onnx`` unless the caller
already exported it) → INT8 (``--quantize``) → packing (``--pack``) → ORT format (``--ort-format``), every
file checked as it is written (``export``'s parity and zero checks, ``ship_artifacts``' own checks) → one
interleaved benchmark of every artifact, with accuracy, on the ``--latency-from`` device. It returns a
`Delivery` whose rows fill the report's artifact table, `DenseSummary` and `SelectedSummary`.

`BenchDevice` is the ``--latency-from`` device as the searches use it too: channel mode times its probe,
latency model and candidates through `BenchDevice.time`, so a latency goal is met on the board. Under QEMU
emulation timings mean nothing: the search then times on this machine (and says so); the shipped
artifacts still run on the emulator for their outputs and accuracy.
"""

from __future__ import annotations

import copy
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .outdir import int8_name, is_int8_name
from .report import DenseSummary, SelectedSummary, ShippedArtifact
from .stages import Progress, Timings
from .targets import Target

ARM_MACHINES = ("aarch64", "arm64")
BENCH_WARMUP = 10


@dataclass(frozen=True)
class BenchDevice:
    """Where latency is measured: ``spec`` is ``local``, ``ssh://user@host[:port]`` or ``qemu-arm64``."""

    spec: str = "local"
    threads: int = 1
    identity: str | None = None
    ssh_options: tuple[str, ...] = ()
    remote_python: str = "python3"

    @classmethod
    def from_config(cls, cfg, threads: int) -> BenchDevice:
        return cls(cfg.latency_from, threads, cfg.identity, tuple(cfg.ssh_options), cfg.remote_python)

    @property
    def emulated(self) -> bool:
        return self.spec == "qemu-arm64" and platform.machine() not in ARM_MACHINES

    @property
    def remote(self) -> bool:
        return self.spec.startswith("ssh://")

    def search_timer(self) -> BenchDevice:
        """The device that times search candidates: this one, or this machine when it is only emulated."""
        return BenchDevice("local", self.threads) if self.emulated else self

    def bench(self, paths: list[Path], sample: np.ndarray, *, runs: int, warmup: int = BENCH_WARMUP, x=None, y=None):
        """`benchmarks.device.bench_artifacts` on this device (a separate runner process, peak RSS)."""
        from .benchmarks.device import bench_artifacts

        return bench_artifacts(
            [Path(p) for p in paths],
            self.spec,
            sample=sample,
            threads=self.threads,
            warmup=warmup,
            runs=runs,
            x=x,
            y=y,
            identity=self.identity,
            ssh_options=list(self.ssh_options),
            remote_python=self.remote_python,
        )

    def time(self, paths: list[Path], sample: np.ndarray, *, runs: int, warmup: int = BENCH_WARMUP) -> list[dict]:
        """Interleaved latency of ``paths`` (runner result dicts, in order), in a fresh runner process like the
        shipped files' benchmark, locally too (~0.3 s a call): timed inside the search's own process (torch,
        the progress display, an export just before) MobileNetV3's dense read 0.377 ms against 0.129 in the
        runner, so goals were decided on figures the shipped benchmark did not reproduce."""
        return self.bench(paths, sample, runs=runs, warmup=warmup).results

    def p50_runs(
        self, paths: list[Path], sample: np.ndarray, *, runs: int, repeats: int, warmup: int = 5
    ) -> list[list[float]]:
        """``repeats`` interleaved runs of ``paths``: each run's p50 (ms) of every model, in order."""
        return [
            [r["latency_ms"]["p50"] for r in self.time(paths, sample, runs=runs, warmup=warmup)] for _ in range(repeats)
        ]

    def p50s(self, paths: list[Path], sample: np.ndarray, *, runs: int, repeats: int, warmup: int = 5) -> list[float]:
        """Each model's p50 (ms), the median over ``repeats`` interleaved runs (one run swings by several %)."""
        per_run = self.p50_runs(paths, sample, runs=runs, repeats=repeats, warmup=warmup)
        return [float(np.median(col)) for col in zip(*per_run)]


@dataclass
class Delivery:
    """What `deliver` wrote and measured: one row per file, dense reference rows first."""

    artifacts: list[ShippedArtifact]
    bench: dict  # the device and the runner's raw results (BenchReport.to_dict)
    shipping: dict  # the selected model's INT8 / packing / ORT files (ShipResult.to_dict)
    parity_max_abs_diff: float
    onnx_zeros: int
    onnx_sparsity: float
    dense_onnx_bytes: int
    notes: list[str] = field(default_factory=list)

    def row(self, file: str) -> ShippedArtifact | None:
        return next((a for a in self.artifacts if a.file == file), None)

    def fill(self, dense: DenseSummary, selected: SelectedSummary) -> None:
        """The summaries' ONNX fields from the rows (``model.onnx``/``dense.onnx`` and their INT8 files)."""
        dense.onnx_bytes = self.dense_onnx_bytes
        for summary, stem in ((dense, "dense"), (selected, "model")):
            fp32, int8 = self.row(f"{stem}.onnx"), self.row(int8_name(f"{stem}.onnx"))
            summary.latency_ms, summary.onnx_accuracy = fp32.latency_ms, fp32.accuracy
            if int8 is not None:
                summary.int8_latency_ms, summary.int8_accuracy = int8.latency_ms, int8.accuracy
        selected.onnx = "model.onnx"
        selected.onnx_bytes = self.row("model.onnx").bytes
        selected.onnx_zeros, selected.onnx_sparsity = self.onnx_zeros, self.onnx_sparsity
        selected.parity_max_abs_diff = self.parity_max_abs_diff
        selected.shipping = self.shipping


def _export(model: nn.Module, path: Path, data, target: Target, metadata: dict[str, str], check_images: int):
    from .export import export_onnx

    example, check = data.eval_x[:1], data.eval_x[:check_images]
    return export_onnx(model, example, path, check_inputs=check, opset=target.opset, metadata=metadata)


def deliver(
    cfg,
    target: Target,
    data,
    staging: Path,
    model: nn.Module,
    metadata: dict[str, str],
    *,
    device: BenchDevice,
    test: tuple[torch.Tensor, torch.Tensor],
    dense: nn.Module | None = None,
    t=None,
    progress=None,
    check_images: int = 64,
) -> Delivery:
    """Export, ship and benchmark the selected ``model`` (and the ``dense`` reference) into ``staging``.

    ``test``: the test split's images and labels (``data.test_split(...)``, opened once the pick is made):
    every shipped file's accuracy is measured on them. Parity checks and INT8 calibration use the selection
    and calibration images (they decide nothing about the pick).

    ``dense``: the dense model to export as ``dense.onnx``; None when the caller already wrote it (channel
    mode times candidates against it). ``cfg`` gives ``quantize``, ``pack``, ``ort_format``, ``bench_runs``
    and the model name; ``t`` (`stages.Timings`) and ``progress`` are optional.
    """
    from .export.metadata import file_sizes
    from .export.ship import ship_artifacts

    t = t or Timings()
    progress = progress or Progress()
    check = data.eval_x[:check_images]
    with t("export"):
        progress.start("export + verify ONNX", total=2 if dense is not None else 1)
        res = _export(model, staging / "model.onnx", data, target, metadata, check_images)
        progress.advance()
        if dense is not None:
            meta = {"source_model": cfg.model, "strategy": "dense", "target": target.name}
            _export(copy.deepcopy(dense).eval(), staging / "dense.onnx", data, target, meta, check_images)
            progress.advance()
        progress.finish()
    dense_bytes = (staging / "dense.onnx").stat().st_size

    with t("ship"):
        progress.start("INT8 / packing / ORT format")
        kw = dict(target=target, quantize=cfg.quantize, ort_format=cfg.ort_format, calibration=data.calib_x[:256])
        dship = ship_artifacts(staging / "dense.onnx", pack="dense", check_inputs=check, **kw)
        ship = ship_artifacts(
            staging / "model.onnx", pack=cfg.pack, check_inputs=check, baseline=staging / "dense.onnx", **kw
        )
        progress.finish()

    # dense reference first: the runner's ratio_to_first is then each file's latency against dense.onnx
    rows = [("dense", p, "dense") for p in _files(dship)] + [("selected", p, ship.packing) for p in _files(ship)]
    notes = []
    timed = [(role, p, packing) for role, p, packing in rows if not (device.remote and p.suffix == ".ort")]
    if len(timed) < len(rows):  # the ssh runner stages files under .onnx names, which onnxruntime reads as protobuf
        notes.append(".ort files are sized, not timed, on an ssh:// device (time them with the device's ORT build)")
    with t("benchmark"):
        what = f"benchmark {len(timed)} artifacts on {device.spec} (onnxruntime, {device.threads} thread(s))"
        progress.start(what)
        x = test[0].numpy().astype(np.float32)
        report = device.bench(
            [p for _, p, _ in timed], x[:1], runs=cfg.bench_runs, x=x, y=test[1].numpy().astype(np.int64)
        )
        progress.finish()
    if report.emulated:
        notes.append(f"{device.spec} is emulated: accuracy is the device's, latency is not measured")
    measured = {str(p): r for (_, p, _), r in zip(timed, report.results, strict=True)}
    artifacts = []
    for role, path, packing in rows:
        r = measured.get(str(path), {})
        sizes = file_sizes(path)
        artifacts.append(
            ShippedArtifact(
                file=path.name,
                role=role,
                format=_format(path),
                packing=packing,
                bytes=sizes["bytes"],
                gzip_bytes=sizes["gzip_bytes"],
                accuracy=r.get("accuracy"),
                latency_ms=r.get("latency_ms"),
            )
        )
    return Delivery(
        artifacts=artifacts,
        bench=report.to_dict(),
        shipping=ship.to_dict(),
        parity_max_abs_diff=res.parity_max_abs_diff,
        onnx_zeros=res.zeros_onnx,
        onnx_sparsity=res.sparsity_onnx,
        dense_onnx_bytes=dense_bytes,
        notes=notes,
    )


def _files(ship) -> list[Path]:
    return [ship.fp32] + ([ship.int8] if ship.int8 is not None else []) + list(ship.ort)


def _format(path: Path) -> str:
    """``fp32`` | ``int8`` | ``fp32-ort`` | ``int8-ort``, from the names `ship_artifacts` gives."""
    precision = "int8" if is_int8_name(path.name) else "fp32"
    return f"{precision}-ort" if path.suffix == ".ort" else precision


def dense_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` holding the dense weights ``state`` (unstructured mode zeroes weights in place)."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return m.eval()

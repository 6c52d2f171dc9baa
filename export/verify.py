"""The verification gate: is this artifact the model it claims to be, and does it run on the target?

`verify_artifact` runs every check it can and returns a report; `require_ok` turns a failed report into
an `EdgepruneError`. Checks (each passes, fails, or is skipped with a reason):

- ``readable`` / ``onnx.checker``: the file parses and the graph is valid (on the densified twin of a
  sparse-packed file, whose int32 indices the checker does not accept);
- ``onnxruntime``: this machine's onnxruntime loads and runs it;
- ``weights``: the initializers hash to the digest recorded at export (any flipped byte fails);
- ``sparsity``: the zeros recounted from the weights are at least the recorded global sparsity;
- ``reference``: the outputs on the fixed reference input match those recorded at export;
- ``pytorch``: with the PyTorch model at hand, FP32 max |ONNX - PyTorch| <= tol (INT8: top-1 agreement,
  reported);
- ``arm64``: for an aarch64 target, the aarch64 onnxruntime under QEMU gives the same outputs as this
  machine's onnxruntime on the same inputs (and matches the reference).
"""

from __future__ import annotations

import json
import platform
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgeprune.errors import EdgepruneError

from .metadata import (
    REFERENCE_BATCH,
    load_artifact,
    read_metadata,
    reference_inputs,
    reference_mismatch,
    weights_digest,
)
from .onnx_export import make_session, max_abs_diff, run_onnx, run_torch
from .pack import unpack_dense
from .quantize import top1_agreement
from .sparsity import onnx_weight_sparsity

OUTPUTS_SCRIPT = Path(__file__).with_name("ort_outputs.py")
FP32_TOL = 1e-4
# x86_64 vs aarch64 onnxruntime: FP32 kernels differ in summation order only (measured ~2e-6 on logits);
# INT8 integer arithmetic is exact, requantization rounding may differ by one step in rare activations.
ARM_FP32_ATOL, ARM_FP32_RTOL = 1e-4, 1e-5
ARM_INT8_REL = 0.02  # of the output's max |value|
EXTRA_INPUTS = 6


@dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped
    detail: str

    @property
    def status(self) -> str:
        return {True: "ok", False: "FAILED", None: "skipped"}[self.ok]


@dataclass
class VerifyReport:
    path: Path
    format: str  # "onnx" or "ort"
    precision: str  # "fp32" or "int8"
    target: str | None
    checks: list[Check] = field(default_factory=list)
    arm64_max_abs_diff: float | None = None
    pytorch_max_abs_diff: float | None = None
    top1_agreement: float | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["ok"] = self.ok
        return d


def require_ok(report: VerifyReport) -> VerifyReport:
    """Raise `EdgepruneError` naming the first failed check."""
    if not report.ok:
        first = report.failures()[0]
        raise EdgepruneError(f"{report.path.name} failed verification: {first.name}: {first.detail}")
    return report


def _input_shape(session: Any, meta: dict[str, Any], batch: int) -> list[int]:
    ref = meta.get("reference")
    if isinstance(ref, dict) and "shape" in ref:
        return [batch, *ref["shape"][1:]]
    dims = session.get_inputs()[0].shape
    if any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
        raise EdgepruneError("the artifact's input shape is not fixed and it records none; pass --data")
    return [batch, *dims[1:]]


def verify_artifact(
    path: str | Path,
    *,
    target: str | None = None,
    inputs: np.ndarray | torch.Tensor | None = None,
    model: nn.Module | None = None,
    tol: float = FP32_TOL,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Check ``path`` (``.onnx`` or ``.ort``); see the module docstring for the checks.

    ``target``: a target profile name; an aarch64 target adds the emulated arm64 comparison.
    ``inputs``: real images (N, C, H, W) for the PyTorch and arm64 comparisons (default: fixed random
    inputs). ``model``: the PyTorch model the artifact came from, for the parity check.
    """
    path = Path(path)
    say = progress or (lambda _m: None)
    if target is not None:
        from edgeprune.targets import get_target

        get_target(target)  # an unknown target fails before any work
    if not path.is_file():
        raise EdgepruneError(f"artifact not found: {path}")
    fmt = "ort" if path.suffix == ".ort" else "onnx"
    report = VerifyReport(path=path, format=fmt, precision="?", target=target)
    checks = report.checks

    graph: onnx.ModelProto | None = None
    if fmt == "onnx":
        try:
            graph = load_artifact(path)
        except EdgepruneError as exc:
            checks.append(Check("readable", False, str(exc)))
            return report
        checks.append(Check("readable", True, f"{path.stat().st_size} bytes"))
        try:
            onnx.checker.check_model(unpack_dense(graph))
            checks.append(Check("onnx.checker", True, "graph is valid"))
        except Exception as exc:
            checks.append(Check("onnx.checker", False, str(exc).splitlines()[0][:200]))
        meta = read_metadata(graph)
        report.precision = "int8" if any(n.op_type == "DequantizeLinear" for n in graph.graph.node) else "fp32"
    else:
        meta = {}

    try:
        session = make_session(path, threads=1)
    except Exception as exc:
        checks.append(Check("onnxruntime", False, f"does not load: {str(exc).splitlines()[0][:200]}"))
        return report
    if fmt == "ort":
        meta = read_metadata(path)
        report.precision = str(meta.get("precision", "?"))

    if graph is not None:
        recorded = meta.get("weights_sha256")
        if recorded:
            same = recorded == weights_digest(graph)
            checks.append(
                Check(
                    "weights",
                    same,
                    "match the recorded digest"
                    if same
                    else "differ from the digest recorded at export: the file was modified or damaged",
                )
            )
        else:
            checks.append(Check("weights", None, "no digest recorded (not an edgeprune artifact?)"))
        if isinstance(meta.get("global_sparsity"), float):
            zeros, total = onnx_weight_sparsity(graph)
            got = zeros / max(1, total)
            ok = got >= meta["global_sparsity"] - 1e-6
            checks.append(Check("sparsity", ok, f"{got:.4f} recounted, {meta['global_sparsity']:.4f} recorded"))

    reference = meta.get("reference") if isinstance(meta.get("reference"), dict) else None
    try:
        shape = _input_shape(session, meta, REFERENCE_BATCH)
    except EdgepruneError as exc:
        if inputs is None:
            checks.append(Check("onnxruntime", False, str(exc)))
            return report
        shape = [REFERENCE_BATCH, *np.asarray(inputs).shape[1:]]
    ref_x = reference_inputs(shape)
    try:
        ref_out = run_onnx(session, ref_x)
        checks.append(Check("onnxruntime", True, f"loads and runs ({platform.machine()}, onnxruntime)"))
    except Exception as exc:
        checks.append(Check("onnxruntime", False, f"fails to run: {str(exc).splitlines()[0][:200]}"))
        return report
    if reference is not None:
        miss = reference_mismatch(reference, ref_out)
        checks.append(
            Check(
                "reference",
                miss <= 1.0,
                f"outputs within tolerance of the {reference.get('source', 'recorded')} reference"
                if miss <= 1.0
                else f"outputs are {miss:.3g}x the allowed distance from the recorded reference",
            )
        )
    else:
        checks.append(Check("reference", None, "no reference outputs recorded"))

    extra = _as_numpy(inputs) if inputs is not None else reference_inputs([EXTRA_INPUTS, *shape[1:]], seed=1)
    if list(extra.shape[1:]) != list(shape[1:]):
        raise EdgepruneError(
            f"the images are {'x'.join(map(str, extra.shape[1:]))} but the artifact takes "
            f"{'x'.join(map(str, shape[1:]))}; pass --image-size or other --data"
        )
    if model is not None:
        _check_pytorch(report, session, model, extra, tol)

    if target is not None:
        from edgeprune.targets import get_target

        arch = get_target(target).arch
        if arch == "aarch64":
            _check_arm64(report, path, session, ref_x, extra, reference, cache_dir, say)
        else:
            checks.append(Check("arm64", None, f"target {target} is {arch}"))
    return report


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_pytorch(report: VerifyReport, session: Any, model: nn.Module, x: np.ndarray, tol: float) -> None:
    from .onnx_export import _prepare

    net = _prepare(model)
    want = run_torch(net, torch.from_numpy(x))
    got = run_onnx(session, x)
    if report.precision == "int8":
        agreement = top1_agreement(got, want)
        report.top1_agreement = agreement
        finite = all(np.isfinite(g).all() for g in got)
        report.checks.append(Check("pytorch", finite, f"INT8 top-1 agreement with PyTorch {agreement:.3f}"))
        return
    diff = max_abs_diff(got, want)
    report.pytorch_max_abs_diff = diff
    report.checks.append(Check("pytorch", diff <= tol, f"max |onnx - pytorch| = {diff:.3g} (tol {tol:g})"))


def run_on_arm64(
    path: str | Path, x: np.ndarray, *, cache_dir: str | Path | None = None, timeout: float = 900
) -> tuple[list[np.ndarray], dict]:
    """Outputs of the aarch64 onnxruntime (emulated by QEMU on x86_64) for inputs ``x``."""
    from edgeprune.benchmarks.qemu_arm64 import qemu_python

    with tempfile.TemporaryDirectory(prefix="edgeprune-arm64-") as tmp:
        inputs, outputs = Path(tmp) / "x.npz", Path(tmp) / "y.npz"
        np.savez(inputs, x=np.ascontiguousarray(x, dtype=np.float32))
        try:
            proc = qemu_python(
                OUTPUTS_SCRIPT,
                [str(Path(path).absolute()), str(inputs), str(outputs)],
                cache_dir=cache_dir,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise EdgepruneError(f"the emulated arm64 run timed out after {timeout:g} s; use fewer inputs") from None
        info = _last_json(proc.stdout)
        if proc.returncode != 0 or info is None or "error" in info or not outputs.exists():
            why = (info or {}).get("error") or (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise _ArmRunError(f"aarch64 onnxruntime failed: {why[:300]}")
        with np.load(outputs) as data:
            result = [data[f"out{k}"] for k in range(len(data.files))]
    return result, info


class _ArmRunError(Exception):
    pass


def _last_json(stdout: str) -> dict | None:
    for line in reversed((stdout or "").strip().splitlines()):
        if line.strip().startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _check_arm64(
    report: VerifyReport,
    path: Path,
    session: Any,
    ref_x: np.ndarray,
    extra: np.ndarray,
    reference: dict | None,
    cache_dir: str | Path | None,
    say: Callable[[str], None],
) -> None:
    x = np.concatenate([ref_x, extra])
    say(f"running {path.name} with the aarch64 onnxruntime under QEMU ({len(x)} inputs; emulated, slow)")
    try:
        arm, info = run_on_arm64(path, x, cache_dir=cache_dir)
    except _ArmRunError as exc:
        report.checks.append(Check("arm64", False, str(exc)))
        return
    host = run_onnx(session, x)
    if len(arm) != len(host) or any(a.shape != h.shape for a, h in zip(arm, host, strict=False)):
        report.checks.append(Check("arm64", False, "aarch64 outputs have another shape than x86_64's"))
        return
    diff = max_abs_diff(arm, host)
    report.arm64_max_abs_diff = diff
    if report.precision == "int8":
        scale = max(float(np.max(np.abs(h), initial=0.0)) for h in host)
        allowed = ARM_INT8_REL * scale + 1e-5
    else:
        scale = max(float(np.max(np.abs(h), initial=0.0)) for h in host)
        allowed = ARM_FP32_ATOL + ARM_FP32_RTOL * scale
    ok = diff <= allowed
    detail = f"aarch64 vs {platform.machine()} max |diff| = {diff:.3g} (allowed {allowed:.3g}), {len(x)} inputs"
    detail += f", onnxruntime {info.get('onnxruntime')} emulated (QEMU, timings not measured)"
    if reference is not None:
        miss = reference_mismatch(reference, [a[: len(ref_x)] for a in arm])
        if miss > 1.0:
            ok = False
            detail += f"; aarch64 outputs are {miss:.3g}x the allowed distance from the recorded reference"
    report.checks.append(Check("arm64", ok, detail))

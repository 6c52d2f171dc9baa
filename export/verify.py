"""The verification gate: is this artifact the model it claims to be, and does it run on the target?

`verify_artifact` runs every check it can and returns a report; `require_ok` turns a failed report into
an `EdgepruneError`. Checks (each passes, fails, or is skipped with a reason):

- ``readable`` / ``onnx.checker``: the file parses and the graph is valid (on the densified twin of a
  sparse-packed file, whose int32 indices the checker does not accept);
- ``onnxruntime``: this machine's onnxruntime loads and runs it;
- ``weights``: the initializers hash to the digest recorded at export (any flipped byte fails);
- ``sparsity``: the zeros recounted from the weights are at least the recorded global sparsity;
- ``reference``: the outputs on the fixed reference input match those recorded at export (a malformed
  recorded reference, e.g. a missing tolerance or an unbounded input shape, fails this check);
- ``pytorch``: with the PyTorch model at hand, FP32 max |ONNX - PyTorch| / max(1, max |PyTorch|) <= tol,
  or within ``FLOAT_NOISE_FACTOR`` times PyTorch's own float32 error against float64 (measured only when
  the tolerance fails) (INT8: top-1 agreement, reported);
- ``arm64``: for an aarch64 target, the aarch64 onnxruntime under QEMU gives the same outputs as this
  machine's onnxruntime on the same inputs (and matches the reference).

Every comparison fails on a NaN or Inf in any output, naming the output and the side it came from, and
reports both the absolute and the scale-relative difference (rule: ``onnx_export.OutputDiff``).
"""

from __future__ import annotations

import dataclasses
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
    check_input_shape,
    check_reference_fits,
    load_artifact,
    parse_reference,
    read_metadata,
    reference_inputs,
    reference_mismatch,
    weights_digest,
)
from .onnx_export import (
    compare_outputs,
    float32_error,
    make_session,
    nonfinite_outputs,
    output_names,
    run_onnx,
    run_torch,
)
from .pack import unpack_dense
from .quantize import top1_agreement
from .sparsity import onnx_weight_sparsity

OUTPUTS_SCRIPT = Path(__file__).with_name("ort_outputs.py")
FP32_TOL = 1e-4  # on max |diff| / max(1, max |reference|): absolute for O(1) outputs, relative above
# x86_64 vs aarch64 onnxruntime, same rule: FP32 kernels differ in summation order only (measured ~2e-6 on
# logits); INT8 integer arithmetic is exact, requantization rounding may differ by one step in rare
# activations, hence 2 % of the output's max |value| (as before; now floored at an absolute 0.02 for
# outputs below 1, where one requantization step is not smaller).
ARM_FP32_TOL = 1e-4
ARM_INT8_TOL = 0.02
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
    arm64_max_rel_diff: float | None = None  # max |diff| / max(1, max |x86_64 output|), per output
    pytorch_max_rel_diff: float | None = None  # max |diff| / max(1, max |PyTorch output|), per output

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


def _input_shape(session: Any, reference: dict[str, Any] | None, batch: int) -> list[int]:
    """The input shape to run, batch set to ``batch``: the recorded reference's, else the graph's own.

    Both come from the file: the recorded shape must agree with every fixed dimension of the graph, and
    either must be bounded (`check_input_shape`) before anything is allocated.
    """
    dims = session.get_inputs()[0].shape
    if reference is not None:
        shape = reference["shape"]
        check_reference_fits(shape, list(dims))
        return [batch, *shape[1:]]
    if any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
        raise EdgepruneError("the artifact's input shape is not fixed and it records none; pass --data")
    fix = "export the model at a smaller input size"
    return [batch, *check_input_shape([batch, *dims[1:]], "the graph's input shape", fix)[1:]]


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
        elif "global_sparsity" in meta:
            recorded = str(meta["global_sparsity"])[:40]
            checks.append(Check("sparsity", False, f"the recorded global_sparsity '{recorded}' is not a number"))

    # A malformed recorded reference (or one whose shape does not fit the graph) fails its check, and the
    # run goes on with the graph's own input shape, so the other checks still report.
    reference: dict[str, Any] | None = None
    reference_problem = ""
    if "reference" in meta:
        try:
            reference = parse_reference(meta["reference"])
            shape = _input_shape(session, reference, REFERENCE_BATCH)
        except EdgepruneError as exc:
            reference, reference_problem = None, str(exc)
    if reference is None:
        try:
            shape = _input_shape(session, None, REFERENCE_BATCH)
        except EdgepruneError as exc:
            if inputs is None:
                if reference_problem:
                    checks.append(Check("reference", False, reference_problem))
                checks.append(Check("onnxruntime", False, str(exc)))
                return report
            given = list(np.shape(inputs))
            shape = [REFERENCE_BATCH, *check_input_shape(given, "the images' shape", "pass smaller images")[1:]]
    ref_x = reference_inputs(shape)
    try:
        ref_out = run_onnx(session, ref_x)
        checks.append(Check("onnxruntime", True, f"loads and runs ({platform.machine()}, onnxruntime)"))
    except Exception as exc:
        checks.append(Check("onnxruntime", False, f"fails to run: {str(exc).splitlines()[0][:200]}"))
        return report
    names = output_names(session)
    nonfinite = nonfinite_outputs(ref_out, side="onnxruntime", names=names)
    if reference_problem:
        checks.append(Check("reference", False, reference_problem))
    elif nonfinite:
        checks.append(Check("reference", False, f"{nonfinite} on the reference input"))
    elif reference is not None:
        miss = reference_mismatch(reference, ref_out)
        checks.append(
            Check(
                "reference",
                miss <= 1.0,
                f"outputs within tolerance of the {reference['source']} reference"
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
    diff = compare_outputs(got, want, names=output_names(session))
    if report.precision == "int8":
        # INT8 is judged by top-1 agreement (its error is quantization, not a fault); NaN/Inf still fails.
        agreement = top1_agreement(got, want)
        report.top1_agreement = agreement
        detail = f"INT8 top-1 agreement with PyTorch {agreement:.3f}"
        if diff.nonfinite_side:
            report.checks.append(Check("pytorch", False, f"{diff.problem}; {detail}"))
        else:
            report.checks.append(Check("pytorch", True, detail))
        return
    if not diff.problem and not diff.within(tol):  # over the tolerance: more than the model's float noise?
        diff = dataclasses.replace(diff, float32_error=float32_error(net, torch.from_numpy(x)))
    report.pytorch_max_abs_diff, report.pytorch_max_rel_diff = diff.max_abs_diff, diff.max_rel_diff
    report.checks.append(Check("pytorch", diff.within(tol), f"onnx vs pytorch: {diff.describe(tol)}"))


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
    here = platform.machine()
    diff = compare_outputs(arm, host, got_side="aarch64", want_side=here, names=output_names(session))
    if diff.problem:
        report.checks.append(Check("arm64", False, f"aarch64 vs {here}: {diff.problem}"))
        return
    report.arm64_max_abs_diff, report.arm64_max_rel_diff = diff.max_abs_diff, diff.max_rel_diff
    tol = ARM_INT8_TOL if report.precision == "int8" else ARM_FP32_TOL
    ok = diff.within(tol)
    detail = f"aarch64 vs {here}: {diff.describe(tol)}, {len(x)} inputs"
    detail += f", onnxruntime {info.get('onnxruntime')} emulated (QEMU, timings not measured)"
    if reference is not None:
        miss = reference_mismatch(reference, [a[: len(ref_x)] for a in arm])
        if miss > 1.0:
            ok = False
            detail += f"; aarch64 outputs are {miss:.3g}x the allowed distance from the recorded reference"
    report.checks.append(Check("arm64", ok, detail))

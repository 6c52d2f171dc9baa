"""PyTorch -> ONNX, simplified without losing a zero, checked against PyTorch, written atomically.

Exporter choice: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``). With torch 2.14
the dynamo exporter needs ``onnxscript`` (not a dependency here) and it does not fold BatchNorm into the
convolution at export; the TorchScript exporter exports timm CNNs, ViT and Swin in well under a second
each, folds eval-mode BatchNorm into Conv weights (which keeps zeros as zeros), keeps dynamic batch, and
names initializers after the PyTorch parameters where it can.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn.utils import parametrize

from edgeprune.errors import EdgepruneError, UnsupportedModelError

from .diverge import first_divergence
from .metadata import (
    FLOAT_NOISE_FACTOR,
    PREFIX,
    REFERENCE_BATCH,
    parity_entry,
    reference_entry,
    reference_inputs,
    set_metadata,
    weights_digest,
)
from .sparsity import TorchWeightCount, ZeroAccount, account_zeros, onnx_weight_sparsity, torch_weight_sparsity

log = logging.getLogger(__name__)

MIN_OPSET = 17
PARITY_BATCH = 64  # inputs are compared in chunks of this many, to bound memory
# float64 convolutions are slow on CPU: the float noise is measured on at most this many check inputs (a
# noise estimate from fewer inputs is, if anything, lower: stricter, never laxer)
NOISE_INPUTS = 16


@dataclasses.dataclass
class ExportResult:
    path: Path
    onnx_bytes: int
    opset: int
    zeros_torch: int  # zeros in the prunable (conv/linear/matmul) weights of the PyTorch model, biases excluded
    zeros_onnx: int  # the same count over the ONNX initializers
    prunable_torch: int
    prunable_onnx: int
    parity_max_abs_diff: float  # max |onnxruntime - PyTorch| over the check inputs
    simplified: bool  # whether the simplifier's graph was kept
    bn_fold_extra_zeros: int = 0  # zeros added by folding a BatchNorm with scale exactly 0 (expected)
    simplifier: str = ""  # "onnxsim", "onnxslim" or "" (none)
    # max |onnxruntime - PyTorch| / max(1, max |PyTorch|) per output (the gated figure, see `OutputDiff`)
    parity_max_rel_diff: float = 0.0
    # max |float32 - float64 PyTorch| on the check inputs, measured only when the tolerance alone failed
    parity_float32_error: float | None = None

    @property
    def sparsity_torch(self) -> float:
        return self.zeros_torch / max(1, self.prunable_torch)

    @property
    def sparsity_onnx(self) -> float:
        return self.zeros_onnx / max(1, self.prunable_onnx)


def _prepare(model: nn.Module) -> nn.Module:
    """A CPU, eval-mode copy with masks folded in: the caller's model is never touched."""
    model = copy.deepcopy(model).cpu().eval()
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _flatten_outputs(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten_outputs(o)]
    raise UnsupportedModelError(f"model output of type {type(out).__name__} cannot be exported to ONNX")


def _torch_export(
    model: nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool, n_outputs: int
) -> onnx.ModelProto:
    output_names = ["logits"] if n_outputs == 1 else [f"output{i}" for i in range(n_outputs)]
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {"input": {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about Python-bool tracing in
        # timm's shape asserts; neither changes the graph for a fixed input size.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        except Exception as exc:  # the exporter raises many types; all mean "this model can't be exported"
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedModelError(f"torch.onnx.export failed for this model: {msg[:300]}") from exc
    return onnx.load_from_string(buffer.getvalue())


def _simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Try onnxsim, then onnxslim; return the input unchanged if neither works."""
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
        if ok:
            return simplified, "onnxsim"
        log.warning("onnxsim could not validate its simplified graph; trying onnxslim")
    except Exception as exc:  # a simplifier failure must never fail the export
        log.warning("onnxsim failed (%s); trying onnxslim", exc)
    try:
        import onnxslim

        return onnxslim.slim(copy.deepcopy(model)), "onnxslim"
    except Exception as exc:
        log.warning("onnxslim failed (%s); keeping the unsimplified graph", exc)
    return model, ""


def _zeros_match(onnx_model: onnx.ModelProto, counted: TorchWeightCount) -> tuple[ZeroAccount, int, int]:
    """Each PyTorch weight followed into the graph (`account_zeros`), plus the graph's (zeros, total).

    Per weight rather than totals: BN folded into a conv, a Linear stored transposed, a weight stored
    twice all change the initializers without changing a single zero, and totals could not tell those
    from a lost zero balanced by a gained one.
    """
    zeros, total = onnx_weight_sparsity(onnx_model)
    return account_zeros(onnx_model, counted), zeros, total


def make_session(model: onnx.ModelProto | bytes | str | Path, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session (full graph optimisation, as deployed)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else max(1, torch.get_num_threads())
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    if isinstance(source, Path):
        source = str(source)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, inputs: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    """Run ``session`` over ``inputs`` in chunks; returns every output concatenated over the batch."""
    array = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    array = array.astype(np.float32, copy=False)
    if len(array) == 0:
        raise EdgepruneError("no input images to run the model on; pass at least one image")
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else PARITY_BATCH
    chunks = []
    for i in range(0, len(array), step):
        batch = array[i : i + step]
        rows = len(batch)
        if rows < step and step != PARITY_BATCH:  # a graph exported with a fixed batch: pad the last one
            batch = np.concatenate([batch, np.zeros((step - rows, *batch.shape[1:]), batch.dtype)])
        chunks.append([out[:rows] for out in session.run(None, {name: batch})])
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]


@torch.no_grad()
def run_torch(model: nn.Module, inputs: torch.Tensor) -> list[np.ndarray]:
    if len(inputs) == 0:
        raise EdgepruneError("no input images to run the model on; pass at least one image")
    outs = [_flatten_outputs(model(inputs[i : i + PARITY_BATCH])) for i in range(0, len(inputs), PARITY_BATCH)]
    return [torch.cat([o[k] for o in outs]).numpy() for k in range(len(outs[0]))]


def output_names(session: ort.InferenceSession) -> list[str]:
    return [o.name for o in session.get_outputs()]


@dataclasses.dataclass(frozen=True)
class OutputDiff:
    """How far one set of model outputs (``got``) is from another (``want``, the reference side).

    The rule, per output k (each output has its own scale, e.g. logits next to probabilities):

    - ``abs_k = max |got_k - want_k|`` and ``rel_k = abs_k / max(1, max |want_k|)``;
    - ``max_abs_diff`` / ``max_rel_diff`` are the largest ``abs_k`` / ``rel_k`` over the outputs.

    A check with tolerance ``tol`` passes iff ``max_rel_diff <= tol``: an absolute ``tol`` where outputs
    are O(1) (|values| <= 1), and ``tol`` relative to the output's largest magnitude above that, so
    float32 rounding on logits of ~1e3 (one ulp is ~6e-5) is not mistaken for an unfaithful graph.
    ``problem`` is set (and both numbers are ``inf``) when the outputs cannot be compared: a different
    number or shape of outputs, or a NaN/Inf on either side (NaN never compares, so it must not pass).
    """

    max_abs_diff: float
    max_rel_diff: float
    problem: str = ""
    nonfinite_side: str = ""  # which side had NaN/Inf ("" when none)
    worst: str = ""  # the output with the largest relative difference, e.g. "output 0 ('logits')"
    float32_error: float | None = None  # the reference's own float32 error, when measured (`float32_error`)

    def within(self, tol: float) -> bool:
        """The tolerance, or (when ``float32_error`` was measured) float noise: max |diff| at most
        `FLOAT_NOISE_FACTOR` times the reference model's own float32 error against float64."""
        if self.problem:
            return False
        noise = self.float32_error
        return self.max_rel_diff <= tol or (noise is not None and self.max_abs_diff <= FLOAT_NOISE_FACTOR * noise)

    def describe(self, tol: float | None = None) -> str:
        if self.problem:
            return self.problem
        text = f"max |diff| {self.max_abs_diff:.3g} ({self.max_rel_diff:.3g} relative to the output scale"
        if tol is not None:
            text += f", tol {tol:g}"
        if self.float32_error is not None:
            text += f"; PyTorch's own float32 error {self.float32_error:.3g}, x{FLOAT_NOISE_FACTOR:g} allowed"
        return text + ")"


def _nonfinite(x: np.ndarray) -> str:
    """'' for an all-finite array, else e.g. '3 NaN and 1 Inf values'."""
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.complexfloating):
        return ""
    if np.isfinite(x).all():
        return ""
    nan = int(np.isnan(x).sum())
    inf = int(x.size - nan - np.isfinite(x).sum())
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    return " and ".join(p for p in parts if p) + (" value" if nan + inf == 1 else " values")


def _label(k: int, names: list[str] | None) -> str:
    return f"output {k} ('{names[k]}')" if names and k < len(names) else f"output {k}"


def nonfinite_outputs(outputs: list[np.ndarray], *, side: str, names: list[str] | None = None) -> str:
    """'' if every output is finite, else which one is not, e.g. "onnxruntime output 1 ('prob') has 3 NaN values"."""
    for k, x in enumerate(outputs):
        what = _nonfinite(np.asarray(x))
        if what:
            return f"{side} {_label(k, names)} has {what}"
    return ""


def compare_outputs(
    got: list[np.ndarray],
    want: list[np.ndarray],
    *,
    got_side: str = "onnxruntime",
    want_side: str = "PyTorch",
    names: list[str] | None = None,
) -> OutputDiff:
    """``got`` against ``want`` by the rule in `OutputDiff` (NaN/Inf on either side is a named problem)."""
    inf = float("inf")
    if len(got) != len(want):
        return OutputDiff(inf, inf, f"{got_side} gives {len(got)} outputs, {want_side} {len(want)}")

    worst_abs = worst_rel = 0.0
    worst = ""
    for k, (x, y) in enumerate(zip(got, want, strict=True)):
        x, y = np.asarray(x), np.asarray(y)
        bad = [(side, what) for side, what in ((want_side, _nonfinite(y)), (got_side, _nonfinite(x))) if what]
        if bad:
            side, what = bad[0]
            also = f" ({bad[1][0]}'s too)" if len(bad) > 1 else ""
            return OutputDiff(inf, inf, f"{side} {_label(k, names)} has {what}{also}", nonfinite_side=side)
        if x.shape != y.shape:
            shapes = f"{got_side} shape {list(x.shape)} vs {want_side} {list(y.shape)}"
            return OutputDiff(inf, inf, f"{_label(k, names)}: {shapes}")
        if not x.size:
            continue
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        diff = float(np.max(np.abs(x64 - y64)))
        scale = float(np.max(np.abs(y64)))
        worst_abs = max(worst_abs, diff)
        if not worst or diff / max(1.0, scale) > worst_rel:
            worst_rel, worst = diff / max(1.0, scale), _label(k, names)
    return OutputDiff(worst_abs, worst_rel, worst=worst)


@torch.no_grad()
def float32_error(net: nn.Module, inputs: torch.Tensor) -> float | None:
    """Max |float32 PyTorch - float64 PyTorch| over every output on ``inputs`` (the first `NOISE_INPUTS`):
    how far the model's own float32 arithmetic is from exact, the floor any float32 runtime can be held to.
    Deep random-weight or re-parameterised nets carry large activations that cancel into small outputs, so
    this can exceed an absolute 1e-4 on O(1) logits. None when the model cannot run in float64 (a
    float32-only code path) or when two float32 runs differ: a forward that is not a function of its input
    (a random draw, a counter) has no float noise floor, and its gap to ONNX must not be excused as one."""
    inputs = inputs[:NOISE_INPUTS]
    first = run_torch(net, inputs)
    if compare_outputs(first, run_torch(net, inputs)).max_abs_diff != 0.0:
        return None
    try:
        exact = run_torch(copy.deepcopy(net).double(), inputs.double())
    except (RuntimeError, TypeError, ValueError):
        return None
    diff = compare_outputs(first, exact)
    return None if diff.problem else diff.max_abs_diff


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Max |a - b| over every output; ``inf`` if they differ in count or shape or hold a NaN/Inf."""
    return compare_outputs(a, b).max_abs_diff


def write_atomic(model: onnx.ModelProto, path: Path) -> int:
    """Serialize ``model`` to ``path`` via a temporary name in the same folder; returns the size in bytes."""
    data = model.SerializeToString()
    return write_bytes_atomic(data, path)


def write_bytes_atomic(data: bytes, path: Path) -> int:
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise EdgepruneError(f"cannot write {path}: {exc.strerror or exc}; choose a writable output folder") from None
    return len(data)


def _check_writable(path: Path) -> None:
    """Fail before the slow work if the artifact's folder cannot be created or written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgepruneError(f"cannot write {path}: {exc.strerror or exc}; choose a writable output folder") from None
    if not os.access(path.parent, os.W_OK):
        raise EdgepruneError(f"cannot write {path}: folder is not writable; choose a writable output folder")


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    *,
    check_inputs: torch.Tensor | None = None,
    opset: int = 17,
    simplify: bool = True,
    dynamic_batch: bool = True,
    tol: float = 1e-4,
    metadata: dict[str, str] | None = None,
) -> ExportResult:
    """Export ``model`` to ``path`` and verify it; raise `EdgepruneError`, leaving no file, if a check fails.

    Checks: ``onnx.checker``; the zeros of every prunable weight survive export and simplification (a
    simplified graph that changes the count is discarded for the unsimplified one); onnxruntime matches
    PyTorch on ``check_inputs`` (default ``example``): every output finite, and max |diff| within ``tol``
    times ``max(1, max |PyTorch output|)`` (absolute for O(1) outputs, relative for large logits; see
    `OutputDiff`). Both figures are returned and recorded in the artifact (``edgeprune.parity``).
    """
    path = Path(path)
    if opset < MIN_OPSET:
        raise EdgepruneError(f"ONNX opset {opset} is too old; use --opset {MIN_OPSET} or newer")
    if not isinstance(example, torch.Tensor) or example.ndim < 2:
        raise EdgepruneError("the example input must be a batched tensor (N, C, H, W)")
    _check_writable(path)
    net = _prepare(model)
    example = example.detach().cpu().float()
    check = example if check_inputs is None else check_inputs.detach().cpu().float()

    counted = torch_weight_sparsity(net, example)
    n_outputs = len(_flatten_outputs(net(example)))
    exported = _torch_export(net, example, opset, dynamic_batch, n_outputs)

    account, zeros, total = _zeros_match(exported, counted)
    if not account.ok:
        raise UnsupportedModelError(account.problem)

    final, used = exported, ""
    if simplify:
        candidate, used = _simplify(exported)
        if used:
            # The simplifier must keep every weight's zeros, and the graph's counts (what verify recounts).
            account_s, zeros_s, total_s = _zeros_match(candidate, counted)
            if account_s.ok and (zeros_s, total_s) == (zeros, total):
                final = candidate
            else:
                log.warning(
                    "%s changed the weight zeros (%d of %d -> %d of %d%s); keeping the unsimplified graph",
                    used,
                    zeros,
                    total,
                    zeros_s,
                    total_s,
                    "" if account_s.ok else f": {account_s.problem}",
                )
                used = ""
    zeros, total = onnx_weight_sparsity(final)
    # onnxsim records its own run in metadata_props (long lists of removed nodes): not the user's business.
    kept = [p for p in final.metadata_props if not p.key.startswith("onnxsim.")]
    del final.metadata_props[:]
    final.metadata_props.extend(kept)

    _check_valid(final)
    try:
        parity = parity_check(net, final, check, tol, diagnose=final is exported)
    except ParityError as exc:
        if final is exported:
            raise
        # The simplifier rewrote the graph into one onnxruntime computes differently: the exporter's own graph
        # may still be faithful (parity_check then returns) and ships instead; if not, its error names the
        # diverging layer (module boundaries are the exporter's, before the simplifier moved constants).
        _check_valid(exported)
        parity = parity_check(net, exported, check, tol)
        log.warning("%s changed the outputs (%s); keeping the unsimplified graph", used, exc)
        final, used = exported, ""
        zeros, total = onnx_weight_sparsity(final)
    # Metadata enters neither the weights digest nor the outputs, so it is written after the check, once: the
    # embedded reference allows the float noise parity passed on, when it did.
    set_metadata(final, _self_check_metadata(net, final, example, counted, metadata or {}, parity.float32_error))
    entry = parity_entry(parity.max_abs_diff, parity.max_rel_diff, tol, len(check), parity.float32_error)
    set_metadata(final, {PREFIX + "parity": entry})
    size = write_atomic(final, path)
    return ExportResult(
        path=path,
        onnx_bytes=size,
        opset=opset,
        zeros_torch=counted.zeros,
        zeros_onnx=zeros,
        prunable_torch=counted.total,
        prunable_onnx=total,
        parity_max_abs_diff=parity.max_abs_diff,
        parity_max_rel_diff=parity.max_rel_diff,
        parity_float32_error=parity.float32_error,
        simplified=bool(used),
        bn_fold_extra_zeros=zeros - counted.zeros,
        simplifier=used,
    )


def _self_check_metadata(
    net: nn.Module,
    graph: onnx.ModelProto,
    example: torch.Tensor,
    counted: TorchWeightCount,
    metadata: dict[str, str],
    float32_noise: float | None = None,
) -> dict[str, str]:
    """Caller's metadata plus what makes the artifact checkable on its own (see `edgeprune.export.metadata`).

    ``float32_noise``: the model's own float32 error where parity passed as float noise; the embedded
    reference's ``atol`` then allows `FLOAT_NOISE_FACTOR` times it (at least 1e-4), so that `verify` on
    another onnxruntime does not fail the same rounding that export accepted."""
    from edgeprune import __version__

    shape = [REFERENCE_BATCH, *example.shape[1:]]
    x = torch.from_numpy(reference_inputs(shape))
    reference = run_torch(net, x)
    atol = 1e-4
    if float32_noise is not None:
        noise = max(float32_noise, float32_error(net, x) or 0.0)  # the reference inputs' own noise too
        atol = max(atol, FLOAT_NOISE_FACTOR * noise)
    # Keys without a namespace are edgeprune's ("strategy" -> "edgeprune.strategy").
    given = {(k if "." in k else PREFIX + k): str(v) for k, v in metadata.items()}
    entries = {
        PREFIX + "version": __version__,
        PREFIX + "global_sparsity": f"{counted.zeros / max(1, counted.total):.6f}",
        **given,
        PREFIX + "precision": "fp32",
        PREFIX + "packing": "dense",
        PREFIX + "weights_sha256": weights_digest(graph),
        PREFIX + "reference": reference_entry(shape, reference, atol=atol, rtol=1e-5, source="pytorch"),
    }
    return entries


def _check_valid(graph: onnx.ModelProto) -> None:
    """``onnx.checker`` on the graph that will ship; an invalid one is an unsupported model, in one line."""
    try:
        onnx.checker.check_model(graph)
    except onnx.checker.ValidationError as exc:
        raise UnsupportedModelError(f"the exported ONNX graph is invalid: {str(exc).splitlines()[0]}") from exc


class ParityError(EdgepruneError):
    """onnxruntime does not reproduce PyTorch's outputs."""


def _diverging(net: nn.Module, graph: onnx.ModelProto, inputs: torch.Tensor, tol: float) -> str:
    """``"; first diverging layer ..."`` for the message, or "" when none can be named."""
    try:
        found = first_divergence(net, graph, inputs, tol)
    except Exception:  # noqa: BLE001 - a diagnosis must never hide the parity failure it explains
        return ""
    return f"; {found.describe()}" if found else ""


def parity_check(
    net: nn.Module,
    onnx_model: onnx.ModelProto,
    inputs: torch.Tensor,
    tol: float,
    diagnose: bool = True,
) -> OutputDiff:
    """onnxruntime against PyTorch on ``inputs`` (rule: `OutputDiff`); raise `ParityError` unless every
    output is finite and the max relative difference is at most ``tol``. With ``diagnose`` the error names the
    first module whose output diverges (`diverge.first_divergence`; meaningful on the exporter's own graph: a
    simplifier moves constants across module boundaries, e.g. GELU's 0.5 into the next Conv)."""
    try:
        session = make_session(onnx_model)
    except Exception as exc:
        raise UnsupportedModelError(f"onnxruntime cannot load the exported graph: {exc}") from exc
    result = compare_outputs(run_onnx(session, inputs), run_torch(net, inputs), names=output_names(session))
    if not result.problem and not result.within(tol):  # over the tolerance: is it more than float noise?
        result = dataclasses.replace(result, float32_error=float32_error(net, inputs))
    if result.nonfinite_side == "PyTorch":
        raise EdgepruneError(
            f"ONNX parity check failed: {result.problem} on the check inputs; the model itself is not finite "
            "there, check its weights (or checkpoint) and the input normalization"
        )

    def where() -> str:  # computed only on a failure: it runs the graph once more
        return _diverging(net, onnx_model, inputs, tol) if diagnose else ""

    if result.problem:
        raise ParityError(f"ONNX parity check failed: {result.problem}{where()}; the export is not faithful")
    if not result.within(tol):
        noise = result.float32_error
        floor = (
            f", nor within {FLOAT_NOISE_FACTOR:g}x PyTorch's own float32 error ({noise:.3g} against float64)"
            if noise is not None
            else ""
        )
        raise ParityError(
            f"ONNX {result.worst or 'output'} differs from PyTorch by {result.max_abs_diff:.3g} "
            f"({result.max_rel_diff:.3g} relative to the output scale, > {tol:g} allowed{floor})"
            f"{where()}; the export is not faithful"
        )
    return result

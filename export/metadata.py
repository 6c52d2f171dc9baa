"""What an artifact says about itself: ``metadata_props`` written at export, read back and rechecked.

Every key edgeprune writes starts with ``edgeprune.``. Two keys make an artifact self-checking, so
``edgeprune verify`` can tell a corrupted file from a good one without the PyTorch model:

- ``edgeprune.weights_sha256``: a digest of every initializer (sparse ones densified first, so a packed
  artifact has the digest of its dense-stored twin);
- ``edgeprune.reference``: the model's outputs on a fixed pseudo-random input (numpy seed, shape), as
  PyTorch (FP32) or onnxruntime at quantization time (INT8) computed them, with the tolerance to use.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgeprune import __version__
from edgeprune.errors import EdgepruneError

from .sparsity import _sparse_to_dense, onnx_layer_sparsity, onnx_weight_sparsity, prunable_onnx_weights

PREFIX = "edgeprune."
# Keys whose values are JSON (decoded by `read_metadata`) or numbers.
_JSON_KEYS = {"layer_sparsity", "reference", "parity"}
_FLOAT_KEYS = {"global_sparsity"}
_INT_KEYS = {"calibration_size", "selection_size", "test_size", "split_seed", "opset"}
REFERENCE_SEED = 0
REFERENCE_BATCH = 2
# onnxruntime may differ from float32 PyTorch by up to this many times PyTorch's own float32 error (against
# float64) and pass: two float32 runs that round in different orders (BN folded, branches merged) differ by
# up to about twice each one's error; a real fault (a wrong or lost weight) is orders of magnitude above.
FLOAT_NOISE_FACTOR = 4.0
REFERENCE_MAX_VALUES = 2048
# The reference input's shape comes from the file: bound it before allocating (a crafted
# [2, 100000, 100000, 100000] would ask numpy for petabytes). 2**24 values per image is a 3x2364x2364
# image, far above any edge model's input; rank 2 to 8 covers (N, features) to video-like inputs.
MAX_INPUT_VALUES = 1 << 24
MAX_INPUT_RANK = 8


def build_metadata(
    *,
    source_model: str = "",
    strategy: str = "",
    signal: str = "",
    global_sparsity: float | None = None,
    layer_sparsity: dict[str, float] | None = None,
    target: str = "",
    calibration_size: int | None = None,
    **extra: Any,
) -> dict[str, str]:
    """The ``edgeprune.*`` metadata entries for an artifact, as strings ready for ``export_onnx(metadata=...)``.

    ``layer_sparsity`` maps PyTorch layer names to their fraction of zeros. ``extra`` keys are added with
    the same prefix (dicts and lists JSON-encoded).
    """
    fields: dict[str, Any] = {
        "version": __version__,
        "source_model": source_model,
        "strategy": strategy,
        "signal": signal,
        "target": target,
    }
    if global_sparsity is not None:
        fields["global_sparsity"] = f"{float(global_sparsity):.6f}"
    if layer_sparsity is not None:
        fields["layer_sparsity"] = json.dumps({k: round(float(v), 6) for k, v in layer_sparsity.items()})
    if calibration_size is not None:
        fields["calibration_size"] = int(calibration_size)
    fields.update(extra)
    return {
        PREFIX + k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        for k, v in fields.items()
        if v is not None
    }


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Insert or replace ``metadata_props`` entries (values stored as strings)."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, str(value)


def raw_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _parse(key: str, value: str) -> Any:
    short = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    try:
        if short in _JSON_KEYS:
            return json.loads(value)
        if short in _FLOAT_KEYS:
            number = float(value)
            return number if np.isfinite(number) else value  # "nan" / "inf" are no sparsity
        if short in _INT_KEYS:
            return int(value)
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        return value  # a hand-edited or foreign value: show it as is
    return value


def read_metadata(path_or_model: str | Path | onnx.ModelProto) -> dict[str, Any]:
    """All ``metadata_props`` of an artifact; ``edgeprune.`` prefix dropped, JSON and numbers decoded.

    Reads ``.ort`` files through onnxruntime. Keys from other tools are kept under their own names.
    """
    if isinstance(path_or_model, onnx.ModelProto):
        raw = raw_metadata(path_or_model)
    elif Path(path_or_model).suffix == ".ort":
        raw = _ort_metadata(Path(path_or_model))
    else:
        raw = raw_metadata(load_artifact(path_or_model, load_weights=False))
    return {(k[len(PREFIX) :] if k.startswith(PREFIX) else k): _parse(k, v) for k, v in raw.items()}


def _ort_metadata(path: Path) -> dict[str, str]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def load_artifact(path: str | Path, *, load_weights: bool = True) -> onnx.ModelProto:
    """``onnx.load`` with a user-facing error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise EdgepruneError(f"artifact not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # protobuf raises DecodeError and friends on a damaged file
        raise EdgepruneError(f"{path} is not a readable ONNX model ({type(exc).__name__}); re-export it") from None


def weights_digest(model: onnx.ModelProto) -> str:
    """SHA-256 over every initializer's name, dtype, shape and values (sparse ones densified)."""
    arrays: dict[str, np.ndarray] = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for sparse in model.graph.sparse_initializer:
        arrays[sparse.values.name] = _sparse_to_dense(sparse)
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        if np.issubdtype(a.dtype, np.floating):
            # -0.0 (a zero weight times a negative BN scale) and 0.0 are the same weight; sparse storage
            # keeps neither, so hash them alike.
            a = np.where(a == 0, np.zeros((), a.dtype), a)
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def reference_inputs(shape: list[int] | tuple[int, ...], seed: int = REFERENCE_SEED) -> np.ndarray:
    """The fixed input the embedded reference outputs were computed on (reproducible without torch)."""
    return np.random.RandomState(seed).standard_normal(tuple(shape)).astype(np.float32)


def reference_entry(shape: list[int], outputs: list[np.ndarray], atol: float, rtol: float, source: str) -> str:
    return json.dumps(
        {
            "seed": REFERENCE_SEED,
            "shape": [int(d) for d in shape],
            "atol": atol,
            "rtol": rtol,
            "source": source,
            # Only the first values of each output: enough to catch a wrong graph, small for big outputs.
            # 7 significant digits: exact enough for a 1e-5 relative tolerance, and short.
            "outputs": [
                [float(f"{v:.7g}") for v in np.asarray(o, dtype=np.float32).ravel()[:REFERENCE_MAX_VALUES]]
                for o in outputs
            ],
        }
    )


def parity_entry(
    max_abs_diff: float, max_rel_diff: float, tol: float, inputs: int, float32_error: float | None = None
) -> str:
    """``edgeprune.parity``: the FP32 export's check against PyTorch (rule: ``export.onnx_export.OutputDiff``).

    It says ``"precision": "fp32"`` because companions (INT8, packed) copy the FP32 file's metadata.
    ``float32_error``: PyTorch's own float32 error against float64, present when the check passed as float
    noise (over ``tol``, within ``FLOAT_NOISE_FACTOR`` times it).
    """
    entry = {
        "vs": "pytorch",
        "precision": "fp32",
        "inputs": int(inputs),
        "max_abs_diff": float(f"{max_abs_diff:.4g}"),
        "max_rel_diff": float(f"{max_rel_diff:.4g}"),
        "rule": "max|onnx-pytorch| / max(1, max|pytorch|) per output <= tol, "
        f"or max|onnx-pytorch| <= {FLOAT_NOISE_FACTOR:g} x max|pytorch float32 - float64| (float noise)",
        "tol": tol,
    }
    if float32_error is not None:
        entry["float32_error"] = float(f"{float32_error:.4g}")
    return json.dumps(entry)


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_input_shape(
    shape: Any,
    what: str = "the recorded input shape",
    fix: str = "the artifact's metadata was edited or damaged; re-export it",
) -> list[int]:
    """``shape`` as a list of ints if it is a plausible input shape (rank 2-8, dims >= 1, bounded size).

    Anything else (the shape is read from a file that may be crafted) is an `EdgepruneError` naming it.
    The batch dimension (first) is not counted: callers replace it with their own.
    """
    if (
        not isinstance(shape, (list, tuple))
        or not 2 <= len(shape) <= MAX_INPUT_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    ):
        raise EdgepruneError(f"{what} {_short(shape)} is not a list of 2 to {MAX_INPUT_RANK} integers; {fix}")
    if any(d < 1 for d in shape[1:]):
        raise EdgepruneError(f"{what} {_short(shape)} has a dimension below 1; {fix}")
    values = 1
    for d in shape[1:]:
        values *= d
    if values > MAX_INPUT_VALUES:
        raise EdgepruneError(
            f"{what} {_short(shape)} is too large ({values:.3g} values per input, at most {MAX_INPUT_VALUES:,}); {fix}"
        )
    return [int(d) for d in shape]


def check_reference_fits(shape: list[int], dims: list[Any]) -> None:
    """Raise unless the recorded ``shape`` has the graph input's rank and every fixed dim of ``dims``.

    ``dims``: the graph's input dims, ints > 0 where fixed (anything else is free); none known: no check.
    """
    fixed = [d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None for d in dims]
    pairs = zip(fixed[1:], shape[1:], strict=False)
    if dims and (len(shape) != len(dims) or any(f is not None and f != d for f, d in pairs)):
        graph = ["?" if f is None else f for f in fixed]
        raise EdgepruneError(
            f"the recorded reference input shape {_short(shape)} does not fit the graph's input {graph}; "
            "the artifact's metadata was edited or damaged, re-export it"
        )


def _tolerance(reference: dict[str, Any], key: str) -> float:
    value = reference.get(key)
    if value is None:
        raise EdgepruneError(f"the recorded reference has no '{key}' tolerance; re-export the artifact")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise EdgepruneError(
            f"the recorded reference's '{key}' is {_short(value)}, not a finite number >= 0; re-export the artifact"
        )
    return float(value)


def parse_reference(reference: Any) -> dict[str, Any]:
    """The decoded ``edgeprune.reference`` entry, validated: shape, tolerances and outputs.

    Returns ``{"shape", "atol", "rtol", "outputs" (float64 arrays), "source"}``; raises `EdgepruneError`
    (one line, naming the bad field) for JSON that did not decode, a missing or non-numeric field, a
    shape that is not a plausible (bounded) input shape, or recorded outputs that are not finite numbers.
    """
    if isinstance(reference, str):
        raise EdgepruneError("the recorded reference (edgeprune.reference) is not valid JSON; re-export the artifact")
    if not isinstance(reference, dict):
        raise EdgepruneError(f"the recorded reference is {_short(reference)}, not a JSON object; re-export it")
    if "shape" not in reference:
        raise EdgepruneError("the recorded reference has no input 'shape'; re-export the artifact")
    shape = check_input_shape(reference["shape"], "the recorded reference input shape")
    atol, rtol = _tolerance(reference, "atol"), _tolerance(reference, "rtol")
    if atol == 0:  # the allowed distance would be 0 where the expected value is 0: nothing could pass
        raise EdgepruneError("the recorded reference's 'atol' is 0; re-export the artifact")
    raw = reference.get("outputs")
    # Arrays: a reference this function already parsed (it is idempotent).
    if not isinstance(raw, list) or not all(isinstance(o, (list, np.ndarray)) for o in raw):
        raise EdgepruneError("the recorded reference's 'outputs' is not a list of value lists; re-export the artifact")
    outputs = []
    for k, values in enumerate(raw):
        numeric = (
            np.issubdtype(values.dtype, np.number)
            if isinstance(values, np.ndarray)
            else all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        )
        if not numeric:
            raise EdgepruneError(f"the recorded reference output {k} holds non-numbers; re-export the artifact")
        array = np.asarray(values, dtype=np.float64).ravel()
        if not np.isfinite(array).all():
            raise EdgepruneError(f"the recorded reference output {k} holds NaN or Inf; re-export the artifact")
        outputs.append(array)
    source = reference.get("source")
    return {
        "shape": shape,
        "atol": atol,
        "rtol": rtol,
        "outputs": outputs,
        "source": source if isinstance(source, str) else "recorded",
    }


def reference_mismatch(reference: dict[str, Any], outputs: list[np.ndarray]) -> float:
    """How far ``outputs`` (on `reference_inputs`) are from the embedded reference, in units of its tolerance.

    <= 1 means within tolerance; ``inf`` when the number or size of outputs differs, or an output holds a
    NaN or Inf. A malformed reference (see `parse_reference`) raises `EdgepruneError`.
    """
    reference = parse_reference(reference)
    expected = reference["outputs"]
    if len(expected) != len(outputs):
        return float("inf")
    worst = 0.0
    for want, got in zip(expected, outputs, strict=True):
        got = np.asarray(got, dtype=np.float64).ravel()[: want.size]
        if got.size != want.size or not np.isfinite(got).all():
            return float("inf")
        allowed = reference["atol"] + reference["rtol"] * np.abs(want)
        ratio = np.abs(got - want) / allowed
        if np.isnan(ratio).any():
            return float("inf")
        worst = max(worst, float(ratio.max(initial=0.0)))
    return worst


def file_sizes(path: str | Path) -> dict[str, int]:
    """Raw bytes and gzip -9 bytes of a file (what a download or an OTA update costs)."""
    data = Path(path).read_bytes()
    return {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, compresslevel=9, mtime=0))}


def _io_desc(values: Any) -> list[dict[str, Any]]:
    out = []
    for v in values:
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in v.type.tensor_type.shape.dim]
        out.append(
            {"name": v.name, "shape": dims, "dtype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)}
        )
    return out


def describe_artifact(path: str | Path) -> dict[str, Any]:
    """Everything ``edgeprune inspect model.onnx`` prints: sizes, I/O, metadata, and sparsity recounted.

    ``recount`` is computed from the weights themselves; ``checks`` compares it (and the weights digest)
    with what the metadata claims. A ``.ort`` file gives sizes, I/O and metadata only.
    """
    path = Path(path)
    if not path.is_file():
        raise EdgepruneError(f"artifact not found: {path}")
    info: dict[str, Any] = {"path": str(path), **file_sizes(path)}
    if path.suffix == ".ort":
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EdgepruneError(f"{path} is not a loadable ORT-format model: {str(exc)[:200]}") from None
        raw = dict(session.get_modelmeta().custom_metadata_map)
        info["format"] = "ort"
        info["inputs"] = [{"name": i.name, "shape": i.shape, "dtype": i.type} for i in session.get_inputs()]
        info["outputs"] = [{"name": o.name, "shape": o.shape, "dtype": o.type} for o in session.get_outputs()]
        info["metadata"] = {(k[len(PREFIX) :] if k.startswith(PREFIX) else k): _parse(k, v) for k, v in raw.items()}
        return info

    model = load_artifact(path)
    meta = read_metadata(model)
    zeros, total = onnx_weight_sparsity(model)
    layers = onnx_layer_sparsity(model)
    weights = prunable_onnx_weights(model)
    info.update(
        {
            "format": "onnx",
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "precision": "int8" if any(n.op_type == "DequantizeLinear" for n in model.graph.node) else "fp32",
            "packing": "sparse" if len(model.graph.sparse_initializer) else "dense",
            "inputs": _io_desc(model.graph.input),
            "outputs": _io_desc(model.graph.output),
            "metadata": meta,
            "recount": {
                "zeros": zeros,
                "prunable": total,
                "sparsity": zeros / total if total else 0.0,
                "layers": [
                    {"name": name, "shape": list(weights[name].shape), "sparsity": layers[name]} for name in layers
                ],
            },
        }
    )
    checks: dict[str, Any] = {}
    if "weights_sha256" in meta:
        checks["weights_sha256_ok"] = meta["weights_sha256"] == weights_digest(model)
    if isinstance(meta.get("global_sparsity"), float) and total:
        # The recorded figure is PyTorch's; BN folding can add zeros, never remove them.
        checks["sparsity_recorded"] = meta["global_sparsity"]
        checks["sparsity_ok"] = zeros / total >= meta["global_sparsity"] - 1e-6  # stored with 6 decimals
    if "reference" in meta:
        try:
            shape = parse_reference(meta["reference"])["shape"]
            if model.graph.input:
                check_reference_fits(shape, info["inputs"][0]["shape"])
        except EdgepruneError as exc:  # shown, not raised: inspect describes damaged files too
            checks["reference_ok"], checks["reference_problem"] = False, str(exc)
    info["checks"] = checks
    return info

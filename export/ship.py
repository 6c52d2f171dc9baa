"""From a verified FP32 ``model.onnx`` to everything shipped beside it: INT8, sparse packing, ORT format.

One function, `ship_artifacts`, shared by ``edgeprune export`` and ``edgeprune compress`` (flags
``--quantize``, ``--pack``, ``--ort-format``). Every file it writes is checked before it lands (see
`quantize_int8`, `pack_sparse`, `to_ort_format`); the first failed check raises `EdgepruneError`.

Names follow the FP32 file's stem: ``model.onnx`` -> ``model.int8.onnx``, ``model.ort``, ``model.int8.ort``
(``dense.onnx`` -> ``dense.int8.onnx`` ...), by `outdir.int8_name` and `outdir.ort_name`: the names
``--out`` knows as edgeprune's (`outdir.MANAGED_NAMES`) come from the same two functions. With
``pack="sparse"`` the ONNX files themselves are rewritten with sparse initializers (after the ORT files,
which onnxruntime stores its own way, were made).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeprune.errors import EdgepruneError
from edgeprune.outdir import int8_name, ort_name
from edgeprune.targets import Target, get_target

from .metadata import PREFIX, file_sizes, load_artifact
from .pack import floor_bytes, pack_sparse, to_ort_format
from .quantize import QuantizeResult, onnx_accuracy, quantize_int8

QUANTIZE_CHOICES = ("int8", "none")
PACK_CHOICES = ("dense", "sparse")


@dataclass
class ArtifactSize:
    bytes: int
    gzip_bytes: int
    ratio: float  # bytes / the dense FP32 baseline's bytes
    gzip_ratio: float
    floor_bytes: int | None  # nonzero prunable weights at (value + 4 index) bytes: packing's lower bound
    floor_ratio: float | None


@dataclass
class ShipResult:
    fp32: Path
    int8: Path | None = None
    ort: list[Path] = field(default_factory=list)
    packing: str = "dense"
    quantize: QuantizeResult | None = None
    fp32_accuracy: float | None = None  # through onnxruntime on the evaluation images, if given
    int8_accuracy: float | None = None
    baseline_bytes: int = 0  # the size the ratios are relative to
    sizes: dict[str, ArtifactSize] = field(default_factory=dict)  # file name -> sizes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("fp32", "int8"):
            d[key] = str(d[key]) if d[key] is not None else None
        d["ort"] = [str(p) for p in self.ort]
        if self.quantize is not None:
            d["quantize"]["path"] = str(self.quantize.path)
        return d


def default_quantize(target: Target) -> str:
    return "int8" if target.int8_worth_it else "none"


def _as_numpy(x: np.ndarray | torch.Tensor | None) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def ship_artifacts(
    fp32_path: str | Path,
    *,
    target: str | Target = "arm64",
    quantize: str | None = None,
    pack: str = "dense",
    ort_format: bool = False,
    calibration: np.ndarray | torch.Tensor | None = None,
    check_inputs: np.ndarray | torch.Tensor | None = None,
    eval_x: np.ndarray | torch.Tensor | None = None,
    eval_y: np.ndarray | torch.Tensor | None = None,
    baseline: str | Path | None = None,
) -> ShipResult:
    """Write the INT8 / ORT / packed companions of the verified FP32 artifact ``fp32_path``, in its folder.

    ``quantize``: "int8", "none", or None for the target profile's default (``int8_worth_it``), in the
    profile's ``int8_format``; needs ``calibration`` images. ``eval_x``/``eval_y`` add FP32 and INT8
    accuracy through onnxruntime. Size ratios are relative to ``baseline`` (e.g. ``dense.onnx``; default:
    the dense-stored ``fp32_path`` itself).
    """
    fp32_path = Path(fp32_path)
    profile = target if isinstance(target, Target) else get_target(target)
    quantize = quantize or default_quantize(profile)
    if quantize not in QUANTIZE_CHOICES:
        raise EdgepruneError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got '{quantize}'")
    if pack not in PACK_CHOICES:
        raise EdgepruneError(f"--pack must be one of {', '.join(PACK_CHOICES)}, got '{pack}'")
    folder = fp32_path.parent
    result = ShipResult(fp32=fp32_path, packing=pack)
    result.baseline_bytes = (Path(baseline) if baseline else fp32_path).stat().st_size

    if quantize == "int8":
        if calibration is None or len(calibration) == 0:
            raise EdgepruneError("INT8 quantization needs calibration images; pass --data or use --quantize none")
        result.int8 = folder / int8_name(fp32_path.name)
        result.quantize = quantize_int8(
            fp32_path,
            result.int8,
            calibration,
            int8_format=profile.int8_format,
            check_inputs=check_inputs,
            metadata={PREFIX + "target": profile.name},
        )

    x, y = _as_numpy(eval_x), _as_numpy(eval_y)
    if x is not None and y is not None:
        result.fp32_accuracy = onnx_accuracy(fp32_path, x, y)
        if result.int8 is not None:
            result.int8_accuracy = onnx_accuracy(result.int8, x, y)

    onnx_files = [fp32_path] + ([result.int8] if result.int8 is not None else [])
    if ort_format:
        result.ort = [to_ort_format(p, folder / ort_name(p.name), arch=profile.arch) for p in onnx_files]

    floors = {p.name: floor_bytes(load_artifact(p)) for p in onnx_files}
    if pack == "sparse":
        for path in onnx_files:
            pack_sparse(path, path)  # checked against the dense-stored file before it replaces it
    for path in onnx_files + result.ort:
        sizes = file_sizes(path)
        floor = floors.get(path.name)
        result.sizes[path.name] = ArtifactSize(
            bytes=sizes["bytes"],
            gzip_bytes=sizes["gzip_bytes"],
            ratio=sizes["bytes"] / result.baseline_bytes,
            gzip_ratio=sizes["gzip_bytes"] / result.baseline_bytes,
            floor_bytes=floor,
            floor_ratio=floor / result.baseline_bytes if floor is not None else None,
        )
    return result

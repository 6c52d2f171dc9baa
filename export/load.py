"""Loading an ONNX file the user named, with one-line errors for everything that is not a usable model.

``onnx.load`` parses an empty file (or any bytes protobuf happens to accept) as an empty ``ModelProto``, so
a text file or a zero-byte file would reach onnxruntime or the graph code and fail there with a traceback.
``load_onnx_checked`` refuses them here: not a file, not ONNX, an empty graph, no inputs.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from edgeprune.errors import EdgepruneError


def load_onnx_checked(path: str | Path, *, load_weights: bool = False) -> onnx.ModelProto:
    """The model in ``path``; raises `EdgepruneError` (one line) unless it is an ONNX graph with an input.

    ``load_weights``: also read external-data files (default: the graph and inline initializers only).
    """
    path = Path(path)
    if not path.exists():
        raise EdgepruneError(f"artifact not found: {path}")
    if not path.is_file():
        raise EdgepruneError(f"artifact {path} is not a file; pass an .onnx file")
    if path.stat().st_size == 0:
        raise EdgepruneError(f"artifact {path} is empty (0 bytes); re-export it")
    try:
        model = onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-as-error, … on bytes that are not ONNX
        raise EdgepruneError(f"{path} is not an ONNX model ({type(exc).__name__}); pass an .onnx file") from None
    if not model.HasField("graph") or not model.graph.node:
        raise EdgepruneError(f"{path} is not a usable ONNX model: its graph has no nodes; re-export it")
    weights = {init.name for init in model.graph.initializer}
    if not [i for i in model.graph.input if i.name not in weights]:
        raise EdgepruneError(f"{path} is not a usable ONNX model: its graph has no inputs; re-export it")
    return model

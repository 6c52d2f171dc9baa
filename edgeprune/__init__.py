"""edgeprune: Mix-and-Match layer-wise pruning of PyTorch vision models into verified ONNX edge artifacts."""

from __future__ import annotations

__version__ = "0.1.0"

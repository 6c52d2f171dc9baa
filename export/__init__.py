"""edgeprune.export: ONNX export with zeroed or compacted weights, simplified, verified against PyTorch."""

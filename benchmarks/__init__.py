"""edgeprune.benchmarks: latency, accuracy, size and sparsity of ONNX artifacts, locally or on a device."""

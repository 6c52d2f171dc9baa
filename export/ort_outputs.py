"""Run one ONNX/ORT model on inputs from an .npz and save every output: self-contained, for any CPU.

Needs only the standard library, numpy and onnxruntime, so the same file runs on this machine and, under
QEMU, with the aarch64 build of onnxruntime (``edgeprune verify --target arm64``):

    python3 ort_outputs.py MODEL INPUTS.npz OUTPUTS.npz

``INPUTS.npz`` holds one array, ``x`` (float32, N x ...). ``OUTPUTS.npz`` gets ``out0``, ``out1``, ...
One JSON line on stdout says where it ran; on failure, ``{"error": ...}`` and exit code 1.
"""

from __future__ import annotations

import json
import platform
import sys


def run(model: str, inputs: str, outputs: str, batch: int = 16) -> dict:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    x = np.load(inputs)["x"].astype(np.float32)
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else batch
    chunks = []
    for i in range(0, len(x), step):
        part = x[i : i + step]
        rows = len(part)
        if rows < step and step != batch:  # fixed-batch graph: pad the last chunk, keep the real rows
            part = np.concatenate([part, np.zeros((step - rows,) + part.shape[1:], part.dtype)])
        chunks.append([out[:rows] for out in session.run(None, {name: part})])
    results = [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]
    np.savez(outputs, **{f"out{k}": r for k, r in enumerate(results)})
    return {"machine": platform.machine(), "onnxruntime": ort.__version__, "outputs": len(results), "rows": len(x)}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        info = run(*argv)
    except Exception as exc:  # report any failure as JSON: the caller shows it to the user
        print(json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:500]}", "machine": platform.machine()}))
        return 1
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

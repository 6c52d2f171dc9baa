"""The paper's LeViT and the fused / re-parameterisable families go through compress -> export -> parity -> zeros.

Random init (``pretrained=False``), demo data at a small input size, magnitude signal, no fine-tuning:
the export stage itself checks parity and follows every pruned weight's zeros into the graph
(`account_zeros`), so a report coming back is the pass. Before issue 18, LeViT crashed in the zero
count (IndexError) and SE / re-param families could fail the totals check.
"""

from __future__ import annotations

import pytest
import torch
from edgeprune.export import onnx_weight_sparsity

from edgeprune.pipeline import CompressConfig, compress

torch.set_num_threads(1)

FAMILIES = [
    ("levit_128s", 64),  # attention biases, Linear + BatchNorm1d (LinearNorm)
    ("mobilenetv3_small_050", 32),  # squeeze-excitation (1x1 convs on pooled maps), hard-swish
    ("mobileone_s0", 32),  # re-parameterisable: parallel conv+BN branches and BN identity, unfused
]


@pytest.mark.parametrize(("model", "size"), FAMILIES)
def test_family_compresses_exports_and_keeps_zeros(model, size, tmp_path):
    out = tmp_path / "out"
    report = compress(
        CompressConfig(
            model=model,
            image_size=size,
            calib_size=32,
            eval_size=32,
            signals=("magnitude",),
            sparsity=0.5,
            finetune_epochs=0,
            quantize="none",
            bench_runs=1,
            batch_size=32,
            out=str(out),
        )
    )
    selected = report.selected
    assert selected.sparsity >= 0.5 - 1e-3
    # The export's own parity check passed (it raises otherwise); random-init activations are large,
    # so the absolute difference is only required to be finite here.
    assert selected.parity_max_abs_diff is not None and selected.parity_max_abs_diff < float("inf")
    zeros, total = onnx_weight_sparsity(out / "model.onnx")
    assert zeros == selected.onnx_zeros
    assert zeros / total >= 0.5 - 1e-3  # every pruned zero is in the artifact

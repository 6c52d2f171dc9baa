"""Which channel widths buy latency on this CPU: a stack of 3x3 convolutions timed at a range of widths.

    python -m edgeprune.benchmarks.lab.conv_blocks --out benchmarks/results

onnxruntime's CPU convolutions work on blocks of channels (MLAS NCHWc: 16 floats per AVX-512 register, 8 per
AVX2 register). A width between two multiples of the block is padded up and runs as slow as the next multiple,
so pruning to it costs accuracy and buys nothing: the target profile's ``round_to`` should be the block. This
benchmark shows the steps: ``--depth`` convs (+ReLU) of ``--widths`` channels in and out, at each ``--sizes``
input, 1 thread, all widths interleaved. Writes ``conv_blocks.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from edgeprune.benchmarks.lab.common import LATENCY_ORDER
from edgeprune.benchmarks.machine import command_line, machine_info, write_results
from edgeprune.benchmarks.runner import median_p50
from edgeprune.export import export_onnx
from torch import nn


class ConvStack(nn.Module):
    """``depth`` 3x3 convs of ``width`` channels on the first ``width`` channels of the input: every width
    takes the same input shape, so all of them are timed interleaved in one run."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.width = width
        self.convs = nn.Sequential(
            *(nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()) for _ in range(depth))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x[:, : self.width])


def steps(widths: list[int], ms: list[float], tolerance: float = 0.1) -> list[int]:
    """Widths that run no faster than the next wider one (within ``tolerance``): pruning down to them buys
    nothing over stopping at the wider width."""
    return [w for w, t, t_next in zip(widths, ms, ms[1:], strict=False) if t >= t_next * (1 - tolerance)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="8,12,16,20,24,32,40,48,64")
    p.add_argument("--sizes", default="28,14,7", help="input heights/widths")
    p.add_argument("--depth", type=int, default=4, help="convolutions in the stack")
    p.add_argument("--runs", type=int, default=400)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    widths = [int(v) for v in args.widths.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeprune-conv-blocks-") as tmp:
        for size in (int(v) for v in args.sizes.split(",")):
            x = torch.randn(1, max(widths), size, size)
            paths = [Path(tmp) / f"w{w}_{size}.onnx" for w in widths]
            for w, path in zip(widths, paths, strict=True):
                export_onnx(ConvStack(w, args.depth).eval(), x, path, check_inputs=x)
            ms = median_p50(paths, x.numpy(), 1, args.runs)
            rows.append(
                {
                    "input": size,
                    "ms_1t": dict(zip(map(str, widths), ms, strict=True)),
                    "no_faster_than_next": steps(widths, ms),
                }
            )
    result = {
        "command": command_line("edgeprune.benchmarks.lab.conv_blocks", argv),
        "depth": args.depth,
        "widths": widths,
        "rows": rows,
        "latency_order": LATENCY_ORDER,
        "machine": machine_info(),
    }
    m = result["machine"]
    lines = [
        "# Which channel widths buy latency: conv_blocks",
        "",
        f"Command: `{result['command']}`. {args.depth} 3x3 convolutions (+ReLU), width channels in and out, batch 1, "
        f"onnxruntime p50, 1 thread, all widths interleaved ({LATENCY_ORDER}). Machine: {m['cpu']}, "
        f"{m['cores']} cores, onnxruntime {m['versions'].get('onnxruntime')}.",
        "",
        "| input px | " + " | ".join(f"{w} ch ms" for w in widths) + " | no faster than the next width |",
        "|---:|" + "---:|" * len(widths) + "---|",
        *[
            f"| {r['input']} | "
            + " | ".join(f"{r['ms_1t'][str(w)]:.3f}" for w in widths)
            + f" | {', '.join(map(str, r['no_faster_than_next'])) or '—'} |"
            for r in rows
        ],
        "",
    ]
    write_results(Path(args.out), "conv_blocks", result, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

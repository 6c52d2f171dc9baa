"""Where channel pruning buys latency: the structured benchmark's selected widths, with chosen stages kept whole.

    python -m edgeprune.benchmarks.lab.width_latency --keep layer1 --keep layer1.,layer2. --out benchmarks/results

Reads the selected architecture's widths (``group_widths``) from a ``structured_speed_<model>.json``,
rebuilds it with ``compact`` (magnitude ranking; latency does not depend on which channels go), and times it
against dense and against variants in which the groups whose name starts with any ``--keep`` prefix keep all
their channels — at each ``--sizes`` input, 1 and 2 threads, all models interleaved. No training: this
answers how much of the MAC reduction each stage turns into speed, not what accuracy it costs.
Writes ``width_latency_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from edgeprune.benchmarks.lab.common import speedup_at_sizes
from edgeprune.benchmarks.machine import command_line, machine_info, write_results

from edgeprune.models import load_model
from edgeprune.structured import GroupGraph, compact, group_scores, units_to_remove


def variants(widths: dict[str, int], full: dict[str, int], keeps: list[str]) -> dict[str, dict[str, int]]:
    """The selected widths, then one variant per ``--keep`` (comma-separated name prefixes kept whole)."""
    out = {"selected": dict(widths)}
    for keep in keeps:
        prefixes = tuple(p for p in keep.split(",") if p)
        out[f"selected, {keep} whole"] = {n: full[n] if n.startswith(prefixes) else w for n, w in widths.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="benchmarks/results/structured_speed_fmnist_resnet18.json")
    p.add_argument("--keep", action="append", default=[], help="name prefixes kept whole (comma-separated)")
    p.add_argument("--sizes", default="28,112", help="input sizes")
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    src = json.loads(Path(args.results).read_text())
    model = load_model(src["model"], pretrained=True, num_classes=10, in_chans=1).eval()
    example = torch.zeros(1, 1, 28, 28)
    graph = GroupGraph(model, example)
    scores = group_scores(graph)["magnitude"]
    full = {g.name: g.units for g in graph.groups}
    widths = {n: int(v.split("/")[0]) for n, v in src["selected_by_pipeline"]["group_widths"].items()}
    chosen = variants(widths, full, args.keep)
    models = {name: compact(model, example, units_to_remove(graph.groups, w, scores)) for name, w in chosen.items()}
    with tempfile.TemporaryDirectory(prefix="edgeprune-width-latency-") as tmp:
        table = speedup_at_sizes(model, models, [int(v) for v in args.sizes.split(",")], args.runs, Path(tmp))
    result = {
        "command": command_line("edgeprune.benchmarks.lab.width_latency", argv),
        "model": src["model"],
        "source": args.results,
        "variants": chosen,
        "rows": table,
        "machine": machine_info(),
    }
    lines = [
        f"# Where channel pruning buys latency: {src['model']}",
        "",
        f"Command: `{result['command']}`; widths from `{args.results}`; onnxruntime p50, batch 1, interleaved.",
        "",
        "| input px | variant | MMACs | MAC ratio | speedup 1t | speedup/MAC 1t | speedup 2t | speedup/MAC 2t |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {r['input']} | {r['variant']} | {r['mmacs']:.2f} | {r['mac_ratio']:.2f} | {r['speedup_1t']:.2f} "
            f"| {r['speedup_over_mac_ratio_1t']:.2f} | {r['speedup_2t']:.2f} | {r['speedup_over_mac_ratio_2t']:.2f} |"
            for r in table
        ],
        "",
    ]
    write_results(Path(args.out), f"width_latency_{src['model']}", result, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

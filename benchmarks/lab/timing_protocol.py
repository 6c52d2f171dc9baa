"""How the timing protocol moves a channel pick's measured speedup: one dense/pick pair, four protocols.

    edgeprune compress --model fmnist_mobilenetv3 --pretrained --data fashion-mnist --granularity channel \\
        --speedup 1.5 --out /tmp/mnv3
    python -m edgeprune.benchmarks.lab.timing_protocol --dense /tmp/mnv3/dense.onnx --model /tmp/mnv3/model.onnx \\
        --fill '/tmp/*/model.onnx' --out benchmarks/results

Channel mode's search times every candidate with dense in one interleaved run (`benchmarks.runner.bench`: one
run of each model per round) and re-checks the pick as a pair, dense and it alone (`confirm_head_to_head`).
Reports keep saying the pick "missed the goal timed alone" and the shipped speedup differs from the search's.
This study times the same two files (plus ``--fill`` models standing in for the other candidates) under:

- ``interleaved``: dense, pick and the fill models, one run each per round (the search's run);
- ``pair``: dense and the pick alone, one run each per round (the head-to-head check);
- ``burst``: like ``interleaved``, but each visit is one untimed run then ``--burst`` timed runs back to back
  (each model timed warm, as a deployed model running alone is);
- ``pair-burst``: the pair, in bursts;

at each ``--threads``, with onnxruntime's intra-op spinning on (its default) and off, ``--repeats`` times.
Writes ``timing_protocol.json`` and ``.md``: the speedup (dense p50 / pick p50) of every repeat.
"""

from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

import numpy as np
from edgeprune.benchmarks.machine import command_line, machine_info, write_results
from edgeprune.benchmarks.runner import latency_stats, make_session, run_orders

PROTOCOLS = ("interleaved", "pair", "burst", "pair-burst")


def p50s(paths: list[str], threads: int, spinning: bool, runs: int, burst: int) -> list[float]:
    """Each model's p50 (ms) over ``runs`` timed runs, interleaved; ``burst`` > 1: that many back to back
    per visit, after one untimed run."""
    sessions = [make_session(p, threads, spinning) for p in paths]
    inputs = [s.get_inputs()[0] for s in sessions]
    shapes = [[d if isinstance(d, int) and d > 0 else 1 for d in i.shape] for i in inputs]  # batch 1
    feeds = [{i.name: np.random.default_rng(0).random(s, np.float32)} for i, s in zip(inputs, shapes, strict=True)]
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(5):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in paths]
    for order in run_orders(len(paths), -(-runs // burst)):
        for i in order:
            if burst > 1:
                sessions[i].run(None, feeds[i])
            for _ in range(burst):
                t0 = time.perf_counter()
                sessions[i].run(None, feeds[i])
                times[i].append((time.perf_counter() - t0) * 1000.0)
    return [latency_stats(t)["p50"] for t in times]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dense", required=True)
    p.add_argument("--model", required=True, help="the pick (same input as --dense)")
    p.add_argument("--fill", default="", help="glob of other ONNX models with the same input (the other candidates)")
    p.add_argument("--max-fill", type=int, default=20)
    p.add_argument("--threads", default="2,1")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--burst", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    both = {str(Path(args.dense).resolve()), str(Path(args.model).resolve())}
    fill = sorted(f for f in glob.glob(args.fill) if str(Path(f).resolve()) not in both)[: args.max_fill]
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        for spinning in (True, False):
            for protocol in PROTOCOLS:
                paths = [args.dense, args.model] + (fill if protocol in ("interleaved", "burst") else [])
                burst = args.burst if protocol.endswith("burst") else 1
                reps = [p50s(paths, threads, spinning, args.runs, burst)[:2] for _ in range(args.repeats)]
                rows.append(
                    {
                        "threads": threads,
                        "spinning": spinning,
                        "protocol": protocol,
                        "models": len(paths),
                        "dense_ms": [r[0] for r in reps],
                        "model_ms": [r[1] for r in reps],
                        "speedup": [r[0] / r[1] for r in reps],
                    }
                )
                print(f"{threads} thread(s), spinning {spinning}, {protocol}: {rows[-1]['speedup']}", flush=True)
    result = {
        "command": command_line("edgeprune.benchmarks.lab.timing_protocol", argv),
        "machine": machine_info(),
        "dense": args.dense,
        "model": args.model,
        "fill": fill,
        "runs": args.runs,
        "burst": args.burst,
        "rows": rows,
    }
    lines = [
        "# Timing protocol and a channel pick's speedup",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, load "
        f"{result['machine']['load_average_1m']:.2f} at the start; onnxruntime "
        f"{result['machine']['versions']['onnxruntime']}. {args.runs} timed runs per model and repeat; "
        f"{len(fill)} fill models in the interleaved runs. Each cell: dense p50 / pick p50 per repeat "
        "(dense ms in brackets).",
        "",
        "| threads | spinning | " + " | ".join(PROTOCOLS) + " |",
        "|---|---|" + "---|" * len(PROTOCOLS),
    ]
    for threads in sorted({r["threads"] for r in rows}, reverse=True):
        for spinning in (True, False):
            cells = []
            for protocol in PROTOCOLS:
                r = next(
                    x for x in rows if (x["threads"], x["spinning"], x["protocol"]) == (threads, spinning, protocol)
                )
                cells.append(", ".join(f"{s:.2f}x ({d:.3f})" for s, d in zip(r["speedup"], r["dense_ms"], strict=True)))
            lines.append(f"| {threads} | {'on' if spinning else 'off'} | " + " | ".join(cells) + " |")
    write_results(Path(args.out), "timing_protocol", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

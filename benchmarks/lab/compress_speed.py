"""Wall time of `edgeprune compress --target arm64` on the bundled defaults, stage by stage.

    python -m edgeprune.benchmarks.lab.compress_speed [--repeats 2] [--out benchmarks/results]

Runs the real CLI in a subprocess (fresh interpreter: imports count) in a temp folder, reads the
stage timings from its report.json and writes ``compress_speed.json`` + ``compress_speed.md``.
Targets (Foundation issue): whole job <= 180 s on 2 cores, screening of the 30 candidates <= 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeprune.benchmarks.lab import RESULTS
from edgeprune.benchmarks.machine import machine_info

COMMAND = ["compress", "--target", "arm64", "-q"]


def run_once() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cli = [sys.executable, "-c", "from edgeprune.cli import main; main()", *COMMAND]
        proc = subprocess.run(cli, cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"compress failed:\n{proc.stderr}")
        report = json.loads((Path(tmp) / "edgeprune-out" / "report.json").read_text())
    sel = report["selected"]
    return {
        "wall_s": round(wall, 2),
        "timings_s": report["timings"],
        "selected": sel["name"],
        "sparsity": sel["sparsity"],
        "accuracy": sel["accuracy"],
        "dense_accuracy": report["dense"]["accuracy"],
        "accuracy_drop_points": sel["accuracy_drop"],
        "int8_accuracy": sel["int8_accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    info = machine_info()
    runs = [run_once() for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r["wall_s"])
    result = {
        "benchmark": "compress_speed",
        "cli": "edgeprune " + " ".join(COMMAND),
        "machine": info,
        "runs": runs,
        "best_wall_s": best["wall_s"],
        "best_screening_s": best["timings_s"]["screening"],
        "targets": {"wall_s": 180, "screening_s": 60},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compress_speed.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# compress speed (bundled demo, `edgeprune compress --target arm64`)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, load {info['load_average_1m']:.2f} at start; "
        f"torch {info['versions']['torch']}, onnxruntime {info['versions']['onnxruntime']}; {info['utc']}.",
        "",
        "| run | wall s | load s | sensitivity s | screening s | finetune s | export s | ship s | bench s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(runs, 1):
        t = r["timings_s"]
        cols = [t.get(k, 0.0) for k in ("load", "sensitivity", "screening", "finetune", "export", "ship", "benchmark")]
        lines.append(f"| {i} | {r['wall_s']:.1f} | " + " | ".join(f"{c:.1f}" for c in cols) + " |")
    lines += [
        "",
        f"Selected {best['selected']} at {best['sparsity']:.2%} sparsity: accuracy {best['accuracy']:.2%} "
        f"(dense {best['dense_accuracy']:.2%}, drop {best['accuracy_drop_points']:.2f} points), "
        f"INT8 {best['int8_accuracy']:.2%}.",
        "",
    ]
    (args.out / "compress_speed.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

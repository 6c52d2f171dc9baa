"""Reference studies: the measurements behind the README's tables (`python -m edgeprune.benchmarks.lab.NAME`).

Research scripts, not product: nothing in `edgeprune`, `edgeprune.export` or the harness one level up imports
from here. They write to ``benchmarks/results/`` (``RESULTS``) with the machine, versions and command.
"""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"

"""Recovery schedules: which candidates train, for how many epochs, in which rounds ("rungs"). Pure.

A schedule turns a number of candidates into rungs. Each rung names how many candidates run it (the best
ones so far) and the cumulative epochs a candidate has trained when it finishes it; a survivor continues from
its weights after the rung before. Two schedules (`SCHEDULES`, names as ``--recover`` takes them):

- ``top``: one rung, the ``k`` best candidates by screening accuracy, ``epochs`` each (what compress did
  before: a fixed top-k, full epochs);
- ``halving``: synchronous successive halving (Jamieson & Talwalkar 2016). Every candidate gets
  ``first_epochs``; the better ``1/eta`` by selection accuracy go on to ``eta`` times the epochs, and so on
  until ``max_epochs`` (never fewer than ``keep`` candidates in a rung). Screening ranks recovered accuracy
  poorly; a short recovery of every candidate ranks it much better at a fraction of full recovery's cost.

Why synchronous: every candidate of a rung finishes before anyone is promoted, so who goes on depends on the
accuracies only, never on which worker finished first. In-process and on any cluster the same seed gives the
same survivors and the same pick. Ray Tune's ASHA is asynchronous: it promotes a trial as soon as it is in
the top ``1/eta`` of the trials *finished so far* at its rung, so the promotions depend on the order in which
workers report (cluster size, load, a retried task), and two runs with the same seed can pick differently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rung:
    """One round: the ``size`` best candidates so far train until they have ``epochs`` epochs in total."""

    size: int
    epochs: int


@dataclass(frozen=True)
class Top:
    """The ``k`` best candidates by screening accuracy, ``epochs`` epochs each, in one rung."""

    k: int = 2
    epochs: int = 3

    def rungs(self, n: int) -> list[Rung]:
        size = min(self.k, n)
        return [Rung(size, self.epochs)] if size > 0 and self.epochs > 0 else []


@dataclass(frozen=True)
class Halving:
    """Synchronous successive halving: every candidate ``first_epochs``, the best ``1/eta`` of them ``eta``
    times as many epochs in total, ..., up to ``max_epochs``; a rung keeps at least ``keep`` candidates."""

    first_epochs: int = 1
    max_epochs: int = 4
    eta: int = 2
    keep: int = 2

    def __post_init__(self) -> None:
        if self.first_epochs < 1 or self.max_epochs < self.first_epochs or self.eta < 2 or self.keep < 1:
            raise ValueError(f"bad halving schedule {self}: need 1 <= first_epochs <= max_epochs, eta >= 2, keep >= 1")

    def rungs(self, n: int) -> list[Rung]:
        out: list[Rung] = []
        epochs, size = self.first_epochs, n
        while size > 0:
            out.append(Rung(size, epochs))
            if epochs >= self.max_epochs:
                break
            epochs = min(self.max_epochs, epochs * self.eta)
            size = min(size, max(self.keep, math.ceil(size / self.eta)))
        return out


Schedule = Top | Halving
SCHEDULES: dict[str, type[Top] | type[Halving]] = {"top": Top, "halving": Halving}


def best(scores: Sequence[Any], k: int) -> list[int]:
    """Indices of the ``k`` highest scores (numbers, or tuples compared in order), best first; equal scores keep
    their order (deterministic: a reversed sort is still stable)."""
    return sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)[:k]


def epoch_cost(rungs: Sequence[Rung]) -> int:
    """Candidate-epochs a schedule trains in all (a survivor trains only its rung's new epochs)."""
    done, total = 0, 0
    for rung in rungs:
        total += rung.size * (rung.epochs - done)
        done = rung.epochs
    return total

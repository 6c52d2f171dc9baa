"""The recover stage, one for both granularities: candidates in, recovered weights and their rungs out.

A candidate to recover is a `Job`: a key (its name in the report) and a `Builder`, the picklable recipe that
materializes it from the dense model (`MaskBuild`: unstructured masks, enforced while training;
`structured.CompactBuild`: channels physically removed, next to the compaction it replays; the lab studies
add their own). `recover` trains the jobs on the calibration data as a schedule says (`halving.Top` or
`halving.Halving`), ranks them by accuracy on the selection split after every rung and returns one
`RecoveryOutcome` per job with its rungs and, for the last rung's survivors, the final weights (and their
selection log-likelihood, a diagnostic). Work runs where the executor says (`cluster.InProcess` or
`cluster.RayExecutor`); what every task reads (`Shared`: dense model, data, teacher logits, settings) is shared
once per run.

Same results everywhere: a rung's training depends only on the job, `Shared` and the rungs before it
(torch's intra-op thread count is part of `Shared`, since it changes float sums; on the CPU), and halving is
synchronous (see `halving`), so in-process and Ray runs with the same seed give the same accuracies and the
same pick. `ResultStore` keeps every finished rung on disk under a hash of what decides it, so a re-run
with the same store trains only what is missing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .cluster import Executor, InProcess
from .errors import EdgepruneError
from .halving import Halving, Top, best
from .masking import Masks, apply_masks_
from .recovery import Recipe, default_lrs, finetune, finetune_batch, has_batchnorm, recalibrate_bn, resolve_device
from .report import Candidate, RecoveryRung

# -- builders: how a candidate is materialized -------------------------------------------------------------


@runtime_checkable
class Builder(Protocol):
    """How a candidate is materialized in a recovery task. Picklable (it travels to Ray workers with each
    call), and a pure function of its content and the dense model: the same builder gives the same model
    wherever it runs."""

    def build(self, dense: nn.Module) -> nn.Module:
        """The candidate, a new model (``dense`` stays as it is)."""
        ...

    def train_masks(self) -> Masks:
        """The masks held while it trains (empty: nothing masked)."""
        ...

    def digest(self) -> str:
        """A hash of everything that decides `build` (the resume key's candidate part)."""
        ...


def content_digest(*parts: bytes | str) -> str:
    """A sha256 of ``parts`` (each separated), for builders' `Builder.digest` and the resume keys."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of named tensors (names, dtypes, shapes and bytes)."""
    parts: list[bytes | str] = []
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        parts += [name, str(t.dtype), str(tuple(t.shape)), t.view(-1).view(torch.uint8).numpy().tobytes()]
    return content_digest(*parts)


@dataclass(frozen=True)
class MaskBuild:
    """Unstructured: the dense model with ``masks`` applied; the masks stay enforced while it trains."""

    masks: Masks

    def build(self, dense: nn.Module) -> nn.Module:
        model = copy.deepcopy(dense)
        apply_masks_(model, self.masks)
        return model

    def train_masks(self) -> Masks:
        return self.masks

    def digest(self) -> str:
        return content_digest("mask", tensor_digest(self.masks))


@dataclass(frozen=True)
class Job:
    """One candidate to recover: its name, how to build it, and its screening accuracy (ranks ``top``).

    ``entrant``: it enters the first rung whatever its screening rank (Mix-and-Match's range baselines' own
    plans): screening ranks recovered accuracy poorly (on ResNet-18 at 89 % MAG's plan screened 1.5 points
    below LAMP's and recovered 0.8 above it), and a search that contains its baselines must also recover them
    with the same budget, or a baseline that recovers best never reaches the final comparison."""

    key: str
    build: Builder
    screen_accuracy: float = 0.0
    entrant: bool = False
    lr: float | None = None  # this job's fine-tuning rate; None: the run's (`Shared.lr`)

    def digest(self) -> str:
        """The resume key's job part: the builder's content, and the rate when the job sets its own."""
        d = self.build.digest()
        return d if self.lr is None else content_digest(d, f"lr={self.lr!r}")


# -- what every task shares --------------------------------------------------------------------------------


@dataclass
class Shared:
    """Read by every recovery task; put in the object store once per run on Ray."""

    dense: nn.Module
    calib_x: torch.Tensor
    calib_y: torch.Tensor
    select_x: torch.Tensor  # the selection split: ranks the candidates after each rung
    select_y: torch.Tensor
    recipe: Recipe
    teacher: torch.Tensor | None = None  # the dense model's logits on calib_x (`recovery.teacher_logits`)
    lr: float | None = None  # None: `recovery.default_lr` for the model
    batch_size: int = 128  # BN re-calibration's batch
    seed: int = 0
    bn_recal: bool = True
    threads: int = 1  # torch intra-op threads per task: part of the result (float sums), so fixed, not "all"
    device: str = "auto"  # where a task trains (`recovery.resolve_device`, resolved on the worker)
    finetune_batch: int | None = None  # None: `recovery.finetune_batch` of the calibration split's size

    @property
    def train_batch(self) -> int:
        """The fine-tuning batch: ``finetune_batch``, or the rule's for these calibration images."""
        return recovery_batch(self, len(self.calib_x))

    @classmethod
    def for_run(
        cls, cfg: Any, dense: nn.Module, data: Any, recipe: Recipe, teacher: torch.Tensor | None, bn_recal: bool
    ) -> Shared:
        """What `compress` shares, either granularity: ``dense`` (an eval-mode copy the caller made), the run's
        calibration and selection splits and its recovery options (`CompressConfig` fields)."""
        return cls(
            dense.eval(),
            data.calib_x,
            data.calib_y,
            data.select_x,
            data.select_y,
            recipe,
            teacher,
            cfg.finetune_lr,
            cfg.batch_size,
            cfg.seed,
            bn_recal,
            cfg.recover_threads,
            cfg.device,
            cfg.finetune_batch,
        )

    def settings_digest(self) -> str:
        """Everything here that decides a rung's result, hashed (the resume key's shared part)."""
        data = {"calib_x": self.calib_x, "calib_y": self.calib_y, "select_x": self.select_x, "select_y": self.select_y}
        if self.teacher is not None:
            data["teacher"] = self.teacher
        settings = json.dumps(
            [
                repr(self.recipe),
                self.lr,
                self.batch_size,
                self.seed,
                self.bn_recal,
                self.threads,
                self.device,
                self.train_batch,
            ]
        )
        return content_digest(tensor_digest(self.dense.state_dict()), tensor_digest(data), settings)


# -- one rung of one job (the task) ------------------------------------------------------------------------


@dataclass(frozen=True)
class RungResult:
    """What one rung of one job measured."""

    rung: int
    epochs: int  # cumulative epochs after this rung
    epochs_run: int  # epochs this rung trained (early stopping can end it sooner)
    steps: int  # optimizer steps this rung took
    accuracy: float  # on the selection split, after the rung (early stopping keeps the best epoch's weights)
    start_accuracy: float  # on the selection split, before the rung
    seconds: float
    node: str = ""  # where it ran ("" in-process; the Ray node id)
    reused: bool = False  # read from the ResultStore instead of trained
    loglik: float | None = None  # the kept weights' mean log-probability of the right class, selection split


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _node_id() -> str:
    ray = sys.modules.get("ray")  # imported in a Ray worker; never imported here (in-process stays Ray-free)
    if ray is None or not ray.is_initialized():
        return ""
    return ray.get_runtime_context().get_node_id()


def run_rung(
    shared: Shared,
    build: Builder,
    rung: int,
    epochs_before: int,
    epochs: int,
    start: dict | None,
    lr: float | None = None,
) -> tuple[RungResult, dict[str, torch.Tensor]]:
    """Train one job through one rung: build it (BN re-calibrated) or continue from ``start`` (the state
    after its previous rung), fine-tune ``epochs - epochs_before`` epochs at ``lr`` (None: ``shared.lr``)
    on all of the calibration split,
    stopping early on the selection split. Returns the result and the weights (CPU state dict): those of the
    best epoch, or the start weights when no epoch beat them (``accuracy == start_accuracy``)."""
    t0 = time.perf_counter()
    s = shared
    device = resolve_device(s.device)
    with torch_threads(s.threads):
        torch.manual_seed(s.seed)
        model = build.build(s.dense)
        if start is None:
            if s.bn_recal and has_batchnorm(model):
                recalibrate_bn(model, s.calib_x, s.batch_size, device=device)
        else:
            model.load_state_dict(start)
        res = finetune(
            model,
            build.train_masks(),
            s.calib_x,
            s.calib_y,
            val=(s.select_x, s.select_y),  # early stopping and the ranking judge on the same split
            epochs=epochs - epochs_before,
            lr=s.lr if lr is None else lr,
            batch_size=s.train_batch,
            seed=s.seed,
            recipe=s.recipe,
            teacher=s.teacher,
            device=device,
            teacher_model=s.dense if s.recipe.consistent else None,
        )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    seconds = time.perf_counter() - t0
    result = RungResult(
        rung,
        epochs,
        res.epochs_run,
        res.steps,
        res.best_val_accuracy,
        res.start_accuracy,
        seconds,
        _node_id(),
        loglik=res.best_val_loglik,
    )
    return result, state


# -- resume ------------------------------------------------------------------------------------------------


class ResultStore:
    """Finished rungs on disk, one ``<key>.pt`` each (torch.save; read back with ``weights_only=True``).

    The key hashes what decides a rung's result: the builder's content, `Shared.settings_digest` (dense
    weights, data, recipe, rate, batch, seed, threads, device) and the job's epochs at every rung so far.
    Files are written to a temporary name and renamed, so a killed run leaves whole rungs or none."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @staticmethod
    def key(build_digest: str, settings_digest: str, epochs_path: Sequence[int]) -> str:
        return content_digest(build_digest, settings_digest, json.dumps(list(epochs_path)))[:40]

    def load(self, key: str) -> tuple[RungResult, dict[str, torch.Tensor]] | None:
        path = self.folder / f"{key}.pt"
        if not path.is_file():
            return None
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return RungResult(**blob["result"], reused=True), blob["state"]

    def save(self, key: str, result: RungResult, state: dict[str, torch.Tensor]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fields = {k: v for k, v in result.__dict__.items() if k != "reused"}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".rung-", suffix=".tmp")
        os.close(fd)
        try:
            torch.save({"result": fields, "state": state}, tmp)
            os.replace(tmp, self.folder / f"{key}.pt")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# -- the stage ---------------------------------------------------------------------------------------------


@dataclass
class RecoveryOutcome:
    """One job after recovery: its rungs (in order), and the weights when it survived the last rung."""

    key: str
    rungs: list[RungResult] = field(default_factory=list)
    state: dict[str, torch.Tensor] | None = None

    @property
    def accuracy(self) -> float | None:
        """Selection accuracy after its last rung (None: not recovered)."""
        return self.rungs[-1].accuracy if self.rungs else None

    @property
    def loglik(self) -> float | None:
        """Selection-split mean log-likelihood after its last rung (None: not recovered, or an old stored rung)."""
        return self.rungs[-1].loglik if self.rungs else None

    @property
    def survived(self) -> bool:
        return self.state is not None


class ProgressLike(Protocol):
    def start(self, stage: str, total: int | None = None) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def finish(self) -> None: ...
    def log(self, message: str) -> None: ...


class _Silent:
    def start(self, stage: str, total: int | None = None) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def finish(self) -> None: ...
    def log(self, message: str) -> None: ...


def recover(
    jobs: Sequence[Job],
    shared: Shared,
    schedule: Top | Halving,
    executor: Executor | None = None,
    progress: ProgressLike | None = None,
    store: ResultStore | None = None,
) -> list[RecoveryOutcome]:
    """Recover ``jobs`` as ``schedule`` says; one outcome per job, in the order given.

    Before the first rung the jobs are ranked by screening accuracy (``Top`` takes the best ``k`` and every
    entrant; ``Halving``'s first rung takes them all); before each later rung by selection accuracy after the rung
    before (ties: the order given). Survivors continue from their weights. Only the last rung's survivors
    keep weights in their outcome (a ResNet-50's are 100 MB; the losers' are not needed)."""
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise EdgepruneError("recover: candidate keys must be unique")
    executor = executor or InProcess()
    progress = progress or _Silent()
    outcomes = [RecoveryOutcome(j.key) for j in jobs]
    rungs = schedule.rungs(len(jobs))
    if not rungs:
        return outcomes
    settings = shared.settings_digest() if store is not None else ""
    builds = [j.digest() for j in jobs] if store is not None else []
    handle = executor.share(shared)
    alive = first_rung(jobs, rungs[0].size)
    states: dict[int, Any] = {}  # job -> its weights after its last rung (a Ray reference or a state dict)
    before = 0
    for r, rung in enumerate(rungs):
        if r > 0:
            alive = [alive[i] for i in best([outcomes[j].rungs[-1].accuracy for j in alive], rung.size)]
            states = {j: states[j] for j in alive}
        path = [x.epochs for x in rungs[: r + 1]]
        todo: list[int] = []
        for j in alive:
            hit = store.load(ResultStore.key(builds[j], settings, path)) if store is not None else None
            if hit is None:
                todo.append(j)
            else:
                outcomes[j].rungs.append(hit[0])
                states[j] = hit[1]
        progress.start(
            f"recover rung {r + 1}/{len(rungs)}: {len(alive)} candidate(s) to {rung.epochs} epoch(s)"
            f"{f', {len(alive) - len(todo)} reused' if len(todo) < len(alive) else ''} ({executor.name})",
            total=len(alive),
        )
        progress.advance(len(alive) - len(todo))
        calls = [(jobs[j].build, r, before, rung.epochs, states.get(j), jobs[j].lr) for j in todo]
        for i, result, payload in executor.run(run_rung, handle, calls, [keys[j] for j in todo], shared.threads):
            j = todo[i]
            outcomes[j].rungs.append(result)
            states[j] = payload
            if store is not None:
                store.save(ResultStore.key(builds[j], settings, path), result, executor.fetch(payload))
            progress.advance()
        progress.finish()
        before = rung.epochs
    for j in alive:
        outcomes[j].state = executor.fetch(states[j])
    return outcomes


def first_rung(jobs: Sequence[Job], size: int) -> list[int]:
    """The jobs of the first rung, best screening first: the ``size`` best non-entrants and every entrant."""
    others = [i for i, j in enumerate(jobs) if not j.entrant]
    chosen = {others[i] for i in best([jobs[i].screen_accuracy for i in others], size)}
    chosen |= {i for i, j in enumerate(jobs) if j.entrant}
    return sorted(chosen, key=lambda i: (-jobs[i].screen_accuracy, i))


def pick(outcomes: Sequence[RecoveryOutcome]) -> RecoveryOutcome:
    """The last rung's most accurate survivor (ties: the order given)."""
    survivors = [o for o in outcomes if o.survived]
    if not survivors:
        raise EdgepruneError("recover: no candidate was recovered")
    return survivors[best([o.accuracy for o in survivors], 1)[0]]


def with_rates(jobs: Sequence[Job], rates: Sequence[float]) -> list[Job]:
    """Every job once per rate, candidate by candidate (keys ``KEY@lr=R`` when there are several): the rates
    race like candidates do, ranked on the selection split after each rung."""
    if len(rates) == 1:
        return [dataclasses.replace(j, lr=rates[0]) for j in jobs]
    return [dataclasses.replace(j, key=f"{j.key}@lr={r:g}", lr=r) for j in jobs for r in rates]


def best_rate(outcomes: Sequence[RecoveryOutcome]) -> int:
    """Of one candidate's outcomes (one per rate, as `with_rates` ordered them) the one it keeps: the most
    accurate survivor of the last rung, else the one that got furthest (ties: the order given, low rate first)."""
    survivors = [i for i, o in enumerate(outcomes) if o.survived]
    pool = survivors or [i for i, o in enumerate(outcomes) if len(o.rungs) == max(len(o.rungs) for o in outcomes)]
    if not outcomes[pool[0]].rungs:
        return pool[0]
    return pool[best([outcomes[i].accuracy for i in pool], 1)[0]]


# -- the report's view and the options' schedule, shared by both granularities -------------------------


def recovery_rates(cfg: Any, model: nn.Module, compacted: bool = False) -> tuple[float, ...]:
    """``--finetune-lr``, or `recovery.default_lrs` for the model (two for a compacted one)."""
    return (cfg.finetune_lr,) if cfg.finetune_lr is not None else default_lrs(model, compacted)


def recovery_batch(cfg: Any, calib_images: int) -> int:
    """``--finetune-batch``, or `recovery.finetune_batch` for ``calib_images`` (``cfg``: the options, or a
    `Shared`: both have ``finetune_batch`` and ``batch_size``)."""
    return cfg.finetune_batch or finetune_batch(calib_images, cfg.batch_size)


def recovery_schedule(cfg: Any, rates: int = 1) -> Top | Halving | None:
    """The recover stage's schedule from the options (``rates``: jobs per candidate, `with_rates`); None when
    there is nothing to train."""
    if cfg.finetune_epochs <= 0 or cfg.finetune_top <= 0:
        return None
    if cfg.recover == "halving":
        return Halving(1, cfg.finetune_epochs, 2, keep=max(1, cfg.finetune_top) * rates)
    return Top(k=cfg.finetune_top * rates, epochs=cfg.finetune_epochs)


# Beyond this many points below dense on the selection split, a compacted pick is limited by the recovery budget
# more than by its plan: fmnist_mobilenetv3 at --speedup 1.5 went from -16.7 points (1000 images, 3 epochs) to -12.3
# (8000, 3) and -4.8 (8000, 6) on the test split (benchmarks/results/channel_goals.md).
BUDGET_HINT_POINTS = 2.0


def budget_hint(drop_points: float, max_drop: float | None, calib_images: int, epochs: int) -> str | None:
    """A note for a pick that recovery left far below dense (``drop_points`` on the selection split, beyond both
    `BUDGET_HINT_POINTS` and ``--max-drop``): what to raise, with the budget it had; None otherwise."""
    if epochs <= 0 or drop_points <= max(BUDGET_HINT_POINTS, max_drop or 0.0) + 1e-9:
        return None
    return (
        f"the pick is {drop_points:.2f} points below dense after recovery on {calib_images} calibration images for "
        f"up to {epochs} epoch(s): compacted models recover with more of both (--calib-size, --finetune-epochs)"
    )


def record_recovery(candidate: Candidate, outcome: RecoveryOutcome, lr: float | None = None) -> None:
    """A candidate's rungs in the report (and ``lr``, the rate they ran at when the job set one); its
    recovered accuracy only where it survived the last rung."""
    candidate.recovery_lr = lr
    candidate.recovery = [
        RecoveryRung(
            r.rung,
            r.epochs,
            r.epochs_run,
            r.steps,
            r.accuracy,
            r.start_accuracy,
            round(r.seconds, 3),
            r.reused,
            r.loglik,
        )
        for r in outcome.rungs
    ]
    if outcome.rungs:
        candidate.improved = outcome.accuracy > outcome.rungs[0].start_accuracy
    if outcome.survived:
        candidate.finetuned_accuracy = outcome.accuracy
        candidate.finetuned_loglik = outcome.loglik

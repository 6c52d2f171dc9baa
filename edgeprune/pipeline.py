"""`compress`: the whole job, stage by stage, in the order the data flows.

load → inventory → dense eval → sensitivity → ranges (Phase 1) → strategies (Phase 2) → screening
(mask + BN re-calibration) → fine-tune the best few (Phase 3) → select → export + verify → benchmark → report.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .baselines import BASELINES, RANGE_BASELINES, Plan, Scores
from .cluster import Executor, InProcess, check_cluster_spec, executor_for
from .data import check_image_size, load_data
from .deliver import dense_copy
from .errors import DataError, EdgepruneError
from .evaluation import accuracy, params_and_macs, right_answers, weight_sparsity
from .granularity import Found, Search, SearchInputs, finish
from .halving import SCHEDULES, Halving, Top
from .inventory import build_inventory
from .masking import Masks, apply_masks_, build_masks
from .models import load_model, model_family
from .outdir import claim_output_dir
from .ranges import LayerRange, apply_rules, baseline_ranges, load_rules, range_targets
from .recover import Job, MaskBuild, ResultStore, Shared, record_recovery, recover, recovery_batch, recovery_schedule
from .recovery import RECIPES, finetune, has_batchnorm, on_device, recalibrate_bn, resolve_device, teacher_logits
from .report import (
    Candidate,
    DenseSummary,
    LayerReport,
    Report,
)
from .screening import (
    Race,
    ScreeningSummary,
    image_rungs,
    race,
    screen_candidates,
    screening_estimate,
    screening_warning,
    share_results,
)
from .selection import Point, pareto_mask, runner_up, select_index
from .sensitivity import SIGNALS, compute_sensitivity, signal_scores
from .stages import FINAL_EVALUATION, Progress, Timings, config_dict  # noqa: F401 - re-exported for benchmarks
from .strategies import LayerStats, reachable, search_plans
from .targets import Target, bench_threads, get_target

METHODS: tuple[str, ...] = ("mix-and-match", *BASELINES)
GRANULARITIES: tuple[str, ...] = ("unstructured", "channel")  # `SEARCHES`, at the end, has one search for each
RECOVER_STORE = ".edgeprune-recover"  # --resume: finished recovery rungs, under --out
BN_RECAL_BATCHES = 8  # recovery.recalibrate_bn's default max_batches
SCREEN_PROBE = 3  # a signal whose first 3 candidates collapse after BN re-calibration is not screened further
GLANCE_RECAL = 64  # calibration images of a candidate's first, quick BN re-calibration (`Workspace.glance`)
GLANCE_IMAGES = 256  # selection images its glance answers (image_rungs' first rung)


@dataclass
class CompressConfig:
    model: str = "demo"
    checkpoint: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    in_chans: int | None = None
    image_size: int | None = None
    data: str = "demo"
    calib_size: int = 1000
    eval_size: int | None = None  # the selection split (screening, early stopping, the pick, --max-drop); None:
    # what the held-out images leave beside the test split, 1000 to 4000 (`data.default_selection_size`)
    test_size: int = 2000  # the sealed test split: opened once, after the pick, for the reported accuracy
    target: str = "arm64"
    granularity: str = "unstructured"
    method: str = "mix-and-match"
    sparsity: float = 0.8
    max_drop: float | None = None
    signals: tuple[str, ...] = SIGNALS
    range_baselines: tuple[str, ...] = RANGE_BASELINES  # Phase 1 runs; their plans at the target are candidates
    rules: str | None = None
    bn_recal: bool = True
    finetune_epochs: int = 3
    finetune_top: int = 2
    finetune_lr: float | None = None  # None: `recovery.default_lrs` (channel mode races two rates)
    finetune_batch: int | None = None  # None: `recovery.finetune_batch` of the calibration split's size
    recover: str = "top"  # recovery schedule, a name in halving.SCHEDULES: top (the best few) | halving
    cluster: str | None = None  # where recovery runs: None in-process, else a Ray --cluster spec
    resume: bool = False  # keep finished recovery rungs under --out/.edgeprune-recover and reuse them
    recover_threads: int = 1  # torch threads per recovery task: part of the result, the same in-process and on Ray
    recovery: str = "distill"  # fine-tuning recipe, a name in recovery.RECIPES
    device: str = "auto"  # where screening, BN re-calibration and recovery run: auto (CUDA when seen) | cpu | cuda
    gradient_samples: int = 512  # calibration images used for the gradient / GraSP signals
    batch_size: int = 128
    out: str = "edgeprune-out"
    threads: int | None = None  # benchmark threads; default: targets.bench_threads
    bench_runs: int = 50
    export: bool = True
    quantize: str | None = None  # "int8" | "none"; default: the target profile's
    pack: str = "dense"  # "dense" | "sparse" (ONNX sparse initializers)
    ort_format: bool = False
    latency_from: str = "local"  # benchmark device: local | ssh://user@host[:port] | qemu-arm64
    identity: str | None = None  # ssh key for latency_from
    ssh_options: tuple[str, ...] = ()
    remote_python: str = "python3"  # interpreter on an ssh:// device (needs numpy + onnxruntime)
    seed: int = 0
    # structured (--granularity channel) selection and shaping
    latency_budget_ms: float | None = None
    speedup: float | None = None
    round_to: int | None = None  # channel multiple; default: the target's
    latency_costs: bool = False  # fit a per-layer latency model; add candidates ranked by score per ms saved

    def validate(self) -> None:
        """Refuse every bad option before any model or data loads: a typo must not cost a whole run.

        No network here (the device itself is probed by `benchmarks.device.check_device`, which `compress`
        calls right after). Decisions on options that only mean something in one mode:

        - ``--speedup``, ``--latency-budget``, ``--round-to``, ``--latency-costs`` shape or pick channel
          widths; with ``--granularity unstructured`` they would be ignored, so they are refused.
        - ``--max-drop`` with ``--speedup`` / ``--latency-budget``: the latency goal would decide and the
          accuracy bound be dropped silently, so the pair is refused: one selection goal per run.
        - Both granularities ship through one deliver step (`edgeprune.deliver`): ``--quantize``,
          ``--ort-format`` and ``--latency-from`` (which in channel mode also times the search's candidates)
          mean the same in both. ``--pack sparse`` is refused for ``--granularity channel``: a compacted
          model has its channels removed, not zeroed, so there are no zeros to pack. In unstructured mode
          ``--pack sparse`` and ``--ort-format`` are allowed at any sparsity (the packed file is verified
          against the dense-stored one like every artifact).
        """
        from .benchmarks.device import check_device_options
        from .export.ship import PACK_CHOICES, QUANTIZE_CHOICES

        if not 0.0 <= self.sparsity < 1.0:
            raise EdgepruneError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        # `not x >= 0` rather than `x < 0`: NaN fails every comparison and must be refused too.
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise EdgepruneError(f"--max-drop must be >= 0 points, got {self.max_drop}")
        if self.method not in METHODS:
            raise EdgepruneError(f"unknown --method '{self.method}'; choose from {', '.join(METHODS)}")
        if self.granularity not in GRANULARITIES:
            raise EdgepruneError(f"unknown --granularity '{self.granularity}'; choose from {', '.join(GRANULARITIES)}")
        bad = [s for s in self.signals if s not in SIGNALS]
        if bad or not self.signals:
            raise EdgepruneError(f"unknown signal(s) {bad}; choose from {', '.join(SIGNALS)}")
        for name in ("calib_size", "eval_size", "test_size", "batch_size", "bench_runs", "gradient_samples"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise EdgepruneError(f"--{name.replace('_', '-')} must be >= 1")
        if self.finetune_epochs < 0 or self.finetune_top < 0:
            raise EdgepruneError("--finetune-epochs and --finetune-top must be >= 0")
        if self.finetune_batch is not None and self.finetune_batch < 2:
            raise EdgepruneError(
                f"--finetune-batch must be >= 2 (BatchNorm trains on 2+ images; omit it for the default), "
                f"got {self.finetune_batch}"
            )
        if self.recovery not in RECIPES:
            raise EdgepruneError(f"unknown --recovery '{self.recovery}'; choose from {', '.join(RECIPES)}")
        resolve_device(self.device)
        load_rules(None, self.rules)  # a bad --rules file (schema, regex bound) is refused before anything loads
        bad = [b for b in self.range_baselines if b not in BASELINES]
        if bad or not self.range_baselines:
            what = f"unknown --range-baselines {bad}" if bad else "--range-baselines is empty"
            raise EdgepruneError(f"{what}; choose one or more of {', '.join(BASELINES)}")
        check_image_size(self.image_size)
        for name in ("threads", "num_classes", "in_chans"):  # None: the default
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EdgepruneError(f"--{name.replace('_', '-')} must be >= 1 (omit it for the default), got {value}")
        lr = self.finetune_lr
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise EdgepruneError(f"--finetune-lr must be a positive number (omit it for the default), got {lr}")
        if self.recover not in SCHEDULES:
            raise EdgepruneError(f"unknown --recover '{self.recover}'; choose from {', '.join(SCHEDULES)}")
        if self.recover_threads < 1:
            raise EdgepruneError(f"--recover-threads must be >= 1, got {self.recover_threads}")
        if self.cluster is not None:
            check_cluster_spec(self.cluster)  # syntax only: connecting is compress's, right after validate()
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise EdgepruneError(f"--quantize must be {' or '.join(QUANTIZE_CHOICES)}, got '{self.quantize}'")
        if self.pack not in PACK_CHOICES:
            raise EdgepruneError(f"--pack must be {' or '.join(PACK_CHOICES)}, got '{self.pack}'")
        get_target(self.target)
        check_device_options(self.latency_from, self.identity, self.ssh_options)
        if not self.remote_python or self.remote_python.startswith("-"):
            raise EdgepruneError(f"bad --remote-python '{self.remote_python}': give an interpreter name or path")

        channel_only = {  # field -> flag; a set value (not None / False) means the user asked for it
            "speedup": "--speedup",
            "latency_budget_ms": "--latency-budget",
            "round_to": "--round-to",
            "latency_costs": "--latency-costs",
        }
        if self.granularity != "channel":
            for name, flag in channel_only.items():
                if getattr(self, name) not in (None, False):
                    raise EdgepruneError(
                        f"{flag} only applies to --granularity channel; add --granularity channel or drop {flag}"
                    )
            return
        if self.speedup is not None and not (math.isfinite(self.speedup) and self.speedup > 1):
            raise EdgepruneError(f"--speedup must be > 1 (times faster than dense), got {self.speedup}")
        budget = self.latency_budget_ms
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise EdgepruneError(f"--latency-budget must be a positive number of milliseconds, got {budget}")
        if self.round_to is not None and self.round_to < 1:
            raise EdgepruneError(f"--round-to must be >= 1, got {self.round_to}")
        if budget is not None and self.speedup is not None:
            raise EdgepruneError("give either --latency-budget or --speedup, not both")
        if self.max_drop is not None and (budget is not None or self.speedup is not None):
            goal = "--speedup" if self.speedup is not None else "--latency-budget"
            raise EdgepruneError(
                f"give one selection goal: --max-drop (the fastest within an accuracy drop) or {goal} "
                "(the most accurate at a latency), not both"
            )
        if self.method != "mix-and-match":
            raise EdgepruneError(
                f"--granularity channel supports --method mix-and-match only, got '{self.method}'; "
                "use --granularity unstructured for the baselines"
            )
        if self.pack == "sparse":
            raise EdgepruneError(
                "--pack sparse does not apply to --granularity channel (a compacted model has no zeros to pack: "
                "its channels are removed); drop it"
            )


@dataclass
class CandidatePlan:
    """A candidate before it is evaluated: which scores rank the weights and how sparse each layer gets."""

    candidate: Candidate
    scores: Scores
    plan: Plan


def match_data_to_model(model: nn.Module, data):
    """Adapt channels if the model wants another count; fail with a clear message if classes disagree."""
    conv = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    want = getattr(conv, "in_channels", None)
    if want and want != data.in_chans:
        data = data.with_channels(want)
    try:
        with torch.no_grad():
            logits = model.eval()(data.eval_x[:2])
    except Exception as exc:  # noqa: BLE001 - any shape error becomes one line
        raise DataError(
            f"the model cannot run on the data ({tuple(data.eval_x.shape[1:])} inputs): {str(exc).splitlines()[0]}"
        ) from None
    if logits.ndim != 2 or logits.shape[1] != data.num_classes:
        raise DataError(
            f"the data has {data.num_classes} classes but the model outputs {tuple(logits.shape[1:])}; "
            "pass --num-classes or a checkpoint for this data"
        )
    return data


class Workspace:
    """A loaded model + data with its sensitivity computed once; every candidate is built from it.

    The stages after loading are methods so that benchmarks can drive them (e.g. several methods and
    sparsity levels on one model) without recomputing gradients or copying the pipeline.
    """

    def __init__(self, cfg: CompressConfig, model: nn.Module, data, with_hessian: bool = True):
        self.cfg, self.model, self.data = cfg, model, data
        self.layers = build_inventory(model)
        self.prunable = [layer for layer in self.layers if layer.prunable]
        if not self.prunable:
            raise EdgepruneError(f"model '{cfg.model}' has no Conv or Linear weights to prune")
        self.rules = load_rules(model_family(model), cfg.rules)
        self.use_bn = cfg.bn_recal and has_batchnorm(model)
        n = min(cfg.gradient_samples, len(data.calib_x))
        self.sens = compute_sensitivity(
            model, self.layers, data.calib_x[:n], data.calib_y[:n], cfg.batch_size, with_hessian=with_hessian
        )
        self.original = copy.deepcopy(model.state_dict())
        self.recipe = RECIPES[cfg.recovery]
        self.device = resolve_device(cfg.device)
        self._teacher: torch.Tensor | None = None

    def teacher(self) -> torch.Tensor | None:
        """The dense model's calibration logits, once, when the recovery recipe distills from fixed logits (else
        None: a consistent recipe labels each view as it trains)."""
        # None is not cached: without this early return every call would reload the weights
        if self.recipe.distill <= 0 or self.recipe.consistent:
            return None
        if self._teacher is None:
            self.model.load_state_dict(self.original)
            self._teacher = teacher_logits(self.model, self.data.calib_x, self.cfg.batch_size, self.device)
        return self._teacher

    def accuracy(self) -> float:
        return accuracy(self.model, self.data.eval_x, self.data.eval_y, self.cfg.batch_size)

    def ranges(self, sparsity: float, method: str = "mix-and-match") -> dict[str, LayerRange]:
        """Phase 1 for mix-and-match (baseline runs at three targets, clipped by the rules that apply at
        ``sparsity``); the rules alone otherwise."""
        self.model.load_state_dict(self.original)  # score the dense weights, not the last candidate's
        base = None
        if method == "mix-and-match":
            runs = [
                BASELINES[b].plan(self.prunable, self.sens, s, self.cfg.seed)
                for b in self.cfg.range_baselines
                for s in range_targets(sparsity)
            ]
            base = baseline_ranges(runs)
        return apply_rules(self.layers, self.rules, base, sparsity)

    def layer_stats(self, ranges: dict[str, LayerRange]) -> dict[str, LayerStats]:
        """What the strategies see of each prunable layer: its range, size and depth."""
        return {
            layer.name: LayerStats(ranges[layer.name].lo, ranges[layer.name].hi, layer.numel, layer.depth)
            for layer in self.prunable
        }

    def plans(self, method: str, sparsity: float, ranges: dict[str, LayerRange] | None = None) -> list[CandidatePlan]:
        """The candidates of a method: one plan for a baseline; for mix-and-match, per signal, the strategies
        scaled to ``sparsity`` (``search_plans``), then every range baseline's own plan at ``sparsity`` ranked
        by each signal and, where no signal orders weights as it does, by its own scores — so the search
        contains its baselines (``magnitude/baseline:mag`` is the MAG run, ``snip/baseline:snip`` the SNIP run)."""
        self.model.load_state_dict(self.original)  # score the dense weights, not the last candidate's
        if method != "mix-and-match":
            b = BASELINES[method]
            plan = b.plan(self.prunable, self.sens, sparsity, self.cfg.seed)
            cand = Candidate(name=b.name, signal=b.name, strategy="baseline", method=b.name, sparsity=0.0, accuracy=0.0)
            return [CandidatePlan(cand, b.scores(self.prunable, self.sens, self.cfg.seed), plan)]
        ranges = ranges or self.ranges(sparsity)
        plans = search_plans(self.layer_stats(ranges), sparsity, below=self.cfg.max_drop is not None)
        signal = {
            s: {p.name: signal_scores(s, p.weight, self.sens.abs_grad[p.name]) for p in self.prunable}
            for s in self.cfg.signals
        }
        out = [
            CandidatePlan(Candidate.mix_and_match(s, name), signal[s], plan)
            for s in self.cfg.signals
            for name, plan in plans.items()
        ]
        for name in self.cfg.range_baselines:
            b = BASELINES[name]
            plan = b.plan(self.prunable, self.sens, sparsity, self.cfg.seed)
            rankings = dict(signal)
            if b.own_ranking(self.cfg.signals) not in rankings:
                rankings[b.name] = b.scores(self.prunable, self.sens, self.cfg.seed)
            for rank, scores in rankings.items():
                out.append(CandidatePlan(Candidate.mix_and_match(rank, f"baseline:{b.name}"), scores, plan))
        return out

    def materialize(self, cp: CandidatePlan, recalibrate: bool = True, masks: Masks | None = None) -> nn.Module:
        """The model with this candidate's masks applied (and BN re-calibrated): weights are zeroed in place.
        ``masks``: the candidate's masks when the caller already built them (screening hashes them first)."""
        self.model.load_state_dict(self.original)
        apply_masks_(self.model, masks if masks is not None else build_masks(cp.scores, cp.plan))
        if recalibrate and self.use_bn:
            recalibrate_bn(self.model, self.data.calib_x, self.cfg.batch_size, device=self.device)
        return self.model

    def screen(self, cp: CandidatePlan, masks: Masks | None = None) -> Candidate:
        """Zero-shot and BN-re-calibrated accuracy, and the exact sparsity, of one candidate, computed on
        ``--device``; the model comes back where it was (the CPU: export and the benchmarks read it there)."""
        c = cp.candidate
        with on_device(self.model, self.device):
            self.materialize(cp, recalibrate=False, masks=masks)
            c.sparsity = weight_sparsity(self.model, self.prunable)[0].sparsity
            c.zero_shot_accuracy = self.accuracy()
            if self.use_bn:
                recalibrate_bn(self.model, self.data.calib_x, self.cfg.batch_size)
                c.accuracy = self.accuracy()
            else:
                c.accuracy = c.zero_shot_accuracy
        return c

    def glance(self, cp: CandidatePlan, masks: Masks) -> np.ndarray:
        """A candidate's first, cheap look (`compress`'s screening): masked, BN re-calibrated on the first
        ``GLANCE_RECAL`` calibration images only, its per-image answers on the first ``GLANCE_IMAGES``
        selection images (`evaluation.right_answers`); at most a third of each split. Fills its sparsity
        and, until `screen_raced` settles it, the glance's accuracy on ``screened_images`` images."""
        c = cp.candidate
        # at most a third of each split: on small ones a full-size glance would cost nearly a full screening
        n = min(GLANCE_IMAGES, max(1, len(self.data.eval_x) // 3))
        recal = min(GLANCE_RECAL, max(2, len(self.data.calib_x) // 3))
        with on_device(self.model, self.device):
            self.materialize(cp, recalibrate=False, masks=masks)
            c.sparsity = weight_sparsity(self.model, self.prunable)[0].sparsity
            if self.use_bn:
                recalibrate_bn(self.model, self.data.calib_x[:recal], self.cfg.batch_size)
            right = right_answers(self.model, self.data.eval_x[:n], self.data.eval_y[:n], self.cfg.batch_size)
        c.accuracy, c.screened_images = float(right.mean()), n
        c.zero_shot_accuracy = None if self.use_bn else c.accuracy
        return right

    def screen_raced(self, cplans: list[CandidatePlan], looks: list[np.ndarray], bar: ScreeningBar) -> list[Race]:
        """Settle the glanced candidates as `compress` does (`screening.race`): the most promising glances
        first, so the bar rises early; a candidate whose glance is below the bar by `screening.Z_STOP`
        standard errors keeps the glance's estimate; every other one gets the full BN re-calibration and is
        evaluated rung by rung, stopping once even every unseen selection image right would leave it below
        the bar, or once its answers so far are below the bar-holder's on the same images by `Z_STOP`
        paired standard errors (its accuracy, when complete, is exactly a full screening's).
        ``screened_images`` says on how many images a stopped one was estimated. No zero-shot pass before
        re-calibration: the masked model with the dense statistics decides nothing, and it cost a third of
        screening (`screen` still measures it, for studies); without BatchNorm the raced accuracy is the
        zero-shot one."""
        x, y, bs = self.data.eval_x, self.data.eval_y, self.cfg.batch_size
        cands = [cp.candidate for cp in cplans]
        contends = [bar.contends(c) for c in cands]
        order = sorted(range(len(cands)), key=lambda i: (not contends[i], -float(looks[i].mean()), i))

        def answers(i: int, start: int, stop: int) -> np.ndarray:
            if start == 0:  # its turn: rebuilt from the dense weights, re-calibrated on every calibration image
                self.materialize(cplans[i], recalibrate=False, masks=build_masks(cplans[i].scores, cplans[i].plan))
                if self.use_bn:
                    recalibrate_bn(self.model, self.data.calib_x, bs)
            return right_answers(self.model, x[start:stop], y[start:stop], bs)

        with on_device(self.model, self.device):
            races = race(
                len(cands),
                image_rungs(len(x)),
                answers,
                keep=bar.keep,
                floor=bar.floor,
                contends=contends,
                order=order,
                looks=looks,
            )
        for c, r in zip(cands, races):
            c.accuracy = r.accuracy
            c.screened_images = None if r.complete else r.seen
            c.zero_shot_accuracy = None if self.use_bn else c.accuracy
        return races

    def screen_all(
        self,
        cplans: list[CandidatePlan],
        dense_accuracy: float,
        bar: ScreeningBar,
        probe: int,
        progress: Progress | None = None,
    ) -> tuple[list[int], ScreeningSummary]:
        """`compress`'s screening of ``cplans``: a glance at every candidate (masks, BN on `GLANCE_RECAL`
        images, `GLANCE_IMAGES` answers; identical masks once, a collapsed signal stopped after ``probe``), then
        the full re-calibration and evaluation, raced, for those the glance does not put clearly below the bar
        (`screen_raced`). Returns the indices kept and the summary, ``stopped`` filled (which rule)."""
        progress = progress or Progress()
        glance = f"BN on {GLANCE_RECAL} images, " if self.use_bn else ""
        progress.start(f"screen {len(cplans)} candidates: a glance ({glance}{GLANCE_IMAGES} images)", len(cplans))
        looks: dict[int, np.ndarray] = {}
        kept, summary = screen_candidates(
            [cp.candidate for cp in cplans],
            masks_of=lambda i: build_masks(cplans[i].scores, cplans[i].plan),
            evaluate=lambda i, masks: looks.__setitem__(i, self.glance(cplans[i], masks)),
            num_classes=self.data.num_classes,
            dense_accuracy=dense_accuracy,
            probe=probe,
            advance=progress.advance,
        )
        progress.finish()
        looked = sorted(looks)
        progress.start(f"screen {len(looked)} distinct candidates: the race over the selection split")
        races = self.screen_raced([cplans[i] for i in looked], [looks[i] for i in looked], bar)
        summary.stopped = {cplans[i].candidate.name: r.stop for i, r in zip(looked, races) if r.stop}
        share_results([cp.candidate for cp in cplans], summary.duplicates)
        progress.finish()
        return kept, summary

    def shared(self) -> Shared:
        """What every recovery task reads: a copy of the dense model (``self.model`` is masked in place),
        the calibration split to train on and the selection split to rank and stop on."""
        return Shared.for_run(self.cfg, self.dense_copy(), self.data, self.recipe, self.teacher(), self.use_bn)

    def dense_copy(self) -> nn.Module:
        """The dense model, apart from ``self.model`` (which is masked in place), in eval mode."""
        dense = copy.deepcopy(self.model)
        dense.load_state_dict(self.original)
        return dense.eval()

    def finetune(self, cp: CandidatePlan, epochs: int, on_epoch=None) -> dict:
        """Fine-tune one candidate with its masks enforced; returns the weights, fills finetuned_accuracy."""
        teacher = self.teacher()
        self.materialize(cp)
        masks = build_masks(cp.scores, cp.plan)
        d, cfg = self.data, self.cfg
        finetune(
            self.model,
            masks,
            d.calib_x,
            d.calib_y,
            epochs=epochs,
            lr=cfg.finetune_lr,
            batch_size=recovery_batch(cfg, len(d.calib_x)),
            seed=cfg.seed,
            recipe=self.recipe,
            teacher=teacher,
            on_epoch=on_epoch,
            device=self.device,
            teacher_model=self.dense_copy() if self.recipe.consistent else None,
        )
        cp.candidate.finetuned_accuracy = self.accuracy()
        return copy.deepcopy(self.model.state_dict())


def model_input_size(model: nn.Module) -> int | None:
    """The square input size a (timm) model was built for, if it says."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size")
    return int(size[-1]) if size else None


def load_workspace_inputs(cfg: CompressConfig):
    """Data, then the model built to fit it (classes, channels, input size), checked against each other.

    Datasets with a native size (Fashion-MNIST: 28 px) decide the model's input size. Image folders have
    none, so without --image-size they are resized to what the model was built for.
    """
    image_size = cfg.image_size
    if image_size is None and cfg.data.startswith("imagefolder:"):
        probe = load_model(cfg.model, pretrained=False, num_classes=cfg.num_classes, in_chans=cfg.in_chans)
        image_size = model_input_size(probe)
    data = load_data(
        cfg.data,
        calib_size=cfg.calib_size,
        eval_size=cfg.eval_size,
        test_size=cfg.test_size,
        image_size=image_size,
        seed=cfg.seed,
    )
    model = load_model(
        cfg.model,
        checkpoint=cfg.checkpoint,
        pretrained=cfg.pretrained,
        num_classes=cfg.num_classes or data.num_classes,
        in_chans=cfg.in_chans or data.in_chans,
        img_size=data.image_size,
    )
    return model, match_data_to_model(model, data)


def compress(cfg: CompressConfig, progress: Progress | None = None) -> Report:
    """Run the whole job and write ``model.onnx``, ``dense.onnx``, ``report.json|md``, ``pareto.png``."""
    progress = progress or Progress()
    cfg.validate()  # every option, before anything loads
    if cfg.export:  # the benchmark device too: an unreachable board must fail now, not after the pruning
        from .benchmarks.device import check_device

        check_device(cfg.latency_from, cfg.identity, cfg.ssh_options)
    target = get_target(cfg.target)
    out = Path(cfg.out)
    # Connect before --out is claimed: an unreachable head leaves it untouched.
    executor = executor_for(cfg.cluster)
    try:
        if cfg.cluster:
            progress.log(f"recovery runs on {getattr(executor, 'describe', lambda: cfg.cluster)()}")
        # Outside the staging folder, under a name the output folder does not manage: it survives the publish.
        store = ResultStore(out / RECOVER_STORE) if cfg.resume else None
        with claim_output_dir(out, log=progress.log) as od:  # locked; the old set stays until the publish
            report = _compress(cfg, target, od.staging, progress, executor, store)
            names = sorted(f.name for f in od.staging.iterdir()) + ["report.json"]
            report.artifacts = {name: str(out / name) for name in names}  # exactly the published set
            (od.staging / "report.json").write_text(report.to_json())
            od.publish()
            return report
    finally:
        executor.close()


def own_runs(cfg: CompressConfig, duplicates: dict[str, str]) -> set[str]:
    """The candidates that are Mix-and-Match's range baselines' own runs (``magnitude/baseline:mag`` is MAG):
    recovered whatever they screen (`recover.Job.entrant`), so the search contains its baselines after recovery
    too. A run sharing another candidate's masks is that candidate (screening kept only the first)."""
    if cfg.method != "mix-and-match":
        return set()
    names = [
        Candidate.mix_and_match(BASELINES[b].own_ranking(cfg.signals), f"baseline:{b}").name
        for b in cfg.range_baselines
    ]  # named as `Workspace.plans` names them
    return {duplicates.get(n, n) for n in names}


@dataclass
class ScreeningBar:
    """The accuracy a candidate must still be able to reach to matter (`screening.race`'s bar): the ``keep``-th
    best screened accuracy among completed contenders (``keep``: the candidates the recover stage takes by
    screening accuracy, or 1: the pick), at least ``floor`` (``--max-drop``: dense minus the drop). Contenders:
    the candidates at the sparsity target (with ``--max-drop`` every one).

    A candidate stopped below the bar can be neither recovered (``Top`` ranks by screening accuracy and takes
    the ``keep`` best, which run to the end) nor picked: its estimate stays under the bar. Stopped by the
    bound, provably; by the glance, at `screening.Z_STOP` standard errors. Halving recovers every candidate,
    so only 1 (the pick without recovery) is kept there, which recovery does not use."""

    keep: int
    floor: float
    target: float | None  # None: every candidate contends (--max-drop)

    @classmethod
    def for_run(cls, cfg: CompressConfig, dense_accuracy: float, schedule: Top | Halving | None) -> ScreeningBar:
        keep = schedule.k if isinstance(schedule, Top) else 1
        floor = dense_accuracy - cfg.max_drop / 100 if cfg.max_drop is not None else 0.0
        return cls(max(1, keep), max(0.0, floor), None if cfg.max_drop is not None else cfg.sparsity)

    def contends(self, c: Candidate) -> bool:
        """Whether a screened candidate raises the bar: it is at the sparsity target (any with --max-drop)."""
        return self.target is None or c.sparsity >= self.target - 1e-6


def search_channels(inp: SearchInputs) -> Found:
    """Channel mode's search (`structured.flow.search_channels`), imported on use: torch-pruning's dependency
    graph stays off the unstructured path."""
    from .structured.flow import search_channels as search

    return search(inp)


def _compress(
    cfg: CompressConfig,
    target: Target,
    staging: Path,
    progress: Progress,
    executor: Executor | None = None,
    store: ResultStore | None = None,
) -> Report:
    """One flow for both granularities: load, the granularity's search (`SEARCHES`), the shared end."""
    torch.manual_seed(cfg.seed)
    t = Timings()
    with t("load"):
        progress.start("load model and data")
        model, data = load_workspace_inputs(cfg)
        progress.finish()
    threads = bench_threads(cfg.threads, target, cfg.latency_from)
    inp = SearchInputs(cfg, target, model, data, staging, progress, t, executor or InProcess(), store, threads)
    return finish(inp, SEARCHES[cfg.granularity](inp))


def search_unstructured(inp: SearchInputs) -> Found:
    """Unstructured mode's search: a candidate is a set of weight masks on the dense model.

    dense eval → sensitivity → ranges (Phase 1) → strategies (Phase 2) → screening (masks + BN
    re-calibration, raced) → recovery of the best few and of the range baselines' own runs (Phase 3) →
    selection (`selection.select_index`)."""
    cfg, model, data, progress, t = inp.cfg, inp.model, inp.data, inp.progress, inp.t
    with t("dense_eval"):
        progress.start("evaluate dense model")
        t0 = time.perf_counter()
        with on_device(model, resolve_device(cfg.device)):  # where screening will run: its rate, below
            dense_acc = accuracy(model, data.eval_x, data.eval_y, cfg.batch_size)
        eval_s = time.perf_counter() - t0
        params, macs = params_and_macs(model, data.eval_x[:1])
        progress.finish()
    progress.log(f"dense accuracy {dense_acc:.2%}, {params:,} params, {macs / 1e6:.1f} MMACs")

    with t("sensitivity"):
        progress.start("sensitivity signals (gradients, GraSP)")
        grasp = cfg.method == "grasp" or (cfg.method == "mix-and-match" and "grasp" in cfg.range_baselines)
        ws = Workspace(cfg, model, data, with_hessian=grasp)  # GraSP's Hessian-gradient product is costly
        progress.finish()

    with t("ranges"):
        ranges = ws.ranges(cfg.sparsity, cfg.method)
    with t("strategies"):
        cplans = ws.plans(cfg.method, cfg.sparsity, ranges)
    if cfg.method == "mix-and-match":
        low, high = reachable(ws.layer_stats(ranges))
        short = (
            "" if low <= cfg.sparsity <= high else f"; not {cfg.sparsity:.1%}: the baseline candidates compete there"
        )
        progress.log(f"Mix-and-Match ranges reach {low:.1%}-{high:.1%} global sparsity{short}")

    schedule = recovery_schedule(cfg)
    # this machine's rate on the dense evaluation: how long screening will take, said before it starts
    rate = macs * len(data.eval_x) / max(eval_s, 1e-9) / 1e9
    # at most: the glance, then the full re-calibration and evaluation (no candidate stopped)
    recal = min(len(data.calib_x), cfg.batch_size * BN_RECAL_BATCHES) + GLANCE_RECAL if ws.use_bn else 0
    estimate = screening_estimate(macs, len(cplans), len(data.eval_x) + GLANCE_IMAGES, recal, rate, 1)
    warning = screening_warning(estimate, len(cplans))
    if warning:
        progress.log(f"note: {warning}")
    with t("screening"):
        bar = ScreeningBar.for_run(cfg, dense_acc, schedule)
        probe = SCREEN_PROBE if cfg.method == "mix-and-match" else 0
        kept, screening = ws.screen_all(cplans, dense_acc, bar, probe, progress)
    cplans = [cplans[i] for i in kept]
    for signal, why in screening.skipped_signals.items():
        n = sum(1 for name in screening.skipped if name.startswith(f"{signal}/"))
        progress.log(f"signal {signal}: {why}; its other {n} candidates were not screened")

    cands = [cp.candidate for cp in cplans]
    finetuned: dict[int, dict] = {}  # candidate index -> recovered weights (the last rung's survivors)
    with t("finetune"):
        if schedule is not None:
            # at the target (any sparsity with --max-drop); candidates sharing another's masks train once
            pool = [
                i
                for i, c in enumerate(cands)
                if (cfg.max_drop is not None or c.sparsity >= cfg.sparsity - 1e-6)
                and c.name not in screening.duplicates
            ]
            pool = pool or [i for i, c in enumerate(cands) if c.name not in screening.duplicates]
            entrants = own_runs(cfg, screening.duplicates)
            jobs = [
                Job(
                    cands[i].name,
                    MaskBuild(build_masks(cplans[i].scores, cplans[i].plan)),
                    cands[i].accuracy,
                    entrant=cands[i].name in entrants,
                )
                for i in pool
            ]
            n_in = sum(j.entrant for j in jobs)
            which = f"{len(jobs)} candidate(s)"
            if isinstance(schedule, Top) and n_in:
                which = f"the {schedule.k} best screened and the range baselines' own plans ({n_in}) of {which}"
            progress.log(
                f"recover ({cfg.recover}, up to {cfg.finetune_epochs} epochs, {cfg.recovery}, on {ws.device}): {which}"
            )
            outcomes = recover(jobs, ws.shared(), schedule, inp.executor, progress, inp.store)
            for i, o in zip(pool, outcomes, strict=True):
                record_recovery(cands[i], o)
                if o.survived:
                    finetuned[i] = o.state

    points = [Point(c.final_accuracy, c.sparsity) for c in cands]
    for c, on_front in zip(cands, pareto_mask(points)):
        c.pareto = on_front
    among = sorted(finetuned) or list(range(len(cands)))  # once recovery ran, the pick is one it recovered
    pick, why = select_index(
        [points[i] for i in among], sparsity=cfg.sparsity, max_drop=cfg.max_drop, dense_accuracy=dense_acc
    )
    idx = among[pick]

    held: list[int] = []  # the candidate ws.model holds now: the pick is not rebuilt if nothing came between

    def build(i: int) -> nn.Module:  # candidate i in ws.model (one module: weights zeroed in place)
        if held != [i]:
            if i in finetuned:
                model.load_state_dict(finetuned[i])
            else:
                ws.materialize(cplans[i])
            held[:] = [i]
        return model

    _, per_layer = weight_sparsity(build(idx), ws.prunable)
    chosen = cands[idx]
    metadata = {
        "source_model": cfg.model,
        "strategy": chosen.strategy,
        "signal": chosen.signal,
        "global_sparsity": f"{chosen.sparsity:.6f}",
        "target": inp.target.name,
        **data.split_metadata(cfg.seed),
        "layer_sparsity": json.dumps({k: round(v, 6) for k, v in per_layer.items()}),
    }
    layer_reports = []
    for layer in ws.layers:
        r, removed = ranges[layer.name], per_layer.get(layer.name, 0.0)
        layer_reports.append(
            LayerReport(
                name=layer.name,
                role=layer.role,
                unit="weight",
                units=layer.numel,
                kept=layer.numel - round(removed * layer.numel),
                removed=removed,
                params=layer.numel,
                range=[r.lo, r.hi],
                shape=list(layer.shape),
                baseline_range=list(r.baseline) if r.baseline else None,
                rules=r.rules + [f"conflict: {c}" for c in [r.conflict] if c],
            )
        )
    baselines = [i for i, c in enumerate(cands) if c.strategy.startswith("baseline")]
    return Found(
        dense=DenseSummary(accuracy=dense_acc, params=params, macs=macs),
        dense_model=dense_copy(model, ws.original),
        dense_exported=False,
        candidates=cands,
        chosen=idx,
        why=why,
        ship=lambda: build(idx),
        metadata=metadata,
        layers=layer_reports,
        on_test=[(i, lambda i=i: build(i)) for i in baselines],
        runner_up=runner_up(cands, idx, cfg),
        build=build,
        screening=asdict(screening),
        config=config_dict(cfg, threads=inp.threads, finetune_batch=recovery_batch(cfg, len(ws.data.calib_x))),
    )


# One place per granularity: its search, from the loaded model and data to the pick (`granularity.Found`).
SEARCHES: dict[str, Search] = {"unstructured": search_unstructured, "channel": search_channels}

"""``--granularity channel``: structured Mix-and-Match, compacted ONNX, selection on measured latency.

groups (DependencyGraph) → dense eval + dense ONNX → probe: the narrowest model the rules allow,
compacted, exported and timed next to dense (fails early, naming the layer, where the graph cannot
follow a model; turns a latency goal into MACs) → [``--latency-costs``: each group narrowed alone and
timed, a per-layer latency model (``costs``)] → group signals → ranges (3 signals x 3 global targets, one
threshold each, clipped by ``rules/structured.json``) → ten strategies per signal [+ three latency-model
allocations] → widths rounded to ``round_to`` → screening (compact + BN re-calibration + eval + ONNX export
with parity) → latency of every distinct architecture (onnxruntime, the target's threads, batch 1,
interleaved with dense) → fine-tune the best few → goal rounds → Pareto on accuracy vs measured latency →
select (a latency pick re-timed alone against dense); then `granularity.finish`, the same as unstructured:
test split → deliver (export, INT8, ORT, benchmark) → report.

Candidates of different signals but equal widths are the same architecture: their latency is measured
once (their accuracy is not: different channels survive).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import platform
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from torch import nn

from ..cluster import Executor, InProcess
from ..deliver import BenchDevice
from ..errors import EdgepruneError
from ..evaluation import accuracy, params_and_macs
from ..granularity import Found, SearchInputs
from ..inventory import Layer
from ..ranges import LayerRange, Rule, apply_rules, baseline_ranges, parse_rules, range_targets, read_rules_file
from ..recover import (
    Job,
    ResultStore,
    Shared,
    best_rate,
    budget_hint,
    record_recovery,
    recover,
    recovery_batch,
    recovery_rates,
    recovery_schedule,
    with_rates,
)
from ..recovery import RECIPES, has_batchnorm, on_device, recalibrate_bn, resolve_device, teacher_logits_if_distilling
from ..report import (
    Candidate,
    DenseSummary,
    GoalRound,
    GroupReport,
    LatencyLineReport,
    LayerReport,
    Report,
    StructuredReport,
)
from ..selection import (  # noqa: F401 - meets, eligible, select_structured, ...: re-exported for callers of flow
    HEAD_TO_HEAD,
    NEAR_FASTEST,
    PAIR_REPEATS,
    Point,
    confirm_head_to_head,
    eligible,
    mac_pareto,
    meets,
    pareto_mask,
    runner_up,
    select_structured,
)
from ..stages import config_dict
from ..strategies import STRATEGY_NAMES, LayerStats, make_all_plans
from ..targets import bench_threads, host_cpu_flags, round_to_hint
from .costs import LatencyModel, calibrated, fit_latency_model, latency_allocation, layer_macs
from .groups import ROOT_TYPES, ChannelGroup, CompactBuild, GroupGraph, compact
from .planning import Widths, allowed_keeps, max_ratio, units_to_remove, widths_for
from .signals import global_threshold_ratios, group_scores

RANGE_SIGNALS: tuple[str, ...] = ("magnitude", "gradient", "product")
CHECK_IMAGES = 64  # evaluation images every exported candidate is compared on (ONNX vs PyTorch)
TAYLOR_BATCH = 32  # images per mini-batch of the Taylor (gradient) signal
# Latency-aware candidates: the goal's saving, scaled (the lattice of widths rounds it either way)
LATENCY_LEVELS: dict[str, float] = {"latency-": 0.85, "latency": 1.0, "latency+": 1.15}
GOAL_ROUNDS = 3  # --max-drop / a latency goal: at most this many Phase-1 plans (next_goal_ratio, next_speed_macs)
# Prior exponent of drop ~ a * ratio**p while only one round is measured: accuracy loss grows faster than
# linearly with the share of channels removed; the next round re-fits p from two measured rounds.
DROP_EXPONENT = 3.0
DROP_AIM = 0.8  # aim a new round at this share of --max-drop: the fitted curve is a guess, noise is ~0.5 point
BRACKET_CLOSE = 1.15  # a met and a missed round this close (ratio of fractions) need no round between them
COST_FLOOR = 0.05  # a group's ms per MAC never counts below this share of dense ms per MAC


@dataclass
class ChannelCandidate:
    """One structured candidate: which units go, and what screening measured."""

    candidate: Candidate
    widths: Widths
    remove: dict[str, list[int]]
    onnx: Path | None = None
    parity: float | None = None
    params: int = 0
    round: int = 0  # the goal round that planned it (0: the first; see ChannelSearch.lighter / .faster)

    @property
    def shape_key(self) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(self.widths.items()))


# -- rules ------------------------------------------------------------------------------------------------


def load_structured_rules(user_file: str | Path | None = None) -> list[Rule]:
    """``rules/structured.json``, then the ``structured`` list of the user's rules file, if it has one."""
    res = resources.files("edgeprune.rules").joinpath("structured.json")
    rules = parse_rules(json.loads(res.read_text()), "structured.json")
    if user_file is not None:
        data = read_rules_file(user_file)
        if isinstance(data, dict) and "structured" in data:
            rules += parse_rules({"rules": data["structured"]}, f"{user_file} (structured)")
    return rules


def group_layer(g: ChannelGroup) -> Layer:
    """A group as the rules see it: its name, role and the weights it runs through."""
    return Layer(
        name=g.name,
        role=g.role,
        kind="conv",
        shape=(g.channels,),
        numel=g.params,
        prunable=True,
        index=g.index,
        depth=g.depth,
    )


def group_ranges(
    groups: list[ChannelGroup],
    base: dict[str, tuple[float, float]],
    rules: list[Rule],
    round_to: int,
) -> dict[str, LayerRange]:
    """Baseline ranges clipped by the rules, then by how far each group can shrink at ``round_to``."""
    ranges = apply_rules([group_layer(g) for g in groups], rules, base)
    for g in groups:
        r, cap = ranges[g.name], max_ratio(g, round_to)
        if r.hi > cap:
            r.rules.append(f"at most {cap:.0%} of its units can go at round_to={round_to}")
        r.lo, r.hi = min(r.lo, cap), min(r.hi, cap)
    return ranges


# -- targets and selection ----------------------------------------------------------------------------------


def validate_selection(cfg) -> None:
    if cfg.latency_budget_ms is not None and cfg.speedup is not None:
        raise EdgepruneError("give either --latency-budget or --speedup, not both")
    if cfg.latency_budget_ms is not None and not cfg.latency_budget_ms > 0:
        raise EdgepruneError(f"--latency-budget must be a positive number of milliseconds, got {cfg.latency_budget_ms}")
    if cfg.speedup is not None and not cfg.speedup >= 1.0:
        raise EdgepruneError(f"--speedup must be >= 1 (times faster than dense), got {cfg.speedup}")
    if cfg.round_to is not None and cfg.round_to < 1:
        raise EdgepruneError(f"--round-to must be >= 1, got {cfg.round_to}")
    if cfg.method != "mix-and-match":
        raise EdgepruneError(
            f"--granularity channel supports --method mix-and-match only, got '{cfg.method}'; "
            "use --granularity unstructured for the baselines"
        )


@dataclass(frozen=True)
class LatencyLine:
    """Latency vs MACs through two measured points: dense and the narrowest model (every group at its
    minimum width). Between them latency is close to linear in MACs; the intercept is what a model of
    this depth costs whatever its width (operator overhead), which bounds the reachable speedup."""

    dense_ms: float
    dense_macs: int
    floor_ms: float
    floor_macs: int

    def macs_for(self, ms: float) -> float | None:
        """MACs at which the line reaches ``ms``; None when ``ms`` is below the narrowest model's latency."""
        if ms <= self.floor_ms or self.dense_ms <= self.floor_ms:
            return None
        w = (ms - self.floor_ms) / (self.dense_ms - self.floor_ms)
        return self.floor_macs + w * (self.dense_macs - self.floor_macs)

    def ms_for(self, macs: float) -> float:
        """The line's latency at ``macs`` (the inverse of ``macs_for``)."""
        if self.dense_macs <= self.floor_macs:
            return self.dense_ms
        w = (macs - self.floor_macs) / (self.dense_macs - self.floor_macs)
        return self.floor_ms + w * (self.dense_ms - self.floor_ms)


def latency_goal_ms(cfg, line: LatencyLine | None, dense_ms: float | None = None) -> float | None:
    """The latency the user asked for: ``--latency-budget``, or dense / ``--speedup``; None if neither.
    ``dense_ms``: dense as timed with the candidates, as selection reads the goal (default: the line's)."""
    if cfg.latency_budget_ms is not None:
        return cfg.latency_budget_ms
    if cfg.speedup is not None and line is not None:
        return (line.dense_ms if dense_ms is None else dense_ms) / cfg.speedup
    return None


def channel_target(cfg) -> float:
    """Fraction of channels to remove when no latency measurement guides it.

    Removing a fraction r of every group's channels leaves about (1 - r)^2 of the MACs and weights, so a
    weight sparsity s needs r = 1 - sqrt(1 - s) and a MAC reduction X needs r = 1 - 1/sqrt(X).
    """
    if cfg.speedup is not None:
        r = 1.0 - 1.0 / math.sqrt(cfg.speedup)
    else:
        r = 1.0 - math.sqrt(1.0 - cfg.sparsity)
    return min(0.85, max(0.05, r))


# -- model surgery ----------------------------------------------------------------------------------------


def prunable_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, ROOT_TYPES))


# -- the flow ---------------------------------------------------------------------------------------------


def search_channels(inp: SearchInputs) -> Found:
    """Channel mode's search (the module docstring): the loaded model and data in, the pick and the report's
    channel parts out (`granularity.Found`; `granularity.finish` delivers and reports). Writes ``dense.onnx``
    into the staging folder (candidates are timed against it); candidates' files go to a temporary folder."""
    validate_selection(inp.cfg)
    with tempfile.TemporaryDirectory(prefix="edgeprune-channel-") as work:
        search = ChannelSearch(inp.cfg, inp.target, inp.model, inp.data, inp.staging, Path(work), inp.progress, inp.t)
        search.executor, search.store = inp.executor, inp.store
        search.search()
        search.select()
        return search.found()


class ChannelSearch:
    """The stages of `search_channels`, in order; each one reads what the previous ones left."""

    def __init__(self, cfg, target, model: nn.Module, data, staging: Path, work: Path, progress, t):
        self.cfg, self.target, self.data, self.staging, self.work = cfg, target, data, staging, work
        self.progress, self.t = progress, t
        self.model = model.eval()
        self.round_to = cfg.round_to or target.round_to
        self.threads = bench_threads(cfg.threads, target, cfg.latency_from)
        self.device = BenchDevice.from_config(cfg, self.threads)  # where the shipped artifacts are benchmarked
        self.timer = self.device.search_timer()  # where probe, latency model and candidates are timed
        self.example, self.check = data.eval_x[:1], data.eval_x[:CHECK_IMAGES]
        self.sample = data.eval_x[:1].numpy().astype(np.float32)
        self.use_bn = cfg.bn_recal and has_batchnorm(model)
        self.torch_device = resolve_device(cfg.device)  # where screening and BN re-calibration run (--device)
        self.latency_model: LatencyModel | None = None  # fitted by costs() with --latency-costs
        self.notes: list[str] = []  # for the report: what ran differently from what was asked, and why
        self.ratios: list[float] = []  # the Phase-1 channel fraction of each goal round
        self.goal_rounds: list[GoalRound] = []  # each round as the next round's decision saw it
        self.ranges_by_round: list[dict[str, LayerRange]] = []
        self.finetuned: dict[int, nn.Module] = {}  # finetune: candidate index -> recovered model
        self.executor: Executor = InProcess()  # finetune: where the recover stage runs
        self.store: ResultStore | None = None  # finetune: finished rungs to reuse (--resume)
        # Stage state, each field set by the stage named (None / empty until it ran): benchmarks drive the
        # stages one by one and read these.
        self.graph: GroupGraph | None = None  # discover
        self.groups: list[ChannelGroup] = []  # discover: the groups that can shrink at round_to
        self.dense_acc: float = 0.0  # dense
        self.params: int = 0  # dense
        self.macs: int = 0  # dense
        self.dense_weights: int = 0  # dense: prunable weights
        self.dense_export = None  # dense: ExportResult of dense.onnx
        self.rules: list[Rule] = []  # probe
        self.caps: dict[str, LayerRange] = {}  # probe: the rules' ranges alone
        self._macs_cache: dict[tuple, int] = {}  # probe
        self.probe_widths: Widths = {}  # probe: every group at its narrowest allowed width
        self.line: LatencyLine | None = None  # probe
        self.scores: dict[str, dict] = {}  # signals: signal -> group -> unit scores
        self.goal_ratio: float = 0.0  # plan: the last round's channel fraction
        self.ranges: dict[str, LayerRange] = {}  # plan: the last round's Phase-1 ranges
        self.cands: list[ChannelCandidate] = []  # plan (+ lighter rounds); screen / measure / finetune fill them
        self.dense_ms: float = 0.0  # measure: dense's p50 in the run that timed every candidate
        self.why: str = ""  # select
        self.chosen: ChannelCandidate | None = None  # select
        self.final: nn.Module | None = None  # select: the model to ship (fine-tuned when it was)

    def search(self) -> None:
        """Every stage up to the selection: groups, dense, probe, latency model, signals, Phase 1 and 2,
        screening, timing, recovery, then the goal rounds."""
        self.discover()
        self.dense()
        self.probe()
        self.costs()
        self.signals()
        self.plan()
        self.screen()
        self.measure()
        self.finetune()
        self.close_round()
        self.lighter()
        self.faster()

    def _export(self, model: nn.Module, path: Path, metadata: dict[str, str] | None = None):
        from ..export import export_onnx

        return export_onnx(
            model, self.example, path, check_inputs=self.check, opset=self.target.opset, metadata=metadata
        )

    def _bench(self, paths: list[Path], warmup: int, runs: int) -> list[dict]:
        return self.timer.time(paths, self.sample, runs=runs, warmup=warmup)

    # -- stages -------------------------------------------------------------------------------------------------

    def discover(self) -> None:
        with self.t("groups"):
            self.progress.start("dependency graph: channel groups and attention heads")
            self.graph = GroupGraph(self.model, self.example)
            self.groups = [g for g in self.graph.groups if len(allowed_keeps(g, self.round_to)) > 1]
            self.progress.finish()
        if not self.groups:
            raise EdgepruneError(
                f"model '{self.cfg.model}' has no channel group that can shrink in multiples of {self.round_to}; "
                "pass a smaller --round-to or use --granularity unstructured"
            )
        heads = sum(g.kind == "heads" for g in self.groups)
        self.progress.log(f"{len(self.groups)} prunable groups ({heads} attention), round_to={self.round_to}")
        if self.timer.spec == "local":  # latency measured on this host: candidates it cannot tell apart waste accuracy
            hint = round_to_hint(self.target, self.round_to, platform.machine(), host_cpu_flags())
            if hint:
                self.progress.log(hint)
        if self.timer is not self.device:
            self.notes.append(
                f"{self.device.spec} is emulated (its timings mean nothing): the search timed candidates on this "
                "machine; the shipped artifacts ran on the emulator for their accuracy"
            )
            self.progress.log(f"note: {self.notes[-1]}")
        elif self.timer.spec != "local":
            self.progress.log(f"timing the probe and every candidate on {self.timer.spec}")

    def dense(self) -> None:
        d = self.data
        with self.t("dense_eval"):
            self.progress.start("evaluate dense model")
            with on_device(self.model, self.torch_device):
                self.dense_acc = accuracy(self.model, d.eval_x, d.eval_y, self.cfg.batch_size)
            self.params, self.macs = params_and_macs(self.model, self.example)
            self.dense_weights = prunable_weights(self.model)
            self.progress.finish()
        self.progress.log(f"dense accuracy {self.dense_acc:.2%}, {self.params:,} params, {self.macs / 1e6:.1f} MMACs")
        with self.t("export"):
            self.progress.start("export dense ONNX")
            meta = {"source_model": self.cfg.model, "strategy": "dense", "target": self.target.name}
            self.dense_export = self._export(self.model, self.staging / "dense.onnx", meta)
            self.progress.finish()

    def probe(self) -> None:
        """Every group at the narrowest width the rules allow, once: a layer the dependency graph cannot
        follow fails here, named, before any slow work; and its latency next to dense's calibrates
        latency against MACs (and tells how fast this search can possibly get)."""
        with self.t("latency"):
            self.progress.start("probe: narrowest model vs dense (latency)")
            self.rules = load_structured_rules(self.cfg.rules)
            self.caps = group_ranges(self.groups, {}, self.rules, self.round_to)  # the rules alone
            self._macs_cache = {}
            narrowest = self.probe_widths = widths_for(
                self.groups, {n: r.hi for n, r in self.caps.items()}, self.round_to
            )
            probe = compact(
                self.model, self.example, {n: list(range(g.units - narrowest[n])) for n, g in self._by_name()}
            )
            self._export(probe, self.work / "probe.onnx")
            lat = self._bench(
                [self.staging / "dense.onnx", self.work / "probe.onnx"], warmup=5, runs=self.cfg.bench_runs
            )
            self.line = LatencyLine(
                lat[0]["latency_ms"]["p50"],
                self.macs,
                lat[1]["latency_ms"]["p50"],
                params_and_macs(probe, self.example)[1],
            )
            self.progress.finish()
        self.progress.log(
            f"dense {self.line.dense_ms:.3f} ms, narrowest model {self.line.floor_ms:.3f} ms "
            f"({self.threads} thread(s), batch 1)"
        )

    def costs(self) -> None:
        """Each group narrowed alone to the narrowest width the rules allow, and the probe, each timed head to
        head with dense (with many models in one run dense runs with cold caches and every saving reads
        high: 2x on a 0.2 ms MobileNetV3), fit the latency model (``costs``): what each layer's MACs cost on
        this target."""
        if not self.cfg.latency_costs:
            return
        timed = [g for g in self.groups if self.caps[g.name].hi > 0]
        kept = self.probe_widths  # each group alone at the width it has in the narrowest model
        dense_path = self.staging / "dense.onnx"
        with self.t("latency"):
            self.progress.start(f"latency model: {len(timed)} groups narrowed one at a time", total=len(timed) + 1)
            pairs = {"probe": self._pair_ms(dense_path, self.work / "probe.onnx")}
            macs = {}
            for i, g in enumerate(timed):
                narrowed = compact(self.model, self.example, {g.name: list(range(g.units - kept[g.name]))})
                macs[g.name] = layer_macs(narrowed, self.example)
                pairs[g.name] = self._pair_ms(dense_path, self._export(narrowed, self.work / f"cost{i}.onnx").path)
                self.progress.advance()
            self.progress.finish()
        # each pair's ratio to its own dense run (the VM drifts between pairs), on one dense latency
        dense_ms = float(np.median([d for d, _ in pairs.values()]))
        after = {name: dense_ms * ms / d for name, (d, ms) in pairs.items()}
        dense_macs = layer_macs(self.model, self.example)
        floor_rate = COST_FLOOR * dense_ms / max(1.0, sum(dense_macs.values()))
        model = fit_latency_model(dense_macs, macs, dense_ms, {g.name: after[g.name] for g in timed}, floor_rate)
        narrowest = {g.name: self.probe_widths[g.name] / g.units for g in self.groups}
        self.latency_model = calibrated(model, narrowest, after["probe"])
        self.progress.log(
            f"latency model: dense {dense_ms:.3f} ms, narrowest {after['probe']:.3f} ms, "
            f"model scaled by {self.latency_model.scale:.2f} to match the narrowest"
        )

    def signals(self) -> None:
        d = self.data
        with self.t("sensitivity"):
            self.progress.start("group signals (magnitude, Taylor gradient, product)")
            n = min(self.cfg.gradient_samples, len(d.calib_x))
            self.scores = group_scores(self.graph, d.calib_x[:n], d.calib_y[:n], TAYLOR_BATCH)
            self.progress.finish()

    def plan(self, ratio: float | None = None, round_: int = 0) -> None:
        """Phase 1 ranges around ``ratio`` (default: the goal's, `target_ratio`) and Phase 2's candidates in
        ``self.cands``; ``round_`` > 0 (a later goal round) suffixes the names: ``signal/strategy/light1`` for a
        lighter one (``--max-drop``), ``.../fast1`` for a faster one (a latency goal)."""
        groups, round_to = self.groups, self.round_to
        with self.t("ranges"):
            r = self.goal_ratio = self.target_ratio() if ratio is None else ratio
            self.ratios.append(r)
            targets = range_targets(r)
            self.progress.start("Phase 1: group baseline ranges", total=len(RANGE_SIGNALS) * len(targets))
            runs = []
            for signal in RANGE_SIGNALS:
                for tgt in targets:
                    runs.append(global_threshold_ratios(groups, self.scores[signal], tgt, round_to))
                    self.progress.advance()
            self.ranges = group_ranges(groups, baseline_ranges(runs), self.rules, round_to)
            self.ranges_by_round.append(self.ranges)
            self.progress.finish()
        with self.t("strategies"):
            stats = {
                g.name: LayerStats(self.ranges[g.name].lo, self.ranges[g.name].hi, g.params, g.depth) for g in groups
            }
            plans = make_all_plans(stats)
            self.cands = []
            tag = "fast" if latency_goal_ms(self.cfg, self.line) is not None else "light"
            suffix = f"/{tag}{round_}" if round_ else ""
            for signal in self.cfg.signals:
                for strategy in STRATEGY_NAMES:
                    widths = widths_for(groups, plans[strategy], round_to)
                    cand = Candidate.mix_and_match(signal, strategy + suffix)
                    remove = units_to_remove(groups, widths, self.scores[signal])
                    self.cands.append(ChannelCandidate(cand, widths, remove, round=round_))
            for cc in self.latency_candidates():
                cc.candidate = Candidate.mix_and_match(cc.candidate.signal, cc.candidate.strategy + suffix)
                cc.round = round_
                self.cands.append(cc)

    def latency_candidates(self) -> list[ChannelCandidate]:
        """With a latency model: per signal, inside the Phase 1 ranges, the units with the least score per
        millisecond saved go first (``latency_allocation``) until the model reaches the goal's latency
        (``LATENCY_LEVELS`` around it)."""
        if self.latency_model is None:
            return []
        line, lm = self.line, self.latency_model
        goal_ms = latency_goal_ms(self.cfg, line)
        if goal_ms is None:  # a sparsity goal: the latency the line gives the baseline plan's MACs
            goal_ms = line.ms_for(self._plan_macs(self.goal_ratio))
        ranges = {n: (r.lo, r.hi) for n, r in self.ranges.items()}
        # each level's goal as a fraction of dense, in the model's own milliseconds
        goals = {
            s: lm.dense_ms * (1.0 - min(1.0, k * (1.0 - goal_ms / line.dense_ms))) for s, k in LATENCY_LEVELS.items()
        }
        out = []
        for signal in self.cfg.signals:
            for strategy, goal in goals.items():
                widths = latency_allocation(self.groups, self.scores[signal], lm, goal, ranges, self.round_to)
                remove = units_to_remove(self.groups, widths, self.scores[signal])
                out.append(ChannelCandidate(Candidate.mix_and_match(signal, strategy), widths, remove))
        return out

    def target_ratio(self) -> float:
        """The global fraction of channels around which the baselines' three targets are placed.

        For a latency goal: the measured latency line gives the MACs that reach it, and a bisection finds
        the fraction at which the magnitude signal's global-threshold plan (clipped by the rules, rounded)
        lands on those MACs: the unprunable parts (a stem stream at round_to, say) are accounted for.
        """
        goal_ms = latency_goal_ms(self.cfg, self.line)
        if goal_ms is None:
            return channel_target(self.cfg)
        goal_macs = self.line.macs_for(goal_ms)
        if goal_macs is None:
            self.progress.log(
                f"warning: {goal_ms:.3f} ms is below the narrowest allowed model (measured "
                f"{self.line.floor_ms:.3f} ms, dense {self.line.dense_ms:.3f} ms): "
                "candidates go as far as the rules allow"
            )
            goal_macs = self.line.floor_macs
        ratio = self._ratio_for_macs(goal_macs)
        self.progress.log(f"latency goal {goal_ms:.3f} ms ~ {goal_macs / 1e6:.2f} MMACs ~ {ratio:.0%} of the channels")
        return ratio

    def _ratio_for_macs(self, goal_macs: float) -> float:
        """The channel fraction at which the magnitude plan (rules, rounding) lands on ``goal_macs`` (bisection)."""
        lo, hi = 0.0, 0.95
        for _ in range(7):
            mid = (lo + hi) / 2
            if self._plan_macs(mid) > goal_macs:
                lo = mid
            else:
                hi = mid
        return hi

    def _plan_macs(self, ratio: float) -> int:
        ratios = global_threshold_ratios(self.groups, self.scores["magnitude"], ratio, self.round_to)
        ratios = {n: min(v, self.caps[n].hi) for n, v in ratios.items()}
        widths = widths_for(self.groups, ratios, self.round_to)
        key = tuple(sorted(widths.items()))
        if key not in self._macs_cache:
            remove = {n: list(range(g.units - widths[n])) for n, g in self._by_name()}
            self._macs_cache[key] = params_and_macs(compact(self.model, self.example, remove), self.example)[1]
        return self._macs_cache[key]

    def screen(self, start: int = 0) -> None:
        """Screen ``self.cands[start:]`` (earlier ones are screened already; an identical model is not redone)."""
        d, cfg = self.data, self.cfg
        with self.t("screening"):
            todo = len(self.cands) - start
            self.progress.start(
                f"screen {todo} candidates "
                f"(compact{' + BN re-calibration' if self.use_bn else ''} + ONNX export and check)",
                total=todo,
            )
            seen: dict[tuple, ChannelCandidate] = {(cc.candidate.signal, cc.shape_key): cc for cc in self.cands[:start]}
            for i, cc in enumerate(self.cands[start:], start):
                key = (cc.candidate.signal, cc.shape_key)
                if key in seen:  # e.g. balanced and p50 are the same plan
                    _copy_screening(seen[key], cc)
                    self.progress.advance()
                    continue
                seen[key] = cc
                pruned = compact(self.model, self.example, cc.remove)
                c = cc.candidate
                # One evaluation per candidate, after BN re-calibration: a compacted network's zero-shot
                # accuracy (BN statistics of the dense one) says little and would double the cost.
                with on_device(pruned, self.torch_device):  # back on the CPU for the MAC count and the export
                    if self.use_bn:
                        recalibrate_bn(pruned, d.calib_x, cfg.batch_size)
                    c.accuracy = accuracy(pruned, d.eval_x, d.eval_y, cfg.batch_size)
                if not self.use_bn:
                    c.zero_shot_accuracy = c.accuracy
                cc.params, c.macs = params_and_macs(pruned, self.example)
                c.sparsity = 1.0 - prunable_weights(pruned) / self.dense_weights
                res = self._export(pruned, self.work / f"c{i}.onnx")  # i counts over every round: unique
                cc.onnx, cc.parity = res.path, res.parity_max_abs_diff
                self.progress.advance()
            self.progress.finish()

    def measure(self) -> None:
        """Latency of every distinct architecture, interleaved with dense in one run."""
        with self.t("latency"):
            shapes: dict[tuple, ChannelCandidate] = {}
            for cc in self.cands:
                shapes.setdefault(cc.shape_key, cc)
            self.progress.start(
                f"measure latency of {len(shapes)} architectures + dense "
                f"(onnxruntime, {self.threads} thread(s), batch 1)"
            )
            paths = [self.staging / "dense.onnx"] + [cc.onnx for cc in shapes.values()]
            results = self._bench(paths, warmup=5, runs=self.cfg.bench_runs)
            self.progress.finish()
        self.dense_ms = results[0]["latency_ms"]["p50"]
        latency = {key: res["latency_ms"]["p50"] for key, res in zip(shapes, results[1:], strict=True)}
        for cc in self.cands:
            cc.candidate.latency_ms = latency[cc.shape_key]

    def finetune(self, start: int = 0) -> None:
        """Fine-tune the best ``finetune_top`` of ``self.cands[start:]`` (a goal round recovers its own)."""
        d, cfg = self.data, self.cfg
        if start == 0:
            self.finetuned = {}
        with self.t("finetune"):
            rates = recovery_rates(cfg, self.model, compacted=True)
            schedule = recovery_schedule(cfg, len(rates))
            if schedule is None:
                return
            cands = self.cands
            # the candidates that meet the goal, or those closest to it: fine-tuning the most accurate
            # (most conservative) ones instead would leave nothing recovered near the goal to select
            pool, _ = eligible([cc.candidate for cc in cands[start:]], cfg, self.dense_ms)
            # one job per distinct architecture of a signal: the same widths of the same ranking are one model
            first: dict[tuple, int] = {}
            for i in (start + i for i in pool):
                first.setdefault((cands[i].candidate.signal, cands[i].shape_key), i)
            pool = list(first.values())
            one_rate = [
                Job(cands[i].candidate.name, CompactBuild(cands[i].remove, self.example), cands[i].candidate.accuracy)
                for i in pool
            ]
            jobs = with_rates(one_rate, rates)
            recipe = RECIPES[cfg.recovery]
            device = self.torch_device
            teacher = teacher_logits_if_distilling(recipe, self.model, d.calib_x, cfg.batch_size, device)
            shared = Shared.for_run(cfg, copy.deepcopy(self.model), d, recipe, teacher, self.use_bn)
            self.progress.log(
                f"recover ({cfg.recover}, up to {cfg.finetune_epochs} epochs, {recipe.name}, on {device}): "
                f"{len(pool)} candidate(s) at rate {' and '.join(f'{r:g}' for r in rates)}"
            )
            outcomes = recover(jobs, shared, schedule, self.executor, self.progress, self.store)
            n = len(rates)
            for k, i in enumerate(pool):  # per candidate, the rate the selection split prefers
                w = k * n + best_rate(outcomes[k * n : (k + 1) * n])
                o, job = outcomes[w], jobs[w]
                record_recovery(cands[i].candidate, o, job.lr)
                if o.survived:
                    model = job.build.build(self.model)
                    model.load_state_dict(o.state)
                    self.finetuned[i] = model.eval()

    def within_drop(self) -> bool:
        """Whether some candidate (after recovery) is within ``--max-drop`` points of dense."""
        drop = self.cfg.max_drop
        return any((self.dense_acc - cc.candidate.final_accuracy) * 100 <= drop + 1e-9 for cc in self.cands)

    def round_drops(self) -> list[tuple[float, float]]:
        """(channel fraction, best drop in points after recovery) of each goal round so far."""
        out = []
        for k, ratio in enumerate(self.ratios):
            best = max(cc.candidate.final_accuracy for cc in self.cands if cc.round == k)
            out.append((ratio, (self.dense_acc - best) * 100))
        return out

    def close_round(self) -> None:
        """What the latest round left: the facts the next goal-round decision reads, kept for the report."""
        plain = [cc.candidate for cc in self.cands]
        best = max(c.final_accuracy for c in plain)
        self.goal_rounds.append(
            GoalRound(
                removed_fraction=self.ratios[-1],
                dense_ms=self.dense_ms,
                fastest_ms=min(c.latency_ms for c in plain),
                best_drop=(self.dense_acc - best) * 100,
            )
        )

    def lighter(self) -> None:
        """``--max-drop``: goal rounds (up to ``GOAL_ROUNDS``) placed by `next_goal_ratio` from the drops
        measured so far: lighter while no candidate is within the drop, between a met and a missed round
        (a faster model within the drop) once one is; every round's candidates compete in one selection,
        timed together in one run."""
        if self.cfg.max_drop is None:
            return
        while len(self.ratios) < GOAL_ROUNDS:
            drops = self.round_drops()
            ratio = next_goal_ratio(drops, self.cfg.max_drop)
            if ratio is None:
                break
            best = min(d for _, d in drops)
            self.progress.log(
                f"best candidate {best:.2f} points below dense (--max-drop {self.cfg.max_drop:g}); next goal "
                f"round at {ratio:.0%} of the channels (round {len(self.ratios) + 1} of {GOAL_ROUNDS})"
            )
            self._goal_round(ratio)
        rounds = ", ".join(f"{r:.0%}: {d:.2f}" for r, d in self.round_drops())
        if len(self.ratios) > 1:
            self.notes.append(
                f"--max-drop {self.cfg.max_drop:g}: {len(self.ratios)} goal rounds (channel fraction: best drop in "
                f"points {rounds})"
            )
        if not self.within_drop():
            self.notes.append(
                f"no candidate is within {self.cfg.max_drop:g} points of dense after {len(self.ratios)} round(s) "
                f"({rounds}); the most accurate one ships"
            )

    def _goal_round(self, ratio: float) -> None:
        """One more goal round at ``ratio``: its candidates planned beside the earlier rounds', screened,
        every round's architectures timed again in one run (their latencies compare), its own recovered."""
        start, earlier = len(self.cands), self.cands
        self.plan(ratio, round_=len(self.ratios))
        self.cands = earlier + self.cands
        self.screen(start)
        self.measure()
        self.finetune(start)
        self.close_round()

    def faster(self) -> None:
        """A latency goal (``--speedup`` / ``--latency-budget``) no measured candidate meets: up to
        ``GOAL_ROUNDS`` faster rounds, each aimed where the latency line, corrected by how far the fastest
        candidate so far missed it (`next_speed_macs`), reaches the goal; stops once one is met or the plan
        cannot get narrower. Every round's candidates compete in one selection, timed together in one run."""
        cfg = self.cfg
        if latency_goal_ms(cfg, self.line) is None:
            return
        while len(self.ratios) < GOAL_ROUNDS:
            plain = [cc.candidate for cc in self.cands]
            if eligible(plain, cfg, self.dense_ms)[1]:
                break
            goal_ms = latency_goal_ms(cfg, self.line, self.dense_ms)
            fastest = min(plain, key=lambda c: c.latency_ms)
            scale = self.line.dense_ms / self.dense_ms  # this run's milliseconds in the probe's (the VM drifts)
            macs = next_speed_macs(self.line, goal_ms * scale, fastest.latency_ms * scale, fastest.macs)
            ratio = self._ratio_for_macs(macs)
            if ratio <= self.ratios[-1] + 0.01:  # at the rules' narrowest: a further round would repeat it
                break
            self.progress.log(
                f"fastest candidate {fastest.latency_ms:.3f} ms, goal {goal_ms:.3f} ms; next goal round at "
                f"{ratio:.0%} of the channels (round {len(self.ratios) + 1} of {GOAL_ROUNDS})"
            )
            self._goal_round(ratio)
        if len(self.ratios) > 1:
            fastest = min(cc.candidate.latency_ms for cc in self.cands)
            goal_ms = latency_goal_ms(cfg, self.line, self.dense_ms)
            self.notes.append(
                f"latency goal {goal_ms:.3f} ms: {len(self.ratios)} goal rounds (channel fractions "
                f"{', '.join(f'{r:.0%}' for r in self.ratios)}; fastest candidate {fastest:.3f} ms)"
            )

    def select(self) -> None:
        plain = [cc.candidate for cc in self.cands]
        front = pareto_mask([Point(c.final_accuracy, -c.latency_ms) for c in plain])
        for c, on_front in zip(plain, front, strict=True):
            c.pareto = on_front
        idx, self.why = select_structured(plain, self.cfg, self.dense_acc, self.dense_ms)
        keys = [cc.shape_key for cc in self.cands]
        with self.t("latency"):
            idx, note = confirm_head_to_head(plain, keys, idx, self.cfg, self.dense_ms, self._time_pair)
        if note:
            self.why += f" ({note})"
        self.chosen = self.cands[idx]
        self.final = self.finetuned.get(idx) or self._rebuild(self.chosen)
        drop = (self.dense_acc - self.chosen.candidate.final_accuracy) * 100
        hint = budget_hint(drop, self.cfg.max_drop, len(self.data.calib_x), self.cfg.finetune_epochs)
        if hint:
            self.notes.append(hint)

    def structured_report(self) -> StructuredReport:
        ranges, widths = self.ranges_by_round[self.chosen.round], self.chosen.widths
        return StructuredReport(
            round_to=self.round_to,
            groups=[
                GroupReport(g.name, g.kind, g.units, widths[g.name], [ranges[g.name].lo, ranges[g.name].hi])
                for g in self.groups
            ],
            latency_line=LatencyLineReport(**dataclasses.asdict(self.line)),
            screening_dense_ms=self.dense_ms,
            timed_on=self.timer.spec,
            latency_model_scale=self.latency_model.scale if self.latency_model is not None else None,
            goal_rounds=self.goal_rounds,
        )

    def found(self) -> Found:
        """The handoff to `granularity.finish`: the pick (after `select`), its metadata, the groups as the
        report's layers (units: channels or heads), the structured block, the report.md section, the plot axes."""
        cfg, groups, chosen = self.cfg, self.groups, self.chosen
        c = chosen.candidate
        ranges = self.ranges_by_round[chosen.round]
        layer_reports = [
            LayerReport(
                name=g.name,
                role=g.role,
                unit="head" if g.kind == "heads" else "channel",
                units=g.units,
                kept=chosen.widths[g.name],
                removed=1.0 - chosen.widths[g.name] / g.units,
                params=g.params,
                range=[ranges[g.name].lo, ranges[g.name].hi],
                unit_size=g.unit_size,
                baseline_range=list(ranges[g.name].baseline) if ranges[g.name].baseline else None,
                rules=ranges[g.name].rules,
            )
            for g in groups
        ]
        metadata = {
            "source_model": cfg.model,
            "strategy": c.strategy,
            "signal": c.signal,
            "target": self.target.name,
            "granularity": "channel",
            "round_to": str(self.round_to),
            **self.data.split_metadata(cfg.seed),
            "group_widths": json.dumps(chosen.widths),
        }
        final = self.final
        index = next(i for i, cc in enumerate(self.cands) if cc is chosen)
        plain = [cc.candidate for cc in self.cands]
        return Found(
            dense=DenseSummary(accuracy=self.dense_acc, params=self.params, macs=self.macs),
            dense_model=self.model,
            dense_exported=True,
            candidates=plain,
            chosen=index,
            why=self.why,
            ship=lambda: final,
            runner_up=runner_up(plain, index, cfg, self.dense_ms),
            build=lambda i: self.finetuned.get(i) or self._rebuild(self.cands[i]),
            metadata=metadata,
            layers=layer_reports,
            structured=self.structured_report(),
            notes=list(self.notes),
            config=config_dict(
                cfg,
                round_to=self.round_to,
                threads=self.threads,
                finetune_batch=recovery_batch(cfg, len(self.data.calib_x)),
            ),
            markdown=lambda report: render_structured(report, self.dense_ms, self.line, groups, chosen),
            plot_axes=("latency", "macs"),
            plot_dense_x={"latency": self.dense_ms, "macs": self.macs / 1e6},
        )

    def _time_pair(self, i: int) -> list[tuple[float, float]]:
        """Dense and candidate ``i`` alone, interleaved: their p50 latencies in each of ``PAIR_REPEATS`` runs."""
        runs = self.timer.p50_runs(
            [self.staging / "dense.onnx", self.cands[i].onnx],
            self.sample,
            runs=self.cfg.bench_runs,
            repeats=PAIR_REPEATS,
            warmup=5,
        )
        return [(dense, ms) for dense, ms in runs]

    def _pair_ms(self, a: Path, b: Path) -> tuple[float, float]:
        """Two models alone, interleaved: their p50 latencies, each the median of ``PAIR_REPEATS`` runs (two
        models time quickly; one run of a 0.1 ms model moves by several %)."""
        first, second = self.timer.p50s([a, b], self.sample, runs=self.cfg.bench_runs, repeats=PAIR_REPEATS, warmup=5)
        return first, second

    def _by_name(self) -> list[tuple[str, ChannelGroup]]:
        return [(g.name, g) for g in self.groups]

    def _rebuild(self, cc: ChannelCandidate) -> nn.Module:
        pruned = compact(self.model, self.example, cc.remove)
        if self.use_bn:
            recalibrate_bn(pruned, self.data.calib_x, self.cfg.batch_size, device=self.torch_device)
        return pruned


def _copy_screening(src: ChannelCandidate, dst: ChannelCandidate) -> None:
    for name in ("zero_shot_accuracy", "accuracy", "sparsity", "macs"):
        setattr(dst.candidate, name, getattr(src.candidate, name))
    dst.params, dst.onnx, dst.parity = src.params, src.onnx, src.parity


# -- report additions ------------------------------------------------------------------------------------------


def render_structured(
    report: Report, dense_ms: float, line: LatencyLine, groups: list[ChannelGroup], chosen: ChannelCandidate
) -> str:
    """Markdown appended to the common report: latency, speedup and MACs of every candidate, group widths."""
    d = report.dense
    lines = [
        "",
        "## Structured candidates (measured latency)",
        "",
        f"Latency: onnxruntime p50 at batch 1, {report.config.get('threads') or 'target'} thread(s), measured "
        f"interleaved with dense ({dense_ms:.3f} ms in that run). Pareto front: accuracy vs measured latency. "
        f"The narrowest model this search could build (every group at the narrowest width the rules allow, "
        f"{line.floor_macs / 1e6:.2f} "
        f"MMACs) ran at {line.floor_ms:.3f} ms next to dense's {line.dense_ms:.3f} ms: operator overhead that no "
        "channel pruning removes.",
        "",
        "| name | weights removed % | MMACs | MAC ratio | latency ms | speedup | accuracy % | Pareto (latency) "
        "| Pareto (MACs) |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|:-:|",
    ]
    on_mac_front = dict(zip(map(id, report.strategies), mac_pareto(report.strategies), strict=True))
    for c in sorted(report.strategies, key=lambda c: c.latency_ms or 0.0):
        mark = "**" if c.selected else ""
        lines.append(
            f"| {mark}{c.name}{mark} | {c.sparsity * 100:.1f} | {(c.macs or 0) / 1e6:.2f} "
            f"| {d.macs / max(1, c.macs or 1):.2f} | {c.latency_ms:.3f} | {dense_ms / c.latency_ms:.2f} "
            f"| {c.final_accuracy * 100:.2f} | {'●' if c.pareto else ''} | {'●' if on_mac_front[id(c)] else ''} |"
        )
    lines += ["", "## Group widths (selected)", "", "| group | role | kind | kept / original |", "|---|---|---|---:|"]
    for g in groups:
        lines.append(f"| {g.name} | {g.role} | {g.kind} | {chosen.widths[g.name]} / {g.units} |")
    return "\n".join(lines) + "\n"


def _exponent(a: tuple[float, float], b: tuple[float, float]) -> float:
    """p of drop = c * ratio**p through two (ratio, drop) points with positive drops, else the prior."""
    (ra, da), (rb, db) = sorted((a, b))
    if ra <= 0 or rb <= ra or da <= 0 or db <= da:
        return DROP_EXPONENT
    return min(6.0, max(1.0, math.log(db / da) / math.log(rb / ra)))


def next_goal_ratio(rounds: Sequence[tuple[float, float]], max_drop: float) -> float | None:
    """The channel fraction of the next ``--max-drop`` goal round, or None when no round is needed.

    ``rounds``: (channel fraction, best drop in points) of each round so far. With every round over the
    drop, the next is lighter than the lightest, where drop = c * ratio**p (p fitted through the two
    lightest, else `DROP_EXPONENT`) reaches ``DROP_AIM * max_drop``, at most 4x lighter. With a round
    within the drop and a heavier one over it, the next lies between them on the same curve (a faster model
    may meet the drop), unless they are within `BRACKET_CLOSE`. With every round within the drop: none.
    """
    met = [(r, d) for r, d in rounds if d <= max_drop + 1e-9]
    missed = sorted((r, d) for r, d in rounds if d > max_drop + 1e-9)
    if not missed:
        return None
    aim = DROP_AIM * max_drop
    if met:
        lo = max(met)
        hi = min((p for p in missed if p[0] > lo[0]), default=None)
        if hi is None or hi[0] / max(lo[0], 1e-9) < BRACKET_CLOSE:
            return None
        p = _exponent(lo, hi)
        ratio = hi[0] * (aim / hi[1]) ** (1 / p)  # the curve through the missed round
        return min(max(ratio, lo[0] * 1.05), hi[0] / 1.05)
    r, d = missed[0]
    p = _exponent(missed[0], missed[1]) if len(missed) > 1 else DROP_EXPONENT
    return max(r * (aim / d) ** (1 / p), r / 4)


def next_speed_macs(line: LatencyLine, goal_ms: float, fastest_ms: float, fastest_macs: float) -> float:
    """The MACs the next faster goal round aims at: where the latency line, shifted by its error at the
    fastest candidate measured so far (measured minus the line's prediction at its MACs), reaches
    ``goal_ms``; the narrowest model's MACs when even that is below the line's floor. Never above the
    fastest candidate's MACs (a faster round is a narrower one)."""
    error = fastest_ms - line.ms_for(fastest_macs)
    macs = line.macs_for(goal_ms - error)
    return min(fastest_macs, line.floor_macs if macs is None else macs)

"""What the reference studies share: the model and data split they read, the pipeline's structured search up
to screening, the recovery budget (and its run through the product's recover stage on an executor:
`recovery_shared`, `ModelBuild`, `recover_models`, ``--cluster``), torch-pruning's uniform baseline, latency at
larger inputs, and how they log and name the machine.

A study imports from here and from the product, never from another study.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from edgeprune.benchmarks.machine import cpu_model
from edgeprune.benchmarks.runner import median_p50
from edgeprune.export import export_onnx
from torch import nn

from edgeprune.cluster import ClusterError, Executor, check_cluster_spec
from edgeprune.data import (
    FMNIST_CLASSES,
    FMNIST_MEAN,
    FMNIST_STD,
    DataBundle,
    SealedSplit,
    read_fashion_mnist,
    uint8_to_normalized,
)
from edgeprune.evaluation import params_and_macs
from edgeprune.halving import Top
from edgeprune.models import load_model
from edgeprune.pipeline import CompressConfig, Progress, Timings
from edgeprune.recover import Builder, Job, Shared, recover, tensor_digest
from edgeprune.recovery import DEVICES, RECIPES, Recipe
from edgeprune.structured import accumulate_gradients
from edgeprune.structured.flow import ChannelSearch
from edgeprune.structured.signals import channel_magnitude, channel_taylor, combine

LATENCY_ORDER = "each round in a fresh shuffled order"  # files timed before runner.run_orders lack it


def latency_order_note(r: dict) -> str:
    return f" ({r['latency_order']})" if r.get("latency_order") else ""


@dataclasses.dataclass
class Log(Progress):
    """Stage progress on stdout, each line tagged with the study's name."""

    name: str
    t0: float = 0.0

    def start(self, stage: str, total: int | None = None) -> None:
        self.t0 = time.time()
        print(f"[{self.name}] {stage} ...", flush=True)

    def finish(self) -> None:
        print(f"[{self.name}]   {time.time() - self.t0:.1f} s", flush=True)

    def log(self, message: str) -> None:
        print(f"[{self.name}]   {message}", flush=True)


def this_machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "cpu": cpu_model()}


def fmnist_split(calib_images: int, screen_images: int, seed: int = 0) -> tuple[DataBundle, np.ndarray, np.ndarray]:
    """Calibration from the training split; the test split cut into a screening part and a held-out part."""
    train_x, train_y = read_fashion_mnist("train")
    test_x, test_y = read_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    ci = rng.permutation(len(train_y))[:calib_images]
    ti = rng.permutation(len(test_y))
    screen, held = ti[:screen_images], ti[screen_images:]
    held_t = uint8_to_normalized(test_x[held])
    bundle = DataBundle(
        name=f"fashion-mnist (calibration: {calib_images} train images; screening: {screen_images} test images)",
        calib_x=uint8_to_normalized(train_x[ci]),
        calib_y=torch.from_numpy(train_y[ci].astype(np.int64)),
        eval_x=uint8_to_normalized(test_x[screen]),
        eval_y=torch.from_numpy(test_y[screen].astype(np.int64)),
        num_classes=10,
        in_chans=1,
        image_size=28,
        class_names=list(FMNIST_CLASSES),
        mean=FMNIST_MEAN,
        std=FMNIST_STD,
        # the held-out images are the product's sealed test split too (ChannelSearch opens it after the pick)
        test=SealedSplit(held_t, torch.from_numpy(test_y[held].astype(np.int64)), "fashion-mnist test (held out)"),
    )
    held_x = held_t.numpy().astype(np.float32)
    return bundle, held_x, test_y[held].astype(np.int64)


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments ``load_inputs`` reads: the model and the data split."""
    p.add_argument("--model", default="fmnist_resnet18")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--pretrained", action="store_true", help="zoo models: load the bundled weights")
    p.add_argument("--calib-images", type=int, default=60000, help="training-split images for calibration")
    p.add_argument("--screen-images", type=int, default=2000, help="test images for screening and selection")


def load_inputs(a: argparse.Namespace) -> tuple[DataBundle, np.ndarray, np.ndarray, nn.Module]:
    """The split data and the dense model the arguments name."""
    data, held_x, held_y = fmnist_split(a.calib_images, a.screen_images)
    model = load_model(a.model, checkpoint=a.checkpoint, pretrained=a.pretrained, num_classes=10, in_chans=1)
    return data, held_x, held_y, model


def search_config(a: argparse.Namespace, speedup: float, work: Path, **overrides) -> CompressConfig:
    """The pipeline's settings for a benchmark's structured search: the model the arguments name, a
    ``--speedup`` goal, latency on 1 thread (the selection's), files in ``work``."""
    return CompressConfig(
        model=a.model,
        checkpoint=a.checkpoint,
        pretrained=a.pretrained,
        target=a.target,
        granularity="channel",
        speedup=speedup,
        gradient_samples=a.gradient_samples,
        threads=1,
        bench_runs=100,
        out=str(work),
        **overrides,
    )


def screened_search(cfg: CompressConfig, target, model: nn.Module, data: DataBundle, work: Path, log) -> ChannelSearch:
    """The pipeline's structured search, in ``work / "search"``, up to and including screening: candidates
    compacted, BN re-calibrated, scored and exported (with ``cfg.latency_costs``, the latency model too)."""
    (work / "search").mkdir()
    search = ChannelSearch(cfg, target, model, data, work / "search", work, log, Timings())
    for stage in (search.discover, search.dense, search.probe, search.costs, search.signals, search.plan):
        stage()
    search.screen()
    return search


def add_recovery_arguments(p: argparse.ArgumentParser) -> None:
    """The recovery budget's arguments (epochs, rate, recipe) and the device it trains on: what a study passes
    to `recovery_shared` and `recover_models`."""
    p.add_argument("--finetune-epochs", type=int, default=6)
    p.add_argument("--finetune-lr", type=float, default=3e-3)
    p.add_argument("--recovery", default="distill", choices=sorted(RECIPES), help="fine-tuning recipe")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where recovery trains (auto: a CUDA GPU if seen)")


def add_cluster_argument(p: argparse.ArgumentParser) -> None:
    """``--cluster``, as compress takes it: where the recoveries run."""
    p.add_argument(
        "--cluster",
        default=None,
        help="where recovery runs: in this process (default), local:N (a Ray here with N CPUs), ray://HOST:PORT, "
        "HOST:PORT or auto (RAY_ADDRESS); the same numbers everywhere for the same seed and --recover-threads",
    )
    p.add_argument(
        "--recover-threads",
        type=int,
        default=1,
        help="torch threads per recovery (part of the result on a CPU, so the same in-process and on a cluster)",
    )


def check_cluster_argument(p: argparse.ArgumentParser, spec: str | None) -> None:
    """A bad ``--cluster`` spec is a usage error before any work (connecting comes later, with the recovery)."""
    if spec:
        try:
            check_cluster_spec(spec)
        except ClusterError as exc:
            p.error(str(exc))


def recovery_shared(
    dense: nn.Module,
    calib_x: torch.Tensor,
    calib_y: torch.Tensor,
    recipe: Recipe,
    teacher: torch.Tensor | None,
    *,
    lr: float | None,
    batch_size: int,
    seed: int,
    threads: int,
    device: str,
    bn_recal: bool = True,
    val_fraction: float = 0.1,
) -> Shared:
    """What every recovery task of a study reads. The studies stop early on ``val_fraction`` of the
    calibration images (their protocol before the recover stage existed: `finetune` without ``val``), so the
    recover stage's "selection split" is that hold-out and the rest trains; the studies' own screening and
    held-out images stay out of training and early stopping. ``teacher``: the dense logits on all of
    ``calib_x`` (cut to the training part here)."""
    order = torch.randperm(len(calib_x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(len(calib_x) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return Shared(
        copy.deepcopy(dense).eval(),
        calib_x[train],
        calib_y[train],
        calib_x[val],
        calib_y[val],
        recipe,
        None if teacher is None else teacher[train],
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        bn_recal=bn_recal,
        threads=threads,
        device=device,
    )


@dataclasses.dataclass(frozen=True)
class ModelBuild:
    """A `recover.Builder` for a candidate that exists only as a model (torch-pruning's uniform pruning cannot
    be replayed from the dense weights by a `CompactBuild`): built by copying it; nothing masked while it
    trains. It travels to each task with the call (a small pruned model), not through the shared object."""

    model: nn.Module

    def build(self, dense: nn.Module) -> nn.Module:
        return copy.deepcopy(self.model)

    def train_masks(self) -> dict:
        return {}

    def digest(self) -> str:
        return tensor_digest(self.model.state_dict()) + repr(self.model)


def unique_keys(names: list[str]) -> list[str]:
    """``names`` made unique for `recover.Job` keys: a repeated name gets `` #2``, `` #3``, ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return out


def recover_models(
    builds: list[Builder],
    names: list[str],
    shared: Shared,
    epochs: int,
    executor: Executor,
    log: Progress,
) -> list[nn.Module]:
    """Each build recovered by the product's recover stage (`recover.recover`, one rung of ``epochs`` for every
    one: the same budget for all) on ``executor``; the recovered models, in order, in eval mode."""
    if epochs < 1:
        raise ValueError(f"recovery needs at least one epoch, got {epochs}")
    jobs = [Job(key, b) for key, b in zip(unique_keys(names), builds, strict=True)]
    outcomes = recover(jobs, shared, Top(k=len(jobs), epochs=epochs), executor, progress=log)
    models = []
    for b, outcome in zip(builds, outcomes, strict=True):
        model = b.build(shared.dense)
        model.load_state_dict(outcome.state)
        models.append(model.eval())
    return models


class SignalImportance:
    """Our group signal as a torch-pruning importance (``edgeprune.structured.signals``: the same channel
    magnitude, per-batch squared Taylor and their combination), so MetaPruner ranks channels like our
    candidates do; MetaPruner hands it its own groups."""

    def __init__(self, signal: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 32):
        self.signal = signal
        self.params = list(model.parameters())
        self.grads: list[list[torch.Tensor | None]] = []  # one gradient snapshot per mini-batch
        if signal != "magnitude":
            for i in range(0, len(x), batch):
                accumulate_gradients(model, x[i : i + batch], y[i : i + batch], batch)
                self.grads.append([None if p.grad is None else p.grad.clone() for p in self.params])
            model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        m = channel_magnitude(group)
        if self.signal == "magnitude":
            return m
        g = torch.zeros_like(m)
        for grads in self.grads:
            for p, grad in zip(self.params, grads, strict=True):
                p.grad = grad
            g += channel_taylor(group) ** 2
        for p in self.params:
            p.grad = None
        return combine(self.signal, m, g)


def uniform_prune(model: nn.Module, example: torch.Tensor, ratio: float, signal: str, round_to: int, x, y) -> nn.Module:
    """torch-pruning's MetaPruner, one ratio for every layer (local ranking), classifier outputs kept."""
    pruned = copy.deepcopy(model).eval()
    pruner = tp.pruner.MetaPruner(
        pruned,
        example,
        importance=SignalImportance(signal, pruned, x, y),
        pruning_ratio=ratio,
        global_pruning=False,
        ignored_layers=[pruned.get_classifier()],
        round_to=round_to,
    )
    pruner.step()
    return pruned.eval()


def speedup_at_sizes(
    dense: nn.Module, variants: dict[str, nn.Module], sizes: list[int], runs: int, work: Path, repeats: int = 1
) -> list[dict]:
    """Speedup over ``dense`` and speedup / MAC ratio of each variant at each input size, 1 and 2 threads,
    all interleaved per size. Latency does not depend on weight values, so any weights will do."""
    rows = []
    for size in sizes:
        x = torch.randn(1, next(dense.parameters()).shape[1], size, size)
        models = [dense, *variants.values()]
        paths = [work / f"scale_{size}_{k}.onnx" for k in range(len(models))]
        for m, path in zip(models, paths, strict=True):
            export_onnx(m, x, path, check_inputs=x)
        macs = [params_and_macs(m, x)[1] for m in models]
        ms = {th: median_p50(paths, x.numpy(), th, runs, repeats) for th in (1, 2)}
        for k, name in enumerate(variants, start=1):
            row = {"input": size, "variant": name, "dense_mmacs": macs[0] / 1e6, "mmacs": macs[k] / 1e6}
            row["mac_ratio"] = macs[0] / macs[k]
            for th in (1, 2):
                row[f"dense_ms_{th}t"], row[f"ms_{th}t"] = ms[th][0], ms[th][k]
                row[f"speedup_{th}t"] = ms[th][0] / ms[th][k]
                row[f"speedup_over_mac_ratio_{th}t"] = row[f"speedup_{th}t"] / row["mac_ratio"]
            rows.append(row)
    return rows


def paired_se_points(diff: np.ndarray) -> float:
    """Standard error of the mean of per-image accuracy differences, in points."""
    return float(diff.std(ddof=1) / math.sqrt(len(diff)) * 100) if len(diff) > 1 else float("nan")

import math

import torch

from edgeprune.baselines import BASELINES, erk_plan, global_threshold_plan, lamp_scores
from edgeprune.inventory import prunable_layers
from edgeprune.sensitivity import compute_sensitivity

from .core_models import batch, tiny_cnn


def test_global_threshold_prunes_exact_count():
    scores = {"a": torch.arange(10.0), "b": torch.arange(10.0, 30.0)}
    plan = global_threshold_plan(scores, 0.5)  # 15 lowest: all of a, 5 of b
    assert plan == {"a": 1.0, "b": 0.25}


def test_lamp_score_is_normalized_within_layer():
    s = lamp_scores({"w": torch.tensor([1.0, 2.0, 3.0])})["w"]
    assert torch.allclose(s, torch.tensor([1 / 14, 4 / 13, 1.0]))


def test_allocators_meet_the_global_target_on_a_real_model():
    model = tiny_cnn()
    layers = prunable_layers(model)
    total = sum(layer.numel for layer in layers)
    x, y = batch(32)
    sens = compute_sensitivity(model, layers, x, y, batch_size=16)
    for name, b in BASELINES.items():
        plan = b.plan(layers, sens, 0.8, seed=0)
        achieved = sum(plan[layer.name] * layer.numel for layer in layers) / total
        assert abs(achieved - 0.8) < 1e-3, name
        assert all(0.0 <= v <= 1.0 for v in plan.values()), name


def test_erk_keeps_small_layers_denser():
    model = tiny_cnn()
    layers = prunable_layers(model)
    plan = erk_plan(layers, 0.9)
    small = min(layers, key=lambda layer: layer.numel)
    big = max(layers, key=lambda layer: layer.numel)
    assert plan[small.name] < plan[big.name]


def test_ranks_like_names_the_signal_that_orders_weights_as_the_baseline_does():
    """A Mix-and-Match candidate with a baseline's plan, ranked by its ``ranks_like`` signal, is that baseline's
    run: the scores are the same tensors. Baselines without one (SNIP, GraSP, LAMP) rank by their own scores."""
    from edgeprune.baselines import RANGE_BASELINES
    from edgeprune.sensitivity import SIGNALS, signal_scores

    layers = prunable_layers(tiny_cnn())
    assert set(RANGE_BASELINES) == {"mag", "snip", "grasp", "lamp", "erk"}
    for name, b in BASELINES.items():
        if b.ranks_like is None:
            continue
        assert b.ranks_like in SIGNALS, name
        scores = b.scores(layers, None, 0)
        for layer in layers:
            assert torch.equal(scores[layer.name], signal_scores(b.ranks_like, layer.weight, None)), name
    assert {n for n, b in BASELINES.items() if b.ranks_like is None} == {"snip", "grasp", "lamp", "random"}


def test_every_baseline_masks_at_least_the_target_in_whole_weights():
    """Selection keeps candidates with sparsity >= target: a baseline half a weight short would be dropped."""
    from edgeprune.masking import build_masks

    layers = prunable_layers(tiny_cnn())
    total = sum(layer.numel for layer in layers)
    for name in ("mag", "lamp", "erk", "uniform", "random"):
        b = BASELINES[name]
        for sparsity in (0.333, 0.8, 0.9, 0.97):
            masks = build_masks(b.scores(layers, None, 0), b.plan(layers, None, sparsity))
            zeros = sum(int((~m).sum()) for m in masks.values())
            assert zeros == math.ceil(sparsity * total - 1e-6), (name, sparsity)

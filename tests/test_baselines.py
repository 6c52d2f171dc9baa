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

import torch

from edgeprune.baselines import BASELINES, RANGE_BASELINES
from edgeprune.evaluation import accuracy, weight_sparsity
from edgeprune.inventory import build_inventory
from edgeprune.masking import apply_masks_, build_masks, layer_mask
from edgeprune.ranges import apply_rules, baseline_ranges, load_rules, range_targets
from edgeprune.recovery import finetune, recalibrate_bn
from edgeprune.sensitivity import SIGNALS, compute_sensitivity, signal_scores
from edgeprune.strategies import LayerStats, make_all_plans

from .core_models import batch, tiny_cnn, tiny_vit


def test_layer_mask_is_exact_even_with_ties():
    keep = layer_mask(torch.zeros(7, 3), 0.5)
    assert int((~keep).sum()) == round(0.5 * 21)


def _all_candidates(model):
    layers = build_inventory(model)
    prunable = [layer for layer in layers if layer.prunable]
    x, y = batch(32)
    sens = compute_sensitivity(model, layers, x, y, batch_size=16)
    runs = [BASELINES[b].plan(prunable, sens, s) for b in RANGE_BASELINES for s in range_targets(0.8)]
    ranges = apply_rules(layers, load_rules(), baseline_ranges(runs))
    stats = {p.name: LayerStats(ranges[p.name].lo, ranges[p.name].hi, p.numel, p.depth) for p in prunable}
    plans = make_all_plans(stats)
    return prunable, sens, plans


def test_each_strategy_lands_within_one_weight_of_the_plan():
    for make in (tiny_cnn, tiny_vit):
        model = make()
        prunable, sens, plans = _all_candidates(model)
        original = {k: v.clone() for k, v in model.state_dict().items()}
        for signal in SIGNALS:
            scores = {p.name: signal_scores(signal, p.weight, sens.abs_grad[p.name]) for p in prunable}
            for name, plan in plans.items():
                model.load_state_dict(original)
                apply_masks_(model, build_masks(scores, plan))
                _, per_layer = weight_sparsity(model, prunable)
                for p in prunable:
                    zeros = per_layer[p.name] * p.numel
                    assert abs(zeros - plan[p.name] * p.numel) <= 1.0, (signal, name, p.name)


def test_masks_survive_finetuning_and_bn_recalibration_helps():
    model = tiny_cnn()
    prunable = [p for p in build_inventory(model) if p.prunable]
    scores = {p.name: p.weight.detach().abs() for p in prunable}
    masks = build_masks(scores, {p.name: 0.7 for p in prunable})
    apply_masks_(model, masks)
    x, y = batch(96)
    before = model.get_submodule("layer1.0.bn1").running_mean.clone()
    recalibrate_bn(model, x, batch_size=32)
    assert not torch.allclose(before, model.get_submodule("layer1.0.bn1").running_mean)
    result = finetune(model, masks, x, y, epochs=3, lr=1e-2, batch_size=32, patience=5)
    assert result.epochs_run == 3
    for p in prunable:
        w = model.get_submodule(p.name).weight
        assert torch.equal(w[~masks[p.name]], torch.zeros_like(w[~masks[p.name]]))
        assert not hasattr(model.get_submodule(p.name), "parametrizations")  # squashed for export
    assert 0.0 <= accuracy(model, x, y) <= 1.0

"""Recovery recipes: distillation loss, shifts, and fine-tuning that follows the dense model's logits."""

import pytest
import torch
import torch.nn.functional as F

from edgeprune.errors import EdgepruneError
from edgeprune.evaluation import accuracy
from edgeprune.models import load_model
from edgeprune.pipeline import CompressConfig
from edgeprune.recovery import (
    RECIPES,
    finetune,
    random_shift,
    recalibrate_bn,
    recovery_loss,
    resolve_device,
    teacher_logits,
)
from edgeprune.structured import GroupGraph, compact, group_scores, units_to_remove, widths_for

from .core_models import batch, tiny_cnn


def test_random_shift_moves_content_and_fills_zeros():
    x = torch.arange(1, 1 + 2 * 14 * 14, dtype=torch.float32).reshape(2, 1, 14, 14)
    gen = torch.Generator().manual_seed(0)
    shifted = [random_shift(x, 1 / 7, gen) for _ in range(20)]  # up to 2 px
    assert all(s.shape == x.shape for s in shifted)
    moved = [s for s in shifted if not torch.equal(s, x)]
    assert moved, "20 draws of a ±2 px shift never moved the image"
    for s in moved:
        assert (s == 0).any()  # the uncovered border is zero, not wrapped around
        # every non-zero value comes from the original at an offset of at most 2 px in each axis
        rows, cols = torch.nonzero(s[0, 0], as_tuple=True)
        src = torch.nonzero(x[0, 0] == s[0, 0, rows[0], cols[0]], as_tuple=True)
        assert abs(int(src[0][0]) - int(rows[0])) <= 2 and abs(int(src[1][0]) - int(cols[0])) <= 2
    assert torch.equal(random_shift(x, 0.01, gen), x)  # below one pixel: unchanged


def test_recovery_loss_mixes_cross_entropy_and_distillation():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    ce = F.cross_entropy(logits, y)
    assert torch.allclose(recovery_loss(logits, y, teacher, RECIPES["paper"]), ce)
    r = RECIPES["distill"]
    assert torch.allclose(recovery_loss(logits, y, None, r), ce)
    # matching the teacher exactly leaves only the cross-entropy share
    assert torch.allclose(recovery_loss(logits, y, logits, r), (1 - r.distill) * ce)
    assert recovery_loss(logits, y, teacher, r) > (1 - r.distill) * ce


def test_unknown_recipe_is_named():
    with pytest.raises(EdgepruneError, match="choose from paper, distill"):
        CompressConfig(recovery="magic").validate()


def test_distillation_pulls_a_pruned_model_towards_the_dense_one(demo_data):
    """Channel-prune the bundled ResNet to 60 %, then fine-tune on 200 demo images: both recipes win back
    accuracy, and the distill recipe ends much closer to the dense model's predictions (held-out images)."""
    dense = load_model("fmnist_resnet", pretrained=True, num_classes=10, in_chans=1).eval()
    x, y, ex, ey = demo_data.calib_x, demo_data.calib_y, demo_data.eval_x, demo_data.eval_y
    teacher, held_teacher = teacher_logits(dense, x), teacher_logits(dense, ex)
    graph = GroupGraph(dense, x[:1])
    widths = widths_for(graph.groups, {g.name: 0.6 for g in graph.groups}, 8)
    remove = units_to_remove(graph.groups, widths, group_scores(graph)["magnitude"])
    kl, acc = {}, {}
    for name in ("paper", "distill"):
        pruned = compact(dense, x[:1], remove)
        recalibrate_bn(pruned, x, 100)
        before = accuracy(pruned, ex, ey)
        finetune(pruned, {}, x, y, epochs=4, lr=3e-3, batch_size=32, recipe=RECIPES[name], teacher=teacher)
        acc[name] = accuracy(pruned, ex, ey)
        assert acc[name] > before + 0.3, (name, before, acc[name])
        with torch.no_grad():
            kl[name] = F.kl_div(
                F.log_softmax(pruned(ex) / 4, 1),
                F.log_softmax(held_teacher / 4, 1),
                reduction="batchmean",
                log_target=True,
            ).item()
    assert kl["distill"] < 0.8 * kl["paper"], (kl, acc)


def test_teacher_logits_must_match_the_data():
    model = tiny_cnn()
    x, y = batch(16, size=16)
    with pytest.raises(ValueError, match="teacher logits for 8 images"):
        finetune(model, {}, x, y, epochs=1, recipe=RECIPES["distill"], teacher=teacher_logits(model, x[:8]))


def test_device_names_are_checked_and_cuda_must_be_visible(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(EdgepruneError, match="choose from auto, cpu, cuda"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(EdgepruneError, match="--device cuda: torch sees no CUDA GPU"):
        CompressConfig(device="cuda").validate()


def test_finetune_on_a_named_device_trains_and_returns_the_model_where_it_was():
    """``device=`` moves model, data, masks and teacher for the training and the model back after (the
    CPU here; on a GPU machine ``cuda`` takes the same path)."""
    torch.manual_seed(0)
    model = tiny_cnn()
    x, y = batch(64, size=16)
    before = [p.detach().clone() for p in model.parameters()]
    conv = next(name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    keep = torch.ones_like(model.get_submodule(conv).weight, dtype=torch.bool)
    keep[0] = False  # one output channel masked: it must stay zero through training
    res = finetune(model, {conv: keep}, x, y, epochs=2, lr=1e-2, batch_size=16, device=torch.device("cpu"))
    assert res.epochs_run >= 1
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.count_nonzero(model.get_submodule(conv).weight[0]) == 0


def test_bn_recalibration_matches_a_float64_computation(demo_data):
    """The running statistics are the exact average (to float32 rounding): within 1e-5 relative of the same
    re-calibration in float64 (channels-last input, e.g., drifts to ~1e-4; see `recovery._recalibrate`)."""
    model = load_model("demo")
    exact = load_model("demo").double()
    x = demo_data.calib_x[:200]
    recalibrate_bn(model, x, 100)
    recalibrate_bn(exact, x.double(), 100)
    bns = [(m, e) for m, e in zip(model.modules(), exact.modules()) if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for m, e in bns:
        for got, want in ((m.running_mean, e.running_mean), (m.running_var, e.running_var)):
            assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5

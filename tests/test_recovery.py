"""Recovery recipes: distillation loss, shifts, and fine-tuning that follows the dense model's logits."""

import pytest
import torch
import torch.nn.functional as F

from edgeprune.errors import EdgepruneError
from edgeprune.evaluation import accuracy
from edgeprune.models import load_model
from edgeprune.pipeline import CompressConfig
from edgeprune.recovery import (
    FINETUNE_STEPS_PER_EPOCH,
    RECIPES,
    finetune,
    finetune_batch,
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
    """Channel-prune the bundled ResNet to 60 %, then fine-tune on 200 demo images: every recipe wins back
    accuracy, and both distill recipes end much closer to the dense model's predictions (held-out images)."""
    dense = load_model("fmnist_resnet", pretrained=True, num_classes=10, in_chans=1).eval()
    x, y, ex, ey = demo_data.calib_x, demo_data.calib_y, demo_data.eval_x, demo_data.eval_y
    teacher, held_teacher = teacher_logits(dense, x), teacher_logits(dense, ex)
    graph = GroupGraph(dense, x[:1])
    widths = widths_for(graph.groups, {g.name: 0.6 for g in graph.groups}, 8)
    remove = units_to_remove(graph.groups, widths, group_scores(graph)["magnitude"])
    kl, acc = {}, {}
    for name in ("paper", "distill-once", "distill"):
        pruned = compact(dense, x[:1], remove)
        recalibrate_bn(pruned, x, 100)
        before = accuracy(pruned, ex, ey)
        recipe = RECIPES[name]
        finetune(
            pruned, {}, x, y, epochs=4, lr=3e-3, batch_size=32, recipe=recipe,
            teacher=None if recipe.consistent else teacher, teacher_model=dense if recipe.consistent else None,
        )  # fmt: skip
        acc[name] = accuracy(pruned, ex, ey)
        assert acc[name] > before + 0.3, (name, before, acc[name])
        with torch.no_grad():
            kl[name] = F.kl_div(
                F.log_softmax(pruned(ex) / 4, 1),
                F.log_softmax(held_teacher / 4, 1),
                reduction="batchmean",
                log_target=True,
            ).item()
    assert kl["distill-once"] < 0.8 * kl["paper"], (kl, acc)
    assert kl["distill"] < 0.8 * kl["paper"], (kl, acc)


def test_the_consistent_teacher_labels_the_view_the_student_sees():
    """``distill`` runs the dense model on every shifted batch the student trains on (not on the unshifted
    images); the dense model is left as it was (eval mode, same weights)."""
    student, teacher = tiny_cnn(), tiny_cnn()
    x, y = batch(40, size=16)
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, k=k: seen[k].append(args[0].detach().clone()) if _m.training
                                    or k == "teacher" else None)
        for k, m in (("student", student), ("teacher", teacher))
    ]  # fmt: skip
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    recipe = RECIPES["distill"]
    assert recipe.consistent and recipe.shift > 0
    finetune(
        student, {}, x, y, val=(x[:8], y[:8]), epochs=2, lr=1e-3, batch_size=8, recipe=recipe, teacher_model=teacher
    )
    for h in hooks:
        h.remove()
    assert len(seen["teacher"]) == len(seen["student"]) == 10  # 2 epochs x 5 batches, one teacher pass each
    assert all(torch.equal(a, b) for a, b in zip(seen["student"], seen["teacher"], strict=True))
    assert any(not any(torch.equal(v, x[i : i + 8]) for i in range(0, 40, 8)) for v in seen["teacher"])  # shifted
    assert not teacher.training and all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("images", [8, 16, 24, 40, 80])
def test_one_cycle_fine_tuning_runs_at_every_small_plan(images):
    """2 epochs of ``images / 8`` steps: 2, 4, 6, 10 (torch's OneCycleLR divided by zero at exactly 10) and 20."""
    model = tiny_cnn()
    x, y = batch(images, size=16)
    res = finetune(model, {}, x, y, val=(x[:4], y[:4]), epochs=2, lr=1e-3, batch_size=8, recipe=RECIPES["distill-once"],
                   teacher=teacher_logits(model, x), patience=5)  # fmt: skip
    assert res.steps == 2 * (images // 8) and res.epochs_run == 2


def test_a_consistent_recipe_needs_the_dense_model():
    model = tiny_cnn()
    x, y = batch(16, size=16)
    with pytest.raises(ValueError, match="pass teacher_model"):
        finetune(model, {}, x, y, epochs=1, recipe=RECIPES["distill"], teacher=teacher_logits(model, x))


def test_the_finetune_batch_gives_every_epoch_enough_steps():
    # a power of two near images / 32, between 16 and the --batch-size
    assert [finetune_batch(n) for n in (10, 500, 1000, 2000, 4000, 60000)] == [16, 16, 32, 64, 128, 128]
    assert finetune_batch(1000, batch_size=8) == 8 and finetune_batch(3, batch_size=1) == 2
    for n in (700, 1000, 1500, 2000, 3000):
        assert -(-n // finetune_batch(n)) >= FINETUNE_STEPS_PER_EPOCH * 0.7  # steps an epoch
    with pytest.raises(EdgepruneError, match="--finetune-batch must be >= 2"):
        CompressConfig(finetune_batch=1).validate()


def test_teacher_logits_must_match_the_data():
    model = tiny_cnn()
    x, y = batch(16, size=16)
    with pytest.raises(ValueError, match="teacher logits for 8 images"):
        finetune(model, {}, x, y, epochs=1, recipe=RECIPES["distill-once"], teacher=teacher_logits(model, x[:8]))


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

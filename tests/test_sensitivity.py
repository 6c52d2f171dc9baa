import timm
import torch

from edgeprune.inventory import build_inventory
from edgeprune.sensitivity import (
    _hessian_grad_exact,
    _hessian_grad_fd,
    compute_sensitivity,
    filter_normalized,
    signal_scores,
)

from .core_models import batch, tiny_vit


def test_finite_difference_hessian_grad_matches_double_backward():
    """On a smooth network (GELU, LayerNorm) the finite difference converges to the exact H·g.
    (On ReLU nets it cannot: every kink crossed adds a jump; the exact pass treats ReLU'' as 0.)"""
    model = tiny_vit().double()
    params = [layer.weight for layer in build_inventory(model) if layer.prunable]
    x, y = batch(16)
    x = x.double()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    g = [t.detach() for t in torch.autograd.grad(loss, params)]
    exact = torch.cat([t.flatten() for t in _hessian_grad_exact(model, params, g, x, y, 16)])
    approx = torch.cat([t.flatten() for t in _hessian_grad_fd(model, params, g, g, x, y, 16)])
    cos = torch.nn.functional.cosine_similarity(exact, approx, dim=0)
    assert cos > 0.99, cos


def test_grasp_signal_works_without_double_backward():
    """MobileNetV3's hardsigmoid has no double backward: the finite-difference path takes over."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=10, in_chans=1).eval()
    layers = build_inventory(model)
    x, y = batch(16)
    sens = compute_sensitivity(model, layers, x, y, batch_size=8, with_hessian=True)
    assert sens.hess_grad is not None and len(sens.hess_grad) == len(sens.abs_grad)
    assert all(torch.isfinite(h).all() for h in sens.hess_grad.values())
    assert any(h.abs().sum() > 0 for h in sens.hess_grad.values())


def test_workspace_plans_score_the_dense_weights_after_screening():
    from edgeprune.pipeline import CompressConfig, Workspace, load_workspace_inputs

    cfg = CompressConfig(calib_size=64, eval_size=64, gradient_samples=32)
    model, data = load_workspace_inputs(cfg)
    ws = Workspace(cfg, model, data)
    before = ws.plans("snip", 0.8)[0].plan
    ws.screen(ws.plans("mag", 0.9)[0])  # leaves the model masked
    after = ws.plans("snip", 0.8)[0].plan
    assert before == after


def test_filter_normalized_removes_filter_and_channel_levels():
    """|g| = filter activity x channel activity x within-filter detail: only the detail is left to rank by,
    so a quiet filter is not emptied as a whole (the channel collapse measured in paper_notes.md)."""
    torch.manual_seed(0)
    detail = torch.rand(6, 5, 3, 3) + 0.5
    per_filter = torch.tensor([1e-3, 1.0, 10.0, 0.1, 5.0, 2.0]).view(6, 1, 1, 1)
    per_channel = torch.tensor([0.01, 1.0, 3.0, 0.5, 7.0]).view(1, 5, 1, 1)
    g = filter_normalized(per_filter * per_channel * detail)
    raw = per_filter * per_channel * detail / detail
    ratio = g / detail  # arithmetic means mix the detail into the factors: about +-15 % is left of a 1e6 spread
    assert raw.max() / raw.min() > 1e5 and ratio.max() / ratio.min() < 1.4
    assert torch.equal(filter_normalized(torch.ones(4)), torch.ones(4))  # 1-D: unchanged
    # the product signal then spreads a layer's low scores over all filters instead of the quietest one
    w = torch.ones(6, 5, 3, 3)
    scores = signal_scores("product", w, per_filter * per_channel * detail)
    lowest = scores.flatten().argsort()[: scores.numel() // 4]
    assert len({int(i) // (5 * 9) for i in lowest}) > 2

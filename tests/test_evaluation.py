"""evaluation.accuracy: the fast path (inference mode, channels-last for conv nets) counts what a plain loop counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeprune.evaluation import accuracy, accuracy_and_loglik
from edgeprune.models import load_model


def _plain_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum()) / len(x)


def test_accuracy_matches_a_plain_loop_in_both_layouts(demo_data) -> None:
    model = load_model("demo")
    x, y = demo_data.eval_x[:150], demo_data.eval_y[:150]
    want = _plain_accuracy(model, x, y)
    assert 0.5 < want < 1.0  # the bundled model is trained: a real count, not chance or all-correct
    model.train()
    for layout in (None, True, False):
        for batch in (7, 64, 512):  # a last partial batch, and one batch larger than the data
            assert accuracy(model, x, y, batch_size=batch, channels_last=layout) == want
    # it leaves the model as it came: training mode, the contiguous layout, weights a gradient pass can use
    assert model.training
    assert all(p.is_contiguous() and not p.is_inference() for p in model.parameters())
    model(x[:4]).sum().backward()


class _ViewsConvOutput(nn.Module):
    """Flattens a conv output with ``view``: legal only on contiguous strides, so channels-last cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))


def test_a_model_that_cannot_run_channels_last_falls_back() -> None:
    torch.manual_seed(0)
    model = _ViewsConvOutput().eval()
    x, y = torch.randn(20, 1, 8, 8), torch.randint(0, 3, (20,))
    cl = model.conv(x).contiguous(memory_format=torch.channels_last)
    try:
        cl.view(cl.shape[0], -1)
        raise AssertionError("the fixture must need contiguous strides")
    except RuntimeError:
        pass
    assert accuracy(model, x, y, batch_size=8) == _plain_accuracy(model, x, y)
    assert model.conv.weight.is_contiguous() and not model.conv.weight.is_inference()
    model(x).sum().backward()  # the fallback left ordinary parameters (repvgg_a0 crashed in sensitivity)


def test_log_likelihood_is_the_mean_log_probability_of_the_right_class(demo_data) -> None:
    model = load_model("demo").eval()
    x, y = demo_data.eval_x[:150], demo_data.eval_y[:150]
    with torch.no_grad():
        want = torch.log_softmax(model(x), 1)[torch.arange(len(y)), y].mean().item()
    acc, ll = accuracy_and_loglik(model, x, y, batch_size=64)
    assert acc == _plain_accuracy(model, x, y) and ll == pytest.approx(want, abs=1e-5)
    assert -2.3 < ll < 0  # a trained 10-class model: better than uniform, not certain

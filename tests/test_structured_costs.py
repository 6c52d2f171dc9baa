"""The latency model of ``--latency-costs`` and its allocation: pure arithmetic, and the MAC hooks on real
timm architectures."""

from __future__ import annotations

import pytest
import timm
import torch

from edgeprune.evaluation import params_and_macs
from edgeprune.structured import GroupGraph, compact
from edgeprune.structured.costs import LatencyModel, calibrated, fit_latency_model, latency_allocation, layer_macs
from edgeprune.structured.groups import ChannelGroup


def test_saving_counts_a_layer_between_two_narrowed_groups_once():
    model = LatencyModel(10.0, ((2.0, ("a",)), (4.0, ("a", "b"))))
    assert model.saving({"a": 0.5}) == pytest.approx(1.0 + 2.0)
    # both halved: the shared layer keeps a quarter of its MACs (saves 3 ms), not 0.5 + 0.5 of them (4 ms)
    assert model.ms({"a": 0.5, "b": 0.5}) == pytest.approx(10.0 - 1.0 - 3.0)
    assert model.ms({}) == 10.0


def test_fit_assigns_layers_to_the_groups_that_shrink_them_and_their_measured_rates():
    dense = {"l1": 100.0, "l2": 200.0, "l3": 50.0, "head": 10.0}
    narrowed = {
        "a": {"l1": 50.0, "l2": 100.0, "l3": 50.0, "head": 10.0},  # a feeds l1 and l2
        "b": {"l1": 100.0, "l2": 100.0, "l3": 25.0, "head": 10.0},  # b feeds l2 and l3
        "idle": dict(dense),  # its narrowing removed no MACs: not a layer owner
    }
    # a saves 1.5 ms for 150 MACs (0.01 ms/MAC), b 2.5 ms for 125 (0.02); "idle" removed no MACs
    model = fit_latency_model(dense, narrowed, 10.0, {"a": 8.5, "b": 7.5, "idle": 10.0}, floor_rate=1e-4)
    layers = {gs: ms for ms, gs in model.layers}
    assert layers == pytest.approx({("a",): 1.0, ("a", "b"): 3.0, ("b",): 1.0})  # l2: the mean of both rates
    assert model.ms({"b": 0.5}) == pytest.approx(10.0 - 3.0 * 0.5 - 1.0 * 0.5)
    # a saving lost in noise (or negative) still costs the floor rate, so its units are not free to remove
    quiet = fit_latency_model(dense, {"a": narrowed["a"]}, 10.0, {"a": 10.2}, floor_rate=1e-4)
    assert quiet.layers[0][0] == pytest.approx(100 * 1e-4)
    # scaled to what every group narrowed together measured
    both = {"a": 0.5, "b": 0.5}
    cal = calibrated(model, both, measured_ms=7.0)
    assert cal.ms(both) == pytest.approx(7.0) and cal.scale == pytest.approx(3.0 / model.saving(both))


def _group(name: str, units: int) -> ChannelGroup:
    return ChannelGroup(name, "conv", "channels", units, 1, 1000)


def test_allocation_removes_the_least_score_per_millisecond_within_ranges_until_the_goal():
    groups = [_group("early", 64), _group("late", 64)]
    # equal scores; a channel of "late" saves 3x the time of one of "early"
    model = LatencyModel(10.0, ((2.0, ("early",)), (6.0, ("late",))))
    scores = {"early": torch.ones(64), "late": torch.ones(64)}
    wide = {"early": (0.0, 0.75), "late": (0.0, 0.75)}
    w = latency_allocation(groups, scores, model, 7.0, wide, round_to=16)
    assert w == {"early": 64, "late": 32} and model.ms({"late": 0.5}) <= 7.0  # only the cheap-per-ms group
    # "late" capped at 25 % (1.5 ms): the rest of the 2.5 ms comes from "early", 0.5 ms per block of 16
    w = latency_allocation(groups, scores, model, 7.5, {"early": (0.0, 0.75), "late": (0.0, 0.25)}, round_to=16)
    assert w == {"early": 32, "late": 48}
    # a group starts at the low end of its range; nothing goes past the high end, even if the goal is missed
    w = latency_allocation(groups, scores, model, 0.0, {"early": (0.5, 0.5), "late": (0.0, 0.75)}, round_to=16)
    assert w == {"early": 32, "late": 16}
    # a block of near-useless units wins over a bigger saving: "early" has 16 of them, "late" none
    scores = {"early": torch.cat([torch.full((16,), 0.01), torch.ones(48)]), "late": torch.ones(64)}
    assert latency_allocation(groups, scores, model, 9.5, wide, round_to=16) == {"early": 48, "late": 64}


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100", "vit_tiny_patch16_224"])
def test_layer_macs_cover_the_model_and_follow_narrowing(name):
    kw = {"img_size": 32} if "vit" in name else {}
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kw).eval()
    x = torch.randn(1, 3, 32, 32)
    dense = layer_macs(model, x)
    total = params_and_macs(model, x)[1]
    assert 0.98 * total <= sum(dense.values()) <= total  # torch-pruning also counts norms and activations
    graph = GroupGraph(model, x)
    g = max(graph.groups, key=lambda g: g.units)
    narrowed = layer_macs(compact(model, x, {g.name: list(range(g.units // 2))}), x)
    shrunk = [n for n in dense if narrowed[n] < dense[n]]
    assert shrunk and all(narrowed[n] >= dense[n] / 2 - 1e-6 for n in shrunk)  # a group scales a layer at most once
    assert all(narrowed[n] == dense[n] for n in dense if n not in shrunk)

"""Screening and BN re-calibration run on ``--device`` (`Workspace.device`) and hand the model back on the CPU.

This machine has no GPU, so the CPU tests show what they can: an explicit ``cpu`` screens exactly like the
default, and a screening really loads the candidate's weights on the workspace's device (``meta``, a device
without data: it gets as far as the weights, which is what is observed). The CUDA test runs where one is seen.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from edgeprune.pipeline import CompressConfig, Workspace, load_workspace_inputs

from .small_runs import SMALL


@pytest.fixture(scope="module")
def inputs() -> tuple[CompressConfig, torch.nn.Module, object, dict]:
    cfg = CompressConfig(**SMALL, range_baselines=("mag",))
    cfg.validate()
    model, data = load_workspace_inputs(cfg)
    return cfg, model, data, copy.deepcopy(model.state_dict())


def _workspace(inputs, device: str) -> Workspace:
    cfg, model, data, dense = inputs
    model.load_state_dict(dense)  # a screening leaves the model masked: each workspace starts from the dense one
    return Workspace(dataclasses.replace(cfg, device=device), model, data, with_hessian=False)


def _screen(ws: Workspace, n: int = 3) -> list[tuple[float, float, float]]:
    cands = [ws.screen(cp) for cp in ws.plans("mix-and-match", 0.5)[:n]]
    return [(c.sparsity, c.zero_shot_accuracy, c.accuracy) for c in cands]


def test_explicit_cpu_screens_exactly_like_the_default(inputs) -> None:
    default, cpu = _workspace(inputs, "auto"), _workspace(inputs, "cpu")
    assert cpu.device == torch.device("cpu")
    if default.device != cpu.device:
        pytest.skip("auto resolves to a GPU here: test_screening_on_cuda covers it")
    assert _screen(cpu) == _screen(default)
    assert all(p.device.type == "cpu" for p in cpu.model.parameters())


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_screening_loads_the_candidate_on_the_workspace_device(inputs) -> None:
    """The candidate's weights are loaded into the model where ``Workspace.device`` says (observed by a
    load hook), not on the CPU it lives on; ``meta`` has no data, so the screening stops right after."""
    ws = _workspace(inputs, "cpu")
    ws.device = torch.device("meta")
    seen: list[torch.device] = []
    hook = ws.model.register_load_state_dict_post_hook(lambda m, _: seen.append(next(m.parameters()).device))
    try:
        with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
            ws.screen(ws.plans("mix-and-match", 0.5)[0])
    finally:
        hook.remove()
        ws.model.to_empty(device="cpu")  # back from the data-less device for the other tests
        ws.model.load_state_dict(ws.original)
    assert seen[-1] == torch.device("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_screening_on_cuda(inputs) -> None:
    """Every screening forward runs on the GPU; the model comes back on the CPU; same sparsity, and the
    accuracies of the CPU run up to a few images (cuDNN sums in another order)."""
    cpu, gpu = _workspace(inputs, "cpu"), _workspace(inputs, "cuda")
    devices: set[str] = set()
    hook = gpu.model.register_forward_pre_hook(lambda _, args: devices.add(args[0].device.type))
    try:
        on_gpu = _screen(gpu)
    finally:
        hook.remove()
    assert devices == {"cuda"}
    assert all(p.device.type == "cpu" for p in gpu.model.parameters())
    n = len(gpu.data.eval_x)
    for (s_c, z_c, a_c), (s_g, z_g, a_g) in zip(_screen(cpu), on_gpu, strict=True):
        assert s_c == s_g
        assert abs(z_c - z_g) <= 3 / n and abs(a_c - a_g) <= 3 / n

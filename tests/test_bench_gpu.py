"""bench/gpu.py's parts on the CPU, in seconds: its diffusers baseline is DDPM's
CIFAR-10 network, and its correctness checks pass on a right network and fail on
a wrong one. The whole script's CPU run, `python bench/gpu.py --device cpu
--smoke`, takes 1-2 minutes: a manual check, not a test."""

import sys
from pathlib import Path

import pytest
import torch

from pipeline.maths.architecture import architecture

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def gpu():
    sys.path.insert(0, str(BENCH))  # the script imports its neighbour, model.py
    try:
        import gpu

        yield gpu
    finally:
        sys.path.remove(str(BENCH))


def test_the_diffusers_baseline_is_ddpms_cifar10_network(gpu):
    pytest.importorskip("diffusers")
    net = gpu.DiffusersNet(architecture("small", 16, num_classes=10))
    # google/ddpm-cifar10-32's UNet2DModel has 35,746,307 parameters; a class
    # embedding adds 512 per class and one for "no label".
    assert sum(p.numel() for p in net.parameters()) == 35_746_307 + 11 * 512
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = net(x, torch.zeros(2), torch.tensor([3, -1]))
    assert out.shape == x.shape


def test_the_checks_pass_a_right_network_and_fail_a_wrong_call(gpu, monkeypatch):
    cpu = torch.device("cpu")
    plan = gpu.Plan(smoke=True)
    checks = gpu.check_network(plan, cpu, backend="eager")
    assert set(checks) == {name for name in gpu.LIMITS if "cuda_graph" not in name}
    assert all(checks[name] <= gpu.LIMITS[name] for name in checks), checks
    # A "compiled" guided call that is 10% off is caught.
    right = gpu.guided_call

    def wrong(net, resolution, batch, device, backend):
        call = right(net, resolution, batch, device, backend)
        return call if backend is None else (lambda: call() * 0.9)

    monkeypatch.setattr(gpu, "guided_call", wrong)
    cfg = architecture(plan.check_template, num_classes=gpu.NUM_CLASSES)
    net = gpu.denoiser(gpu.UNet, cfg, cpu).eval()
    caught = gpu.check_guided_call(net, cfg.resolution, 2, cpu, backend="eager")
    assert caught["guided_compiled_error"] > gpu.LIMITS["guided_compiled_error"]

"""The UNet: templates at any resolution, shapes, labels and their dropout,
gradients, layouts, bf16, and no graph breaks under torch.compile."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.maths.architecture import TEMPLATES, UNetConfig, architecture
from pipeline.maths.unet import Attention, GroupNorm, ResBlock, build
from tests.nets import randomised

SIZES = {"tiny": (0.2e6, 1e6), "small": (34e6, 40e6), "base": (54e6, 60e6), "base64": (58e6, 66e6)}


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_template_builds_with_its_size_and_maps_shapes(name):
    torch.manual_seed(0)
    net = build(name, num_classes=10).eval()
    low, high = SIZES[name]
    print(f"{name}: {net.parameter_count() / 1e6:.2f}M parameters")
    assert low < net.parameter_count() < high
    res = net.cfg.resolution
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        for label in (None, torch.tensor([3, 7])):
            out = net(x, torch.tensor([-1.0, 0.5]), label)
            assert out.shape == x.shape and out.dtype == torch.float32


def test_labels_change_the_output_and_no_label_is_its_own_class():
    net = randomised(build("tiny", num_classes=10)).eval()
    x, c = torch.randn(3, 3, 8, 8), torch.zeros(3)
    with torch.no_grad():
        a, b = net(x, c, torch.tensor([1, 1, 1])), net(x, c, torch.tensor([2, 2, 2]))
        unconditional = net(x, c, None)
        null = net(x, c, torch.full((3,), 10))
    assert not torch.allclose(a, b) and not torch.allclose(a, unconditional)
    assert torch.equal(unconditional, null)


def test_a_negative_label_is_no_label_and_the_network_drops_none_itself():
    # Label dropout is the training step's, per image (test_training_step.py): the
    # network, even in training mode with a rate recorded, keeps every label.
    torch.manual_seed(2)
    net = randomised(build("tiny", num_classes=10, label_dropout=0.5, dropout=0.0))
    x = torch.randn(1, 3, 8, 8).expand(64, -1, -1, -1)
    c, label = torch.zeros(64), torch.full((64,), 4)
    with torch.no_grad():
        conditional = net.eval()(x, c, label)
        unconditional = net(x, c, None)
        trained = net.train()(x, c, label)
        mixed = net(x, c, torch.where(torch.arange(64) % 2 == 0, label, -1))
    assert torch.equal(trained, conditional)
    assert not torch.allclose(conditional, unconditional)
    assert torch.allclose(mixed[0::2], conditional[0::2], atol=1e-6)
    assert torch.allclose(mixed[1::2], unconditional[1::2], atol=1e-6)


def test_gradients_reach_every_parameter():
    net = build("tiny", num_classes=10)
    x, c, label = torch.randn(4, 3, 8, 8), torch.randn(4), torch.tensor([0, 3, 5, 10])
    net(x, c, label).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())  # all wired in
    net.zero_grad()
    randomised(net)(x, c, label).square().mean().backward()
    silent = [n for n, p in net.named_parameters() if not p.grad.abs().sum()]
    assert silent == []


def test_a_residual_block_is_its_formula_in_training_too():
    # The block drops out and scales its sums in place, for speed: the numbers of
    # the plain formula all the same, dropout's draws included.
    block = ResBlock(24, 48, 96, architecture("tiny", 8, dropout=0.5), attention=True).train()
    torch.manual_seed(0)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, emb = torch.randn(2, 24, 8, 8, requires_grad=True), torch.randn(2, 96)
    torch.manual_seed(3)
    out = block(x, emb)
    torch.manual_seed(3)
    h = block.conv0(F.silu(block.norm0(x)))
    scale, shift = block.affine(emb)[:, :, None, None].chunk(2, dim=1)
    h = block.conv1(F.dropout(F.silu(block.norm1(h) * (scale + 1) + shift), 0.5))
    y = (h + block.skip(x)) / math.sqrt(2)
    assert block.attn is not None
    assert torch.allclose(out, (y + block.attn(y)) / math.sqrt(2), atol=1e-5)
    out.square().sum().backward()  # autograd refuses in-place ops on what it saved
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_channels_last_gives_the_same_output():
    net = randomised(build("tiny", num_classes=10)).eval()
    x, c, label = torch.randn(4, 3, 8, 8), torch.randn(4), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        expected = net(x, c, label)
        fast = net.to(memory_format=torch.channels_last)
        out = fast(x.to(memory_format=torch.channels_last), c, label)
    assert torch.allclose(out, expected, atol=1e-5)


def test_bf16_autocast_stays_close_and_normalises_in_float32():
    net = randomised(build("tiny", num_classes=10)).eval()
    x, c = torch.randn(8, 3, 8, 8) * 3, torch.randn(8)
    with torch.no_grad():
        expected = net(x, c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, c)
    assert torch.isfinite(out).all()
    assert (out.float() - expected).norm() / expected.norm() < 0.05
    # GroupNorm statistics in float32: large offsets do not swallow the signal
    norm = GroupNorm(2, 4)
    big = torch.randn(2, 4, 8, 8) + 1000
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = norm(big.bfloat16())
    assert (low.float() - norm(big.bfloat16().float())).abs().max() < 0.02


@pytest.mark.parametrize("training", [False, True])
def test_no_graph_breaks_under_torch_compile(training):
    net = build("tiny", num_classes=10, label_dropout=0.1).train(training)
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2)
    for label in (None, torch.tensor([1, 2])):
        explained = torch._dynamo.explain(net)(x, c, label)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_attention_runs_on_the_fused_kernels():
    # Each head's features must be contiguous for flash / memory-efficient SDPA;
    # the math fallback would be slower and use memory quadratic in pixels.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    net = randomised(build("small")).eval()
    x, c = torch.randn(2, 3, 32, 32), torch.zeros(2)
    with torch.no_grad():
        expected = net(x, c)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            assert torch.allclose(net(x, c), expected, atol=1e-4)
            fast = net.to(memory_format=torch.channels_last)
            assert torch.allclose(
                fast(x.to(memory_format=torch.channels_last), c), expected, atol=1e-4
            )


def test_an_unconditional_network_refuses_labels():
    with pytest.raises(ValueError, match="unconditional"):
        build("tiny")(torch.randn(1, 3, 8, 8), torch.zeros(1), torch.tensor([1]))


def test_config_is_checked():
    with pytest.raises(
        ValueError,
        match=r"resolution: must be 8 to 512 px and a multiple of 4 "
        r"\(channel_mult 1,2,2 halves the side twice\), got 30",
    ):
        UNetConfig(resolution=30, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="unknown template 'huge'"):
        build("huge")
    with pytest.raises(ValueError, match=r"attention: levels must lie in 0\.\.1"):
        architecture("tiny", 8, attention=(2,))
    with pytest.raises(ValueError, match="template tiny: .*unexpected keyword argument 'chanels'"):
        architecture("tiny", 8, chanels=3)


@pytest.mark.parametrize("resolution", [8, 16, 24, 40, 64])
def test_a_template_takes_any_side_its_levels_divide(resolution):
    # Convolutions do not care about the side: the same template has the same
    # parameters at every resolution, and attention stays at its level.
    net = build("tiny", resolution, num_classes=10).eval()
    assert net.parameter_count() == build("tiny", 8, num_classes=10).parameter_count()
    sides = []
    for module in net.modules():
        if isinstance(module, Attention):
            module.register_forward_hook(lambda m, i, o: sides.append(i[0].shape[-1]))
    x = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad():
        out = net(x, torch.zeros(2), torch.tensor([1, 2]))
    assert out.shape == x.shape
    # level 1 is half the side: its encoder block, the bottleneck's (tiny has
    # two levels, so the bottleneck is at level 1 too) and its 2 decoder blocks
    assert sides == [resolution // 2] * 4


def test_overrides_change_width_and_depth():
    wide = architecture("tiny", 16, channels=32, channel_mult=(1, 2, 2), attention=(2,))
    assert (wide.channels, wide.channel_mult, wide.attention) == (32, (1, 2, 2), (2,))
    net = build("tiny", 16, channels=32, channel_mult=(1, 2, 2), attention=(2,))
    assert net.conv_in.out_channels == 32 and len(net.down) == 3 * 1 + 2
    assert net.parameter_count() > build("tiny", 16).parameter_count()


def test_an_architecture_round_trips_through_plain_data_and_rebuilds_the_network():
    cfg = architecture("small", 16, num_classes=10, channels=32, blocks=1)
    plain = cfg.to_dict()
    assert plain["channel_mult"] == [1, 2, 2, 2] and UNetConfig.from_dict(plain) == cfg
    net = randomised(build("small", 16, num_classes=10, channels=32, blocks=1))
    again = UNetConfig.from_dict(plain)
    rebuilt = type(net)(again)
    rebuilt.load_state_dict(net.state_dict())  # every key and shape the same
    with pytest.raises(ValueError, match=r"unknown \['depth'\], missing \['blocks'\]"):
        UNetConfig.from_dict({**{k: v for k, v in plain.items() if k != "blocks"}, "depth": 2})


def test_a_negative_label_is_no_label():
    net = randomised(build("tiny", num_classes=10)).eval()
    x, c = torch.randn(4, 3, 8, 8), torch.zeros(4)
    with torch.no_grad():
        mixed = net(x, c, torch.tensor([3, -1, 3, -1]))
        assert torch.equal(mixed[1::2], net(x, c, None)[1::2])
        assert torch.equal(mixed[0::2], net(x, c, torch.tensor([3, 3, 3, 3]))[0::2])

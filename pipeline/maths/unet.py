"""A DDPM++/ADM-style UNet: (image, noise conditioning, optional label) -> image.

The network knows nothing of noise schedules: `pipeline.maths.edm.Precond` feeds
it c_in * y and c_noise and combines its output. It follows DDPM (Ho et al. 2020)
and ADM (Dhariwal & Nichol 2021): residual blocks with GroupNorm and SiLU, the
noise embedding applied as a per-channel scale and shift ("adaptive GroupNorm"),
self-attention at chosen levels, skip connections between encoder and
decoder, residual sums scaled by 1/sqrt(2) (DDPM++), and zero-initialised output
layers, so that every residual branch and the network itself start at zero.

Written for speed as much as clarity: attention is one call to
`scaled_dot_product_attention` (flash or memory-efficient kernels on GPUs),
normalisation runs in float32 whatever the autocast dtype, nothing in `forward`
depends on tensor values (no graph breaks under `torch.compile`), and every
layer works on `channels_last` tensors.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.maths.architecture import UNetConfig, architecture, attention_heads, norm_groups


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32, so statistics stay exact under bf16 autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Autocast off, on a device that has it (the meta device, which the
        # no-host-read test trains on, has not).
        has_autocast = torch.amp.is_autocast_available(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if has_autocast else nullcontext():
            out = F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)
        return out.to(x.dtype)


def _norm(channels: int) -> GroupNorm:
    return GroupNorm(norm_groups(channels), channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of c_noise (Vaswani et al. 2017), then a 2-layer MLP."""

    def __init__(self, channels: int, emb_channels: int, max_period: float = 10_000.0):
        super().__init__()
        half = channels // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / (half - 1))
        self.freqs: torch.Tensor
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map."""

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.heads = attention_heads(channels, head_channels)
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Pixels-major, so each head's features are contiguous: the layout the
        # fused (flash, memory-efficient) kernels need. Free for channels_last.
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).contiguous()  # [b, h*w, 3c]
        qkv = qkv.reshape(b, h * w, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, heads, h*w, c/heads]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)  # NCHW view of NHWC
        # Back to the input's memory format, so the projection's weight gradient
        # keeps the layout DDP's buckets expect.
        return self.proj(out.contiguous(memory_format=_memory_format(x)))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; adaptive GroupNorm from the embedding, SiLU, dropout,
    conv; a residual sum; then optional attention."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, cfg: UNetConfig, attention: bool):
        super().__init__()
        self.norm0 = _norm(in_ch)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.affine = nn.Linear(emb_ch, 2 * out_ch)
        self.norm1 = _norm(out_ch)
        # In place: its input is SiLU's output, which SiLU's backward does not need.
        self.dropout = nn.Dropout(cfg.dropout, inplace=True)
        self.conv1 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = Attention(out_ch, cfg.head_channels) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].to(h.dtype).chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        # Scaled in place: one tensor fewer per sum (with the in-place dropout, 3% of
        # a CPU training step, in turns against the out-of-place version).
        x = torch.add(h, self.skip(x)).mul_(_SKIP_SCALE)
        if self.attn is not None:
            x = torch.add(x, self.attn(x)).mul_(_SKIP_SCALE)
        return x


_SKIP_SCALE = 1 / math.sqrt(2)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """F(x, c_noise, label): see the module docstring."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        emb_ch = 4 * cfg.channels
        self.embed_noise = NoiseEmbedding(cfg.channels, emb_ch)
        # Index num_classes is "no label": unconditional sampling and label dropout.
        self.embed_label = nn.Embedding(cfg.num_classes + 1, emb_ch) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)

        self.down = nn.ModuleList()
        skips, ch = [cfg.channels], cfg.channels
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.blocks):
                self.down.append(
                    ResBlock(ch, cfg.channels * mult, emb_ch, cfg, level in cfg.attention)
                )
                ch = cfg.channels * mult
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
        self.mid = nn.ModuleList(
            [ResBlock(ch, ch, emb_ch, cfg, attention=True), ResBlock(ch, ch, emb_ch, cfg, False)]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.blocks + 1):
                out = cfg.channels * mult
                self.up.append(ResBlock(ch + skips.pop(), out, emb_ch, cfg, level in cfg.attention))
                ch = out
            if level > 0:
                self.up.append(Upsample(ch))
        self.norm_out = _norm(ch)
        self.conv_out = _zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        """F(x, c_noise, label) for a batch; `label` holds class indices, None or a
        negative index meaning no label (unconditional)."""
        emb = self.embed_noise(c_noise)
        if label is not None and self.embed_label is None:
            raise ValueError("this network is unconditional (num_classes=0): pass label=None")
        if self.embed_label is not None:
            null = torch.full((x.shape[0],), self.cfg.num_classes, device=x.device)
            # A negative label is "no label" for that row: guidance batches
            # conditional and unconditional rows into one call.
            # (Label dropout is the training step's: it drops a label per image.)
            label = null if label is None else torch.where(label < 0, null, label.to(torch.long))
            emb = emb + self.embed_label(label)
        emb = F.silu(emb)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            if isinstance(block, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build(template: str, resolution: int | None = None, **overrides: Any) -> UNet:
    """The UNet of a template at `resolution` (default: the template's own), with
    any UNetConfig field overridden: `build("small", 64, num_classes=10)`."""
    return UNet(architecture(template, resolution, **overrides))

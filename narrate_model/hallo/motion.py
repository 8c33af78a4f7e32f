"""AnimateDiff motion modules ("Vanilla" temporal transformers) as Hallo uses them.

Keys follow AnimateDiff / Hallo: `temporal_transformer.{norm,proj_in,proj_out}`,
`temporal_transformer.transformer_blocks.0.{attention_blocks.i,norms.i,ff,ff_norm}` with a sinusoidal
`attention_blocks.i.pos_encoder.pe` buffer [1, max_len, C] (stored in `net.pth`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .attention import Attention, FeedForward, GroupNorm


@dataclass(frozen=True)
class MotionModuleConfig:
    """`default.yaml` motion_module_kwargs."""
    num_attention_heads: int = 8
    num_transformer_block: int = 1
    num_attention_blocks: int = 2  # attention_block_types [Temporal_Self, Temporal_Self]
    max_len: int = 32  # temporal_position_encoding_max_len


def sinusoidal_positions(max_len: int, dim: int) -> torch.Tensor:
    position = torch.arange(max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_positions(max_len, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


class TemporalAttention(Attention):
    """Self-attention across frames at one spatial position; the position encoding is added to its (normed) input."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__(dim, heads, dim // heads)
        self.pos_encoder = PositionalEncoding(dim, max_len)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return super().forward(self.pos_encoder(x))


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, config: MotionModuleConfig):
        super().__init__()
        heads = config.num_attention_heads
        self.attention_blocks = nn.ModuleList(
            [TemporalAttention(dim, heads, config.max_len) for _ in range(config.num_attention_blocks)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(config.num_attention_blocks)])
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            h = attention(norm(h)) + h
        return self.ff(self.ff_norm(h)) + h


class TemporalTransformer(nn.Module):
    def __init__(self, channels: int, config: MotionModuleConfig, groups: int = 32):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(channels, config) for _ in range(config.num_transformer_block)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, f, C, H, W] -> same shape."""
        b, f, c, height, width = x.shape
        h = self.norm(x.flatten(0, 1))
        # every op but attention is per token, so work directly in the frame-sequence layout [(b H W), f, C]
        h = h.unflatten(0, (b, f)).permute(0, 3, 4, 1, 2).reshape(b * height * width, f, c)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h)
        h = self.proj_out(h)
        h = h.reshape(b, height, width, f, c).permute(0, 3, 4, 1, 2)
        return h + x


class MotionModule(nn.Module):
    """`VanillaTemporalModule`."""

    def __init__(self, channels: int, config: MotionModuleConfig):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, config)

    def forward(self, x: torch.Tensor, frames: int, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [(b f), C, H, W]; prefix: motion-frame features [b, M, C, H, W] put in front of the frames (and cut
        off again), so the clip's first frames attend to the end of the previous clip."""
        video = x.unflatten(0, (-1, frames))
        skip = 0
        if prefix is not None:
            skip = prefix.shape[1]
            video = torch.cat([prefix.to(video.dtype), video], dim=1)
        return self.temporal_transformer(video)[:, skip:].flatten(0, 1)

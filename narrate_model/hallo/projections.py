"""Hallo's three small conditioning networks: face locator, face-identity projection, audio projection.

Constructor arguments and state-dict keys follow Hallo's `net.pth` after the prefixes `face_locator.`, `imageproj.`
and `audioproj.`, so the real checkpoint loads into them unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FaceLocator(nn.Module):
    """Encodes the binary face-box image into a feature map added to the denoising UNet's `conv_in` output.

    Convs are 2D applied per frame ("inflated"): a [B,3,F,H,W] video in gives [B,C,F,H/8,W/8] out; a [B,3,H,W]
    image gives [B,C,H/8,W/8].
    """

    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int = 3,
                 block_out_channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            blocks += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.Conv2d(c_in, c_out, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(block_out_channels[-1], conditioning_embedding_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # Hallo zero-initialises the output conv (ControlNet style)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        video = conditioning.dim() == 5
        if video:
            b, c, f, h, w = conditioning.shape
            conditioning = conditioning.transpose(1, 2).reshape(b * f, c, h, w)
        x = F.silu(self.conv_in(conditioning))
        for block in self.blocks:
            x = F.silu(block(x))
        x = self.conv_out(x)
        if video:
            x = x.reshape(b, f, *x.shape[1:]).transpose(1, 2)
        return x


class ImageProjModel(nn.Module):
    """Face-identity embedding [B,512] -> `clip_extra_context_tokens` cross-attention tokens [B,T,C]."""

    def __init__(self, cross_attention_dim: int = 1024, clip_embeddings_dim: int = 1024,
                 clip_extra_context_tokens: int = 4):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.clip_extra_context_tokens = clip_extra_context_tokens
        self.proj = nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(-1, self.clip_extra_context_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class AudioProjModel(nn.Module):
    """Windowed wav2vec2 features [B,F,window,layers,C] -> per-frame audio tokens [B,F,context_tokens,output_dim]."""

    def __init__(self, seq_len: int = 5, blocks: int = 12, channels: int = 768, intermediate_dim: int = 512,
                 output_dim: int = 768, context_tokens: int = 32):
        super().__init__()
        self.seq_len, self.blocks, self.channels = seq_len, blocks, channels
        self.context_tokens, self.output_dim = context_tokens, output_dim
        self.proj1 = nn.Linear(seq_len * blocks * channels, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        b, f = audio_embeds.shape[:2]
        x = audio_embeds.reshape(b * f, -1)
        x = torch.relu(self.proj1(x))
        x = torch.relu(self.proj2(x))
        tokens = self.norm(self.proj3(x).reshape(b * f, self.context_tokens, self.output_dim))
        return tokens.reshape(b, f, self.context_tokens, self.output_dim)

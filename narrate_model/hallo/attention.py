"""Spatial transformer blocks of Hallo's denoising UNet: the reference-reading image block and the audio block.

Hidden states inside the UNet are kept per frame, `[(b f), C, H, W]`; these blocks see tokens `[(b f), H*W, C]`.
Parameter names follow Hallo's `net.pth` (`attn1`, `attn2`, `attn2_0..2`, `zero_conv_*`, `ff.net.0.proj`, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter layout (`to_q/k/v` without bias, `to_out.0` with bias)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: Optional[int] = None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v already projected, [N, L, inner]."""
        out = F.scaled_dot_product_attention(self.split_heads(q), self.split_heads(k), self.split_heads(v))
        return self.to_out[0](out.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        return self.attend(self.to_q(x), self.to_k(context), self.to_v(context))


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that hands autograd a contiguous input. torch 2.11's CPU backward crashes (segfault) on a
    channels-last input that needs no gradient when the affine weights do (the hidden-state layout after our 1x1
    convs and motion modules). Without autograd the input is used as is, so inference results are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous() if torch.is_grad_enabled() else x)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, 4x wide; keys `net.0.proj` and `net.2` (slot 1 is upstream's parameter-free dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class ReferenceKVCache:
    """The reference image's keys and values per reader block, projected once per set of banks.

    The banks are fixed for a whole clip while the UNet runs every denoising step on them, so projecting the
    reference tokens with `to_k` / `to_v` at each step repeats the same work. An entry is reused only for the very
    bank tensor it was projected from (the next clip's banks are new tensors, so they are projected afresh), and only
    without autograd (training sends gradients through the banks). One cache serves a whole video: each block keeps
    the entry of the latest banks only.
    """

    def __init__(self):
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def is_current(self, entry: tuple, bank: torch.Tensor) -> bool:
        return entry[0] is bank

    def projected(self, key: str, bank: torch.Tensor, project: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        if torch.is_grad_enabled():
            return project()
        entry = self.entries.get(key)
        if entry is None or not self.is_current(entry, bank):
            entry = (bank, *project())
            self.entries[key] = entry
        return entry[1], entry[2]


@dataclass
class ReferenceRead:
    """What one reader block takes from its ReferenceNet twin for the current clip.

    `bank` is the writer's `norm1` output for the reference batch `[(b s), L, C]`, s = 1 + motion frames per CFG
    half (image 0 of each half is the reference, the rest are motion frames); `uncond_plain` says the first half of
    the frame batch is CFG's unconditional half, which attends to itself only. `kv_cache` (with `key`, the block's
    bank name) keeps the reference keys / values across denoising steps; None projects them at every call.
    """
    bank: torch.Tensor
    uncond_plain: bool
    kv_cache: Optional[ReferenceKVCache] = None
    key: str = ""


class ReferenceTransformerBlock(nn.Module):
    """Hallo's `TemporalBasicTransformerBlock` as its reference-attention reader runs it.

    Self-attention keys/values are the frame's own tokens followed by the reference image's tokens; cross-attention
    to the face-identity tokens; GEGLU feed-forward. Returns the motion-frame features for the motion module too.
    """

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def reference_keys_values(self, bank: torch.Tensor, batch: int, dtype: torch.dtype):
        """Keys and values of each batch item's reference image (image 0 of its bank rows) -> 2 x [b, L, inner]."""
        ref = bank.to(dtype).unflatten(0, (batch, -1))[:, 0]
        return self.attn1.to_k(ref), self.attn1.to_v(ref)

    def self_attention(self, x: torch.Tensor, read: ReferenceRead, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        batch = n // frames
        bank = read.bank.to(x.dtype).unflatten(0, (batch, -1))  # [b, s, L, C]
        attn = self.attn1
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        # quirk: with CFG the unconditional half uses plain self-attention, only the cond half sees the reference
        first = n // 2 if read.uncond_plain else 0
        # quirk: Hallo tiles the halves' references frame-interleaved ([ref0, ref1, ref0, ...] over the (b f) rows),
        # so row k reads the reference of half k % b: with CFG the cond half's even frames see the reference image
        # the writer paired with the uncond face tokens. Each reference is projected once, then shared by its rows.
        rows = torch.arange(first, n, device=x.device) % batch
        if read.kv_cache is None:
            ref_k, ref_v = self.reference_keys_values(read.bank, batch, x.dtype)
        else:
            ref_k, ref_v = read.kv_cache.projected(
                read.key, read.bank, lambda: self.reference_keys_values(read.bank, batch, x.dtype))
        k_ref = torch.cat([k[first:], ref_k[rows]], dim=1)
        v_ref = torch.cat([v[first:], ref_v[rows]], dim=1)
        out = attn.attend(q[first:], k_ref, v_ref)
        if first:
            out = torch.cat([attn.attend(q[:first], k[:first], v[:first]), out])
        return out, bank[:, 1:]

    def forward(self, h: torch.Tensor, context: torch.Tensor, read: Optional[ReferenceRead], frames: int):
        x = self.norm1(h)
        if read is None:
            h = self.attn1(x) + h
            motion = None
        else:
            out, motion = self.self_attention(x, read, frames)
            h = out + h
        h = self.attn2(self.norm2(h), context) + h
        h = self.ff(self.norm3(h)) + h
        return h, motion


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return tokens.transpose(1, 2).unflatten(2, (height, width))


class ImageTransformer(nn.Module):
    """Transformer3DModel of the `attentions.*` slots: GroupNorm -> 1x1 conv in -> reference block -> 1x1 conv out."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int = 32):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([ReferenceTransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.bank_key = ""  # this block's name in the ReferenceNet; set by the UNet

    def forward(self, x: torch.Tensor, context: torch.Tensor, bank: Optional[torch.Tensor], frames: int,
                uncond_plain: bool = False, kv_cache: Optional[ReferenceKVCache] = None):
        """x [(b f), C, H, W], context [(b f), T, D], bank: this block's ReferenceNet features (see ReferenceRead) or
        None (no reference) -> (x', motion-frame features [b, M, H*W, C] or None)."""
        _, _, height, width = x.shape
        h = _tokens(self.proj_in(self.norm(x)))
        read = None if bank is None else ReferenceRead(bank, uncond_plain, kv_cache, self.bank_key)
        h, motion = self.transformer_blocks[0](h, context, read, frames)
        return self.proj_out(_map(h, height, width)) + x, motion


class AudioTransformerBlock(nn.Module):
    """Hallo's `AudioTemporalBasicTransformerBlock`: self-attention, then three cross-attentions to the frame's
    audio tokens (`attn2_0` full/pose, `attn2_1` face, `attn2_2` lip), each weighted by its region mask and a 1x1
    `zero_conv_*`, summed with `motion_scale` weights; GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, audio_dim: int):
        super().__init__()
        self.zero_conv_full = nn.Conv2d(dim, dim, 1)
        self.zero_conv_face = nn.Conv2d(dim, dim, 1)
        self.zero_conv_lip = nn.Conv2d(dim, dim, 1)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2_0 = Attention(dim, heads, dim // heads, audio_dim)
        self.attn2_1 = Attention(dim, heads, dim // heads, audio_dim)
        self.attn2_2 = Attention(dim, heads, dim // heads, audio_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, h: torch.Tensor, audio: torch.Tensor, masks: Sequence[torch.Tensor],
                motion_scale: Sequence[float]) -> torch.Tensor:
        h = self.attn1(self.norm1(h)) + h
        x = self.norm2(h)
        branches = zip((self.attn2_0, self.attn2_1, self.attn2_2),
                       (self.zero_conv_full, self.zero_conv_face, self.zero_conv_lip), masks, motion_scale)
        for attn, conv, mask, scale in branches:
            out = attn(x, audio) * mask[:, :, None]
            # a 1x1 conv over the token map is a per-token linear map
            h = h + scale * F.linear(out, conv.weight.flatten(1), conv.bias)
        return self.ff(self.norm3(h)) + h


class AudioTransformer(nn.Module):
    """Transformer3DModel of the `audio_modules.*` slots. Its inner width is the *layer input* channels (Hallo's
    `in_channels // heads` head size), not the block width: e.g. 320 inside a 640-channel block."""

    def __init__(self, channels: int, inner: int, heads: int, audio_dim: int, level: int, groups: int = 32):
        super().__init__()
        self.level = level  # which mask resolution this block uses (0 = largest)
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([AudioTransformerBlock(inner, heads, audio_dim)])
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, audio: torch.Tensor, masks: Sequence[Sequence[torch.Tensor]],
                motion_scale: Sequence[float]) -> torch.Tensor:
        """x [(b f), C, H, W]; audio [(b f), tokens, D]; masks (full, face, lip) lists by level, [(b f), H*W]."""
        _, _, height, width = x.shape
        h = _tokens(self.proj_in(self.norm(x)))
        level_masks = [region[self.level] for region in masks]
        h = self.transformer_blocks[0](h, audio, level_masks, motion_scale)
        return self.proj_out(_map(h, height, width)) + x

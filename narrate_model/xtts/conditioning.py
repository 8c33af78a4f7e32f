"""Voice conditioning for the GPT: 80-band cloning mels -> conditioning encoder -> perceiver resampler -> 32 latents.

State-dict keys equal the checkpoint's after `gpt.conditioning_encoder.` / `gpt.conditioning_perceiver.`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NarrateInputError
from .config import XttsConfig
from .mel import CLONING_SAMPLE_RATE, cloning_mel

MIN_CHUNK_S = 0.33  # upstream skips shorter chunks


def _group_count(channels: int) -> int:
    """Upstream's `normalization()` rule: 32 groups (8 for <= 16 channels, 16 for <= 64), halved until it divides."""
    groups = 8 if channels <= 16 else 16 if channels <= 64 else 32
    while channels % groups:
        groups //= 2
    return groups


class AttentionBlock(nn.Module):
    """GroupNorm -> multi-head self-attention over time -> 1x1 projection, added to the *normalised* input
    (upstream quirk: the residual is the GroupNorm output, not the block input)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_group_count(channels), channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        x = self.norm(x.float()).to(x.dtype)  # upstream's GroupNorm32 normalises in float32
        # legacy QKV layout: channels are grouped per head as [q | k | v], each c / heads wide
        q, k, v = self.qkv(x).view(b, self.heads, 3, c // self.heads, t).transpose(-1, -2).unbind(2)
        h = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head dim), as (q*s^.5)(k*s^.5)
        return x + self.proj_out(h.transpose(-1, -2).reshape(b, c, t))


class ConditioningEncoder(nn.Module):
    """Conv1d(80 -> C, k=1) then `cond_attn_blocks` attention blocks with the GPT's head count: [B,80,T] -> [B,C,T]."""

    def __init__(self, cfg: XttsConfig):
        super().__init__()
        dim = cfg.gpt_n_model_channels
        self.init = nn.Conv1d(cfg.cond_spec_dim, dim, kernel_size=1)
        self.attn = nn.Sequential(*[AttentionBlock(dim, cfg.cond_num_attn_heads) for _ in range(cfg.cond_attn_blocks)])

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.attn(self.init(mel))


class PerceiverAttention(nn.Module):
    """Latents attend to [latents | context] (bias-free projections, no pre-norm)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = latents.shape
        kv_input = torch.cat((latents, context), dim=1)  # upstream: cross_attn_include_queries=True
        q = self.to_q(latents).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = (t.view(b, kv_input.shape[1], self.heads, -1).transpose(1, 2)
                for t in self.to_kv(kv_input).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class PerceiverResampler(nn.Module):
    """Compress [B,T,C] encoder frames into `perceiver_num_latents` latents [B,32,C]."""

    def __init__(self, cfg: XttsConfig):
        super().__init__()
        dim = cfg.gpt_n_model_channels
        inner = cfg.perceiver_ff_inner
        self.latents = nn.Parameter(torch.zeros(cfg.perceiver_num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, cfg.perceiver_heads, cfg.perceiver_dim_head),
                nn.Sequential(nn.Linear(dim, inner * 2), GEGLU(), nn.Linear(inner, dim)),
            ])
            for _ in range(cfg.perceiver_depth)
        )
        self.norm = RMSNorm(dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(context.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(latents, context) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


def style_embedding(encoder: ConditioningEncoder, perceiver: PerceiverResampler, mel: torch.Tensor) -> torch.Tensor:
    """Upstream `GPT.get_style_emb`: [B,80,T] normalised mels -> [B,C,32]."""
    param = encoder.init.weight
    h = encoder(mel.to(device=param.device, dtype=param.dtype))
    return perceiver(h.transpose(1, 2)).transpose(1, 2)


def _modules(gpt_or_pair):
    if isinstance(gpt_or_pair, (tuple, list)):
        return gpt_or_pair
    return gpt_or_pair.conditioning_encoder, gpt_or_pair.conditioning_perceiver


@torch.no_grad()
def gpt_cond_latents(gpt_or_pair, wav_22050: torch.Tensor, mel_stats: torch.Tensor, length_s: float = 30,
                     chunk_s: float = 4) -> torch.Tensor:
    """Upstream `get_gpt_cond_latents` (perceiver path): [B,T] (or [T]) at 22.05 kHz -> [B,32,C].

    Keeps the first `length_s` seconds (all if <= 0), cuts it into `chunk_s` chunks, skips chunks under 0.33 s, and
    averages the chunks' style embeddings. Equal-length chunks run as one batch.
    """
    if chunk_s <= 0:
        raise ValueError(f"chunk_s must be positive, got {chunk_s}")
    encoder, perceiver = _modules(gpt_or_pair)
    wav = wav_22050.reshape(1, -1) if wav_22050.dim() == 1 else wav_22050
    if length_s > 0:
        wav = wav[:, :int(CLONING_SAMPLE_RATE * length_s)]
    chunk = int(CLONING_SAMPLE_RATE * chunk_s)
    batch, total = wav.shape
    n_full = total // chunk
    groups = []
    if n_full:  # [B, n*chunk] -> [n*B, chunk], chunk-major so the result views back as [n, B, ...]
        full = wav[:, :n_full * chunk].reshape(batch, n_full, chunk).transpose(0, 1).reshape(n_full * batch, chunk)
        groups.append(full)
    tail = wav[:, n_full * chunk:]
    if tail.shape[1] >= CLONING_SAMPLE_RATE * MIN_CHUNK_S:
        groups.append(tail)
    if not groups:
        raise NarrateInputError("voice", f"the voice clip is {total / CLONING_SAMPLE_RATE:.2f} s long; it needs at "
                                         f"least {MIN_CHUNK_S} s of speech (3-10 s works best).")
    n_latents, dim = perceiver.latents.shape
    embs = [style_embedding(encoder, perceiver, cloning_mel(g, mel_stats)).view(-1, batch, dim, n_latents)
            for g in groups]
    return torch.cat(embs).mean(dim=0).transpose(1, 2)

"""XTTS-v2's HiFi-GAN decoder: GPT latents (22.05 kHz code rate) + speaker embedding -> 24 kHz waveform.

State-dict keys equal the checkpoint's after `hifigan_decoder.`: the transposed and residual convolutions carry
weight norm in torch's parametrization layout (`...parametrizations.weight.original0` = g, `original1` = v).
`fold_weight_norm()` replaces them by plain weights once loaded, so inference does not recompute g * v / |v|.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from .config import XttsConfig
from .speaker import SpeakerEncoder

LRELU_SLOPE = 0.1


def _same_padding(kernel: int, dilation: int) -> int:
    return (kernel * dilation - dilation) // 2


class ResBlock1(nn.Module):
    """Three dilated (convs1) + plain (convs2) conv pairs, each `x + conv2(lrelu(conv1(lrelu(x))))`."""

    def __init__(self, channels: int, kernel: int, dilations):
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d, padding=_same_padding(kernel, d)))
            for d in dilations)
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel, padding=_same_padding(kernel, 1)))
            for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class HifiganGenerator(nn.Module):
    """conv_pre (+ speaker cond) -> 4 x [lrelu -> upsample -> + speaker cond -> mean of MRF blocks] -> conv_post."""

    def __init__(self, cfg: XttsConfig):
        super().__init__()
        if cfg.resblock_type_decoder != "1":
            raise ValueError(f"XTTS-v2 uses HiFi-GAN resblock type '1', not {cfg.resblock_type_decoder!r}")
        ch = cfg.upsample_initial_channel_decoder
        kernels = cfg.resblock_kernel_sizes_decoder
        self.num_kernels = len(kernels)
        self.cond_in_each_up_layer = cfg.cond_d_vector_in_each_upsampling_layer
        self.conv_pre = nn.Conv1d(cfg.decoder_input_dim, ch, 7, padding=3)  # no weight norm in XTTS
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        self.conds = nn.ModuleList()
        for i, (rate, k) in enumerate(zip(cfg.upsample_rates_decoder, cfg.upsample_kernel_sizes_decoder)):
            c_in, c_out = ch // 2 ** i, ch // 2 ** (i + 1)
            self.ups.append(weight_norm(nn.ConvTranspose1d(c_in, c_out, k, rate, padding=(k - rate) // 2)))
            self.resblocks.extend(ResBlock1(c_out, kk, d)
                                  for kk, d in zip(kernels, cfg.resblock_dilation_sizes_decoder))
            if self.cond_in_each_up_layer:
                self.conds.append(nn.Conv1d(cfg.d_vector_dim, c_out, 1))
        self.conv_post = nn.Conv1d(c_out, 1, 7, padding=3, bias=False)  # no weight norm, no bias in XTTS
        self.cond_layer = nn.Conv1d(cfg.d_vector_dim, ch, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        o = self.conv_pre(x) + self.cond_layer(g)
        for i, up in enumerate(self.ups):
            o = up(F.leaky_relu(o, LRELU_SLOPE))
            if self.cond_in_each_up_layer:
                o = o + self.conds[i](g)
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            z = blocks[0](o)
            for block in blocks[1:]:
                z = z + block(o)
            o = z / self.num_kernels
        o = self.conv_post(F.leaky_relu(o))  # upstream quirk: default slope 0.01 here, not 0.1
        return torch.tanh(o)


class HifiDecoder(nn.Module):
    def __init__(self, cfg: XttsConfig):
        super().__init__()
        self.input_sample_rate = cfg.input_sample_rate
        self.output_sample_rate = cfg.output_sample_rate
        self.code_upsampling = cfg.gpt_code_stride_len / cfg.output_hop_length
        self.waveform_decoder = HifiganGenerator(cfg)
        self.speaker_encoder = SpeakerEncoder(cfg)

    def forward(self, latents: torch.Tensor, speaker_embedding: torch.Tensor) -> torch.Tensor:
        """latents [B,T,C] (one per GPT code), speaker_embedding [B or 1, 512, 1] -> wav [B,1,T'] at 24 kHz,
        T' = floor(floor(4T) * 24000/22050) * 256."""
        # upstream interpolates with scale_factor (not size): the sampling grid follows the factor, keep that form
        z = F.interpolate(latents.transpose(1, 2), scale_factor=[self.code_upsampling], mode="linear")
        if self.output_sample_rate != self.input_sample_rate:
            z = F.interpolate(z, scale_factor=[self.output_sample_rate / self.input_sample_rate], mode="linear")
        # upstream squeezes the batch axis away for batch 1 and lets cond_layer(g) broadcast it back: same numbers
        g = speaker_embedding.to(device=z.device, dtype=z.dtype)
        return self.waveform_decoder(z, g)

    def fold_weight_norm(self) -> None:
        """Bake g * v / |v| into plain `weight` tensors (after loading; state-dict keys become `...weight`)."""
        for module in self.waveform_decoder.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

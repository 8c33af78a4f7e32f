"""The speaker encoder of XTTS-v2's vocoder: 16 kHz waveform -> 512-d unit-norm speaker embedding.

A ResNet-34-like network with squeeze-excitation blocks over 64 log-mels, attentive statistics pooling (ASP) and a
linear projection. State-dict keys equal the checkpoint's after `hifigan_decoder.speaker_encoder.`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import XttsConfig
from .mel import speaker_mel


class PreEmphasis(nn.Module):
    """y[t] = x[t] - c * x[t-1], with the first sample reflected (buffer `filter` = [-c, 1])."""

    def __init__(self, coefficient: float):
        super().__init__()
        self.register_buffer("filter", torch.tensor([[[-coefficient, 1.0]]]))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = F.pad(wav.unsqueeze(1), (1, 0), mode="reflect")
        return F.conv1d(x, self.filter.to(x.dtype)).squeeze(1)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class SEBasicBlock(nn.Module):
    """conv3x3 -> ReLU -> BN -> conv3x3 -> BN -> SE, + (downsampled) input, ReLU (upstream's ReLU-before-BN order)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(F.relu(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class SpeakerEncoder(nn.Module):
    def __init__(self, cfg: XttsConfig):
        super().__init__()
        audio = cfg.speaker_encoder_audio_config
        filters, blocks = cfg.speaker_encoder_num_filters, cfg.speaker_encoder_layers
        self.sample_rate = audio["sample_rate"]
        self.torch_spec = nn.Sequential(PreEmphasis(audio["preemphasis"]), speaker_mel(audio))
        self.conv1 = nn.Conv2d(1, filters[0], kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(filters[0])
        in_ch = filters[0]
        for i, (out_ch, n) in enumerate(zip(filters, blocks)):
            stride = 1 if i == 0 else 2
            layer = [SEBasicBlock(in_ch, out_ch, stride)] + [SEBasicBlock(out_ch, out_ch) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            in_ch = out_ch
        pooled = filters[-1] * (cfg.speaker_encoder_input_dim // 8)
        self.attention = nn.Sequential(nn.Conv1d(pooled, 128, 1), nn.ReLU(), nn.BatchNorm1d(128),
                                       nn.Conv1d(128, pooled, 1), nn.Softmax(dim=2))
        self.fc = nn.Linear(pooled * 2, cfg.speaker_encoder_proj_dim)

    def log_mel(self, wav_16k: torch.Tensor) -> torch.Tensor:
        """[B,T] -> instance-normalised log mels [B,64,frames], computed in float32."""
        x = self.torch_spec(wav_16k.float())
        return F.instance_norm(torch.log(x + 1e-6), eps=1e-5)

    def forward(self, wav_16k: torch.Tensor) -> torch.Tensor:
        """[B,T] (or [B,1,T]) waveform at 16 kHz -> [B,512] L2-normalised embedding. The input is not modified
        (upstream squeezes it in place)."""
        if wav_16k.dim() == 3:
            wav_16k = wav_16k.squeeze(1)
        x = self.log_mel(wav_16k).unsqueeze(1).to(self.conv1.weight.dtype)
        x = self.bn1(F.relu(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        w = self.attention(x)
        mu = torch.sum(x * w, dim=2)
        sg = torch.sqrt((torch.sum(x * x * w, dim=2) - mu * mu).clamp(min=1e-5))
        x = self.fc(torch.cat((mu, sg), dim=1))
        return F.normalize(x, p=2, dim=1)

"""XTTS's discrete VAE: 22.05 kHz speech -> 80-band log-mels -> codebook indices, the GPT's training targets.

Coqui's GPTTrainer turns every training clip into DVAE codes (`dvae.pth`, a training-only file of the XTTS-v2
repository) with the DiscreteVAE of tortoise built as `channels=80, positional_dims=1, num_tokens=1024,
codebook_dim=512, hidden_dim=512, num_resnet_blocks=3, kernel_size=3, num_layers=2, use_transposed_convs=False`.
The mel it encodes is tortoise's `TorchMelSpectrogram` (n_fft 1024, hop 256, window 1024, 80 slaney-normalised
bands, 0-8 kHz, power 2), log(clamp(mel, 1e-5)) divided by the per-band norms of `mel_stats.pth` (the same
80-vector model.pth carries as `mel_stats`).

Only the encoder and the codebook produce codes; the decoder and the training-state buffers (the codebook's EMA
statistics, the discretization-loss accumulator) exist so the module holds exactly the keys of `dvae.pth`.
Codes: 4x fewer than mel frames (two stride-2 convolutions), one per 1024 samples at 22.05 kHz.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..errors import CheckpointError
from ..state_dict import key_mismatch, read_checkpoint
from .mel import CLONING_SAMPLE_RATE, mel_spectrogram

STRIDE = 2
# Buffers that only training the DVAE itself updates; a file without them still encodes (upstream loads non-strict).
TRAINING_STATE = ("codebook.cluster_size", "codebook.embed_avg", "discrete_loss.accumulator",
                  "discrete_loss.accumulator_index", "discrete_loss.accumulator_filled")


@dataclass(frozen=True)
class DVAEConfig:
    """Defaults = the released `dvae.pth` of coqui/XTTS-v2."""
    codebook_dim: int = 512
    hidden_dim: int = 512
    num_resnet_blocks: int = 3
    channels: int = 80
    num_tokens: int = 1024
    kernel_size: int = 3
    num_layers: int = 2
    loss_averaging_steps: int = 100  # rows of the discretization-loss accumulator

    @property
    def innermost_dim(self) -> int:
        return self.hidden_dim * 2 ** (self.num_layers - 1)


class ResBlock(nn.Module):
    """conv3 -> ReLU -> conv3 -> ReLU -> conv1, plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(channels, channels, 3, padding=1), nn.ReLU(),
                                 nn.Conv1d(channels, channels, 3, padding=1), nn.ReLU(),
                                 nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + x


class UpsampledConv(nn.Module):
    """Nearest-neighbour x2 upsampling then a convolution (the DVAE's `use_transposed_convs=False` decoder)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, padding: int):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=STRIDE, mode="nearest"))


class Codebook(nn.Module):
    """The vector quantiser's state: `embed` [dim, tokens] (columns are code vectors) and its EMA statistics."""

    def __init__(self, dim: int, tokens: int):
        super().__init__()
        self.register_buffer("embed", torch.zeros(dim, tokens))
        self.register_buffer("cluster_size", torch.zeros(tokens))
        self.register_buffer("embed_avg", torch.zeros(dim, tokens))

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the closest code (squared Euclidean distance) for each row of [N, dim]; the distance is expanded
        as upstream computes it, |x|^2 - 2 x.e + |e|^2, so near-ties resolve to the same code."""
        dist = vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ self.embed + self.embed.pow(2).sum(0, keepdim=True)
        return dist.neg().max(1).indices


class DiscretizationLossState(nn.Module):
    """Buffers of the DVAE's discretization loss (a running code histogram); unused when encoding."""

    def __init__(self, tokens: int, steps: int):
        super().__init__()
        self.register_buffer("accumulator_index", torch.zeros(1, dtype=torch.long))
        self.register_buffer("accumulator_filled", torch.zeros(1, dtype=torch.long))
        self.register_buffer("accumulator", torch.zeros(steps, tokens))


class DiscreteVAE(nn.Module):
    def __init__(self, config: DVAEConfig = DVAEConfig()):
        super().__init__()
        if config.num_layers < 1:
            raise ValueError("DVAEConfig.num_layers must be at least 1")
        self.config = config
        pad = (config.kernel_size - 1) // 2
        widths = [config.hidden_dim * 2 ** i for i in range(config.num_layers)]
        inner = config.innermost_dim
        has_res = config.num_resnet_blocks > 0

        encoder: list[nn.Module] = []
        for c_in, c_out in zip([config.channels] + widths[:-1], widths):
            encoder.append(nn.Sequential(nn.Conv1d(c_in, c_out, config.kernel_size, stride=STRIDE, padding=pad),
                                         nn.ReLU()))
        encoder += [ResBlock(inner) for _ in range(config.num_resnet_blocks)]
        encoder.append(nn.Conv1d(inner, config.codebook_dim, 1))

        decoder: list[nn.Module] = []
        if has_res:
            decoder.append(nn.Conv1d(config.codebook_dim, inner, 1))
            decoder += [ResBlock(inner) for _ in range(config.num_resnet_blocks)]
        up_widths = list(reversed(widths))
        for c_in, c_out in zip([inner if has_res else config.codebook_dim] + up_widths[:-1], up_widths):
            decoder.append(nn.Sequential(UpsampledConv(c_in, c_out, config.kernel_size, pad), nn.ReLU()))
        decoder.append(nn.Conv1d(widths[0], config.channels, 1))

        self.discrete_loss = DiscretizationLossState(config.num_tokens, config.loss_averaging_steps)
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)
        self.codebook = Codebook(config.codebook_dim, config.num_tokens)

    @torch.no_grad()
    def get_codebook_indices(self, mel: torch.Tensor) -> torch.Tensor:
        """Normalised DVAE mels [B, 80, F] -> codes [B, ceil(F / 4)] (int64)."""
        param = self.codebook.embed
        h = self.encoder(mel.to(device=param.device, dtype=param.dtype)).transpose(1, 2)  # [B, N, dim]
        return self.codebook.nearest(h.reshape(-1, h.shape[-1])).view(h.shape[:2])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, N] -> reconstructed normalised mels [B, 80, 4N] (for inspecting what the codes keep)."""
        x = nn.functional.embedding(codes, self.codebook.embed.t()).transpose(1, 2)
        return self.decoder(x)


# ------------------------------------------------------------------------------------------------------------- mel
@lru_cache(maxsize=4)
def _dvae_mel_module(device: torch.device) -> torch.nn.Module:
    return mel_spectrogram(CLONING_SAMPLE_RATE, n_fft=1024, win_length=1024, hop_length=256, n_mels=80,
                          f_min=0.0, f_max=8000.0, norm="slaney").to(device)


def dvae_mel(wav_22050: torch.Tensor, mel_norms: torch.Tensor) -> torch.Tensor:
    """Tortoise's TorchMelSpectrogram at 22.05 kHz: [B, T] (or [B, 1, T]) -> [B, 80, T // 256 + 1], float32."""
    wav = wav_22050.float()
    if wav.dim() == 3:
        wav = wav.squeeze(1)
    mel = _dvae_mel_module(wav.device)(wav)
    mel = torch.log(torch.clamp(mel, min=1e-5))
    return mel / mel_norms.to(device=mel.device, dtype=mel.dtype)[None, :, None]


def speech_codes(dvae: DiscreteVAE, wav_22050: torch.Tensor, mel_norms: torch.Tensor) -> torch.Tensor:
    """22.05 kHz speech [B, T] -> DVAE codes [B, N] (int64), what GPTTrainer feeds the GPT as audio targets."""
    return dvae.get_codebook_indices(dvae_mel(wav_22050, mel_norms))


# ---------------------------------------------------------------------------------------------------------- loading
DVAE_HINT = "use dvae.pth of the coqui/XTTS-v2 repository, placed in models/narrate/xtts/XTTS-v2/"


def config_from_state_dict(state: dict[str, torch.Tensor]) -> DVAEConfig:
    """The DVAE's sizes read off its weights (so the real file and a reduced one both load)."""
    first = state.get("encoder.0.0.weight")
    embed = state.get("codebook.embed")
    if first is None or embed is None or first.dim() != 3 or embed.dim() != 2:
        raise CheckpointError("not a DVAE checkpoint: it lacks encoder.0.0.weight [hidden, 80, k] or codebook.embed "
                              f"[dim, tokens]; {DVAE_HINT}")
    num_layers = sum(1 for i in range(len(state)) if f"encoder.{i}.0.weight" in state)
    res_blocks = sum(1 for k in state if k.startswith("encoder.") and k.endswith(".net.0.weight"))
    accumulator = state.get("discrete_loss.accumulator")
    return DVAEConfig(codebook_dim=embed.shape[0], hidden_dim=first.shape[0], num_resnet_blocks=res_blocks,
                      channels=first.shape[1], num_tokens=embed.shape[1], kernel_size=first.shape[2],
                      num_layers=num_layers,
                      loss_averaging_steps=accumulator.shape[0] if accumulator is not None else 100)


def load_dvae(path: Union[str, Path], device="cpu") -> DiscreteVAE:
    """`dvae.pth` (read weights-only) or a safetensors copy -> DiscreteVAE in eval mode, frozen.

    Every weight the module has must be in the file with its shape (a trainer checkpoint's `dvae.` prefix is
    stripped); the training-only buffers may be absent and then start at zero.
    """
    path = Path(path)
    try:
        state, _ = read_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {DVAE_HINT}") from exc
    if not any(k.startswith("encoder.") for k in state) and any(k.startswith("dvae.encoder.") for k in state):
        state = {k[len("dvae."):]: v for k, v in state.items() if k.startswith("dvae.")}
    model = DiscreteVAE(config_from_state_dict(state))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    required = {k: shape for k, shape in expected.items() if k in state or k not in TRAINING_STATE}
    problems = key_mismatch(required, state)
    if problems:
        raise CheckpointError(f"{path.name} does not match the DVAE its shapes describe: {problems}; {DVAE_HINT}")
    model.load_state_dict(state, strict=False)  # only the absent training-state buffers are left at zero
    return model.to(device).eval().requires_grad_(False)


def load_mel_stats(path: Union[str, Path]) -> torch.Tensor:
    """The 80 per-band mel norms: `mel_stats.pth` (a bare tensor, read weights-only), a safetensors file holding one
    80-vector, or any XTTS checkpoint with a `mel_stats` entry (model.pth carries the same vector)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"mel norms file not found: {path}; use mel_stats.pth from coqui/XTTS-v2 "
                              "(models/narrate/xtts/XTTS-v2/)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        obj = load_file(str(path))
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - e.g. model.pth with its pickled training config: the pack's reader
            obj = read_checkpoint(path)[0]  # loads such classes as inert stand-ins (or raises CheckpointError)
    if isinstance(obj, dict):
        obj = obj.get("model", obj)
        obj = obj.get("mel_stats", obj.get("xtts.mel_stats", next(iter(obj.values())) if len(obj) == 1 else None))
    if not torch.is_tensor(obj) or obj.numel() != 80:
        raise CheckpointError(f"{path.name} holds no 80-band mel norm vector (mel_stats.pth of coqui/XTTS-v2, or a "
                              "checkpoint with a 'mel_stats' entry)")
    return obj.reshape(80).float()

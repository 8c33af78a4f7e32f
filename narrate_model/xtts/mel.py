"""Audio front ends of XTTS-v2 in plain torch: resampling and the two mel spectrograms.

* the *cloning* mel (22.05 kHz, 80 log-mels divided by the checkpoint's `mel_stats`) feeds the GPT conditioning
  encoder;
* the *speaker* mel (16 kHz, 64 mels; pre-emphasis, log and instance norm live in the speaker encoder) feeds the
  ResNet speaker encoder. Its window and filterbank are buffers of the checkpoint, so they load from it.

Both reproduce torchaudio's `MelSpectrogram` as upstream configures it (periodic window, centred frames with reflect
padding, power 2, HTK mel scale), so torchaudio is not needed at run time (resampling: narrate_model.resample).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

CLONING_SAMPLE_RATE = 22050


# ----------------------------------------------------------------------------------------------------------- mel scale
def _hz_to_mel_htk(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int,
                   norm: str | None = None) -> torch.Tensor:
    """Triangular HTK-scale mel filterbank [n_freqs, n_mels] (torchaudio.functional.melscale_fbanks, float32)."""
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_pts = torch.linspace(_hz_to_mel_htk(f_min), _hz_to_mel_htk(f_max), n_mels + 2)
    f_pts = 700.0 * (10.0 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = torch.clamp(torch.minimum(down, up), min=0.0)
    if norm == "slaney":  # area normalisation: divide each triangle by its width
        fb = fb * (2.0 / (f_pts[2:n_mels + 2] - f_pts[:n_mels]))[None, :]
    elif norm is not None:
        raise ValueError(f"norm must be None or 'slaney', not {norm!r}")
    return fb


class _Spectrogram(nn.Module):
    """Power spectrogram; holds the analysis window as buffer `window` (torchaudio's layout)."""

    def __init__(self, n_fft: int, win_length: int, hop_length: int, window: torch.Tensor):
        super().__init__()
        self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
        self.register_buffer("window", window)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        shape = wav.shape
        spec = torch.stft(wav.reshape(-1, shape[-1]), self.n_fft, self.hop_length, self.win_length,
                          self.window.to(wav.dtype),
                          center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
        spec = spec.abs().pow(2.0)
        return spec.reshape(*shape[:-1], *spec.shape[-2:])


class _MelScale(nn.Module):
    """Project a power spectrogram onto mel bands; holds the filterbank as buffer `fb` [n_freqs, n_mels]."""

    def __init__(self, fb: torch.Tensor):
        super().__init__()
        self.register_buffer("fb", fb)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return torch.matmul(spec.transpose(-1, -2), self.fb.to(spec.dtype)).transpose(-1, -2)


class MelSpectrogram(nn.Module):
    """torchaudio.transforms.MelSpectrogram's computation and state-dict layout (`spectrogram.window`,
    `mel_scale.fb`), for a periodic window, centred reflect-padded frames and power 2."""

    def __init__(self, sample_rate: int, n_fft: int, win_length: int, hop_length: int, n_mels: int,
                 f_min: float = 0.0, f_max: float | None = None, norm: str | None = None,
                 window_fn=torch.hann_window):
        super().__init__()
        f_max = float(sample_rate // 2) if f_max is None else f_max
        self.spectrogram = _Spectrogram(n_fft, win_length, hop_length, window_fn(win_length))
        self.mel_scale = _MelScale(mel_filterbank(n_fft // 2 + 1, f_min, f_max, n_mels, sample_rate, norm))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.mel_scale(self.spectrogram(wav))


# ------------------------------------------------------------------------------------------------------ cloning mel
@lru_cache(maxsize=4)
def _cloning_mel_module(device: torch.device) -> MelSpectrogram:
    return MelSpectrogram(CLONING_SAMPLE_RATE, n_fft=2048, win_length=1024, hop_length=256, n_mels=80,
                          f_min=0.0, f_max=8000.0, norm="slaney").to(device)


def cloning_mel(wav_22050: torch.Tensor, mel_stats: torch.Tensor) -> torch.Tensor:
    """Upstream `wav_to_mel_cloning` for the v2 (perceiver) path: [B, T] at 22.05 kHz -> [B, 80, frames], in float32.

    log(clamp(mel, 1e-5)) divided by the checkpoint's per-band `mel_stats` [80].
    """
    wav = wav_22050.float()
    mel = _cloning_mel_module(wav.device)(wav)
    mel = torch.log(torch.clamp(mel, min=1e-5))
    return mel / mel_stats.to(device=mel.device, dtype=mel.dtype)[None, :, None]


def speaker_mel(audio_config: dict) -> MelSpectrogram:
    """The speaker encoder's 16 kHz mel front end (Hamming window, no band normalisation, f_max = sr / 2)."""
    return MelSpectrogram(audio_config["sample_rate"], n_fft=audio_config["fft_size"],
                          win_length=audio_config["win_length"], hop_length=audio_config["hop_length"],
                          n_mels=audio_config["num_mels"], window_fn=torch.hamming_window)

"""Audio front ends of XTTS-v2: the two mel spectrograms, computed by torchaudio's `MelSpectrogram` as upstream
configures it (periodic window, centred reflect-padded frames, power 2, HTK mel scale).

* the *cloning* mel (22.05 kHz, 80 log-mels divided by the checkpoint's `mel_stats`) feeds the GPT conditioning
  encoder;
* the *speaker* mel (16 kHz, 64 mels; pre-emphasis, log and instance norm live in the speaker encoder) feeds the
  ResNet speaker encoder. Its window and filterbank are buffers of the checkpoint (`spectrogram.window`,
  `mel_scale.fb`, torchaudio's layout), so they load from it.

torchaudio is imported when a voice is encoded (ComfyUI requires it; resampling: narrate_model.resample).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

CLONING_SAMPLE_RATE = 22050


@lru_cache(maxsize=1)
def _mel_class() -> type[nn.Module]:
    from torchaudio.transforms import MelSpectrogram

    class FloatMel(MelSpectrogram):
        """torchaudio's MelSpectrogram, computed in the input's dtype (float32) even after the model was cast to
        half: the window and filterbank buffers follow the input, as the speaker encoder feeds it float32."""

        def forward(self, wav: torch.Tensor) -> torch.Tensor:
            if self.spectrogram.window.dtype != wav.dtype:
                self.to(wav.dtype)
            return super().forward(wav)

    return FloatMel


def mel_spectrogram(sample_rate: int, **kwargs) -> nn.Module:
    """torchaudio's MelSpectrogram (keyword arguments as torchaudio's), computed in the input's dtype: the one mel
    front end of the pack (cloning, speaker, DVAE and training-loss mels)."""
    return _mel_class()(sample_rate, **kwargs)


@lru_cache(maxsize=4)
def _cloning_mel_module(device: torch.device) -> nn.Module:
    return mel_spectrogram(CLONING_SAMPLE_RATE, n_fft=2048, win_length=1024, hop_length=256, n_mels=80,
                          f_min=0.0, f_max=8000.0, norm="slaney").to(device)


def cloning_mel(wav_22050: torch.Tensor, mel_stats: torch.Tensor) -> torch.Tensor:
    """Upstream `wav_to_mel_cloning` for the v2 (perceiver) path: [B, T] at 22.05 kHz -> [B, 80, frames], in float32.

    log(clamp(mel, 1e-5)) divided by the checkpoint's per-band `mel_stats` [80].
    """
    wav = wav_22050.float()
    mel = _cloning_mel_module(wav.device)(wav)
    mel = torch.log(torch.clamp(mel, min=1e-5))
    return mel / mel_stats.to(device=mel.device, dtype=mel.dtype)[None, :, None]


def speaker_mel(audio_config: dict) -> nn.Module:
    """The speaker encoder's 16 kHz mel front end (Hamming window, no band normalisation, f_max = sr / 2).

    Built on the CPU even when the model is laid out on the meta device: torchaudio checks the filterbank's values
    while building it. The checkpoint's buffers replace these when it loads."""
    with torch.device("cpu"):
        return mel_spectrogram(audio_config["sample_rate"], n_fft=audio_config["fft_size"],
                              win_length=audio_config["win_length"], hop_length=audio_config["hop_length"],
                              n_mels=audio_config["num_mels"], window_fn=torch.hamming_window)

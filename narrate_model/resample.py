"""Resampling for every stage (voice profile 22.05 / 16 kHz, speech features 16 kHz): torchaudio's
`functional.resample`, which upstream uses. ComfyUI lists torchaudio in its requirements but runs without it on
platforms where it cannot be installed (ComfyUI PR #7987), so when the package is *absent* we use our copy of the same
windowed-sinc algorithm (same kernel, same output length; tests/test_xtts_voice.py checks them equal). A torchaudio
that is installed but broken raises: it is not silently replaced."""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, lowpass_filter_width: int, rolloff: float, dtype: torch.dtype):
    """Windowed-sinc (squared-cosine window) polyphase kernel [new, 1, 2*width + orig], torchaudio's recipe."""
    cutoff = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=dtype)[None, None] / orig
    t = (torch.arange(0, -new, -1, dtype=dtype)[:, None, None] / new + taps) * cutoff
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones((), dtype=dtype), t.sin() / t)
    return sinc * (window * (cutoff / orig)), width


def resample_sinc(wav: torch.Tensor, orig_sr: int, new_sr: int, lowpass_filter_width: int = 6,
                  rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling along the last axis, numerically the algorithm of torchaudio.functional.resample."""
    if orig_sr == new_sr:
        return wav
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, width = _sinc_kernel(orig, new, lowpass_filter_width, rolloff, wav.dtype)
    shape = wav.shape
    flat = F.pad(wav.reshape(-1, shape[-1]), (width, width + orig))
    out = F.conv1d(flat[:, None], kernel.to(wav.device), stride=orig)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    target = math.ceil(new * shape[-1] / orig)
    return out[:, :target].reshape(*shape[:-1], -1)


def _torchaudio_resample():
    """torchaudio's resample, or None when torchaudio is not installed."""
    try:
        import torchaudio  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name != "torchaudio":
            raise  # torchaudio is there but something it needs is missing: a broken install, shown as such
        return None
    from torchaudio.functional import resample

    return resample


def resample(wav: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample along the last axis like upstream (torchaudio defaults: sinc_interp_hann, width 6, rolloff 0.99)."""
    if orig_sr == new_sr:
        return wav
    ta_resample = _torchaudio_resample()
    if ta_resample is not None:
        return ta_resample(wav, int(orig_sr), int(new_sr))
    return resample_sinc(wav, orig_sr, new_sr)

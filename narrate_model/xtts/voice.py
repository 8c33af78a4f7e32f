"""The voice profile: what XTTS-v2 needs to speak in a voice, computed once from one or more reference clips.

As upstream's `get_conditioning_latents`: each clip is mixed to mono, resampled to 22.05 kHz, clipped to [-1, 1] and
cut to `max_ref_s`; its speaker embedding comes from the 22.05 kHz signal resampled to 16 kHz, and the embeddings of
several clips are averaged (not re-normalised); the GPT conditioning latents come from the clips concatenated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import NarrateInputError
from ..resample import resample
from .conditioning import gpt_cond_latents
from .mel import CLONING_SAMPLE_RATE

MIN_SECONDS = 1.0
RECOMMENDED_SECONDS = 3.0
SILENCE_PEAK = 1e-3  # -60 dBFS
SILENCE_RMS = 1e-4  # -80 dBFS


@dataclass
class VoiceProfile:
    gpt_cond_latent: torch.Tensor  # [1, 32, C]
    speaker_embedding: torch.Tensor  # [1, 512, 1]
    seconds: float  # reference audio used, all clips together
    warnings: list[str] = field(default_factory=list)


def _mono_22050(waveform: torch.Tensor, sample_rate: int, index: int) -> torch.Tensor:
    """[C,T] or [T] (or ComfyUI's [1,C,T]) at any rate -> [1,T'] mono float32 at 22.05 kHz in [-1, 1]."""
    wav = torch.as_tensor(waveform)
    if wav.dim() == 3 and wav.shape[0] == 1:
        wav = wav[0]
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2 or wav.shape[-1] == 0:
        raise NarrateInputError("voice", f"clip {index + 1} has shape {list(waveform.shape)}; expected a waveform "
                                         "[channels, samples] with at least one sample")
    if isinstance(sample_rate, bool) or not float(sample_rate).is_integer() or sample_rate <= 0:
        raise NarrateInputError("voice", f"clip {index + 1} has sample rate {sample_rate!r}; expected a positive "
                                         "integer in Hz")
    wav = wav.float().mean(dim=0, keepdim=True)
    if not torch.isfinite(wav).all():
        raise NarrateInputError("voice", f"clip {index + 1} contains NaN or infinite samples; re-export the audio")
    return resample(wav, int(sample_rate), CLONING_SAMPLE_RATE).clamp(-1.0, 1.0)


@torch.no_grad()
def encode_voice(model, clips: Sequence[tuple[torch.Tensor, int]], length_s: float = 30, chunk_s: float = 4,
                 max_ref_s: float = 30) -> VoiceProfile:
    """Reference clips [(waveform [C,T], sample_rate), ...] -> VoiceProfile.

    `model` is an XttsModel (uses `gpt.conditioning_encoder`, `gpt.conditioning_perceiver`,
    `hifigan_decoder.speaker_encoder`, `mel_stats`). `length_s` / `chunk_s`: seconds of the concatenated clips used
    for the GPT latents and their chunking (upstream `synthesize()` presets 30 / 4).
    """
    if not clips:
        raise NarrateInputError("voice", "no reference clip given; connect a recording of the voice (3-10 s of "
                                         "clean speech)")
    speaker_encoder = model.hifigan_decoder.speaker_encoder
    device = model.mel_stats.device
    audios, embeddings, warnings = [], [], []
    for i, (waveform, sample_rate) in enumerate(clips):
        wav = _mono_22050(waveform, sample_rate, i)[:, :int(CLONING_SAMPLE_RATE * max_ref_s)]
        seconds = wav.shape[-1] / CLONING_SAMPLE_RATE
        peak, rms = wav.abs().max().item(), wav.pow(2).mean().sqrt().item()
        if peak < SILENCE_PEAK or rms < SILENCE_RMS:
            raise NarrateInputError("voice", f"clip {i + 1} is silent (peak {peak:.1e}, RMS {rms:.1e}); connect a "
                                             "recording in which the voice is audible")
        if seconds < MIN_SECONDS:
            raise NarrateInputError("voice", f"clip {i + 1} is {seconds:.2f} s long; the voice profile needs at least "
                                             f"{MIN_SECONDS:.0f} s of speech (3-10 s of clean speech works best)")
        wav = wav.to(device)
        embeddings.append(speaker_encoder(resample(wav, CLONING_SAMPLE_RATE, speaker_encoder.sample_rate)))
        audios.append(wav)
    total = sum(a.shape[-1] for a in audios) / CLONING_SAMPLE_RATE
    if total < RECOMMENDED_SECONDS:
        warnings.append(f"the voice reference is only {total:.1f} s long; 3-10 s of clean speech clones the voice "
                        "more faithfully")
    latents = gpt_cond_latents(model.gpt, torch.cat(audios, dim=-1), model.mel_stats, length_s, chunk_s)
    speaker = torch.stack(embeddings).mean(dim=0).unsqueeze(-1)  # upstream averages without re-normalising
    return VoiceProfile(gpt_cond_latent=latents, speaker_embedding=speaker, seconds=total, warnings=warnings)

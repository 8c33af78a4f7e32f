"""NFY's audio term: the XTTS GPT trained as coqui's GPTTrainer trains it, plus the paper's spectrogram MSE.

    L_audio = w_text * CE_text + w_mel * CE_codes + w_spec * MSE(logmel(HiFi-GAN(latents, g)), logmel(target))

* The cross-entropies are the GPT's teacher-forced losses on the DVAE codes of the target speech
  (`xtts.gpt_train.forward_train`, parity with coqui-tts 0.28.0); GPTTrainer's weights 0.01 / 1.0 are the defaults.
* The spectrogram term voices the GPT latents of the same pass (latent i is the state that predicts code i, what the
  vocoder receives at inference) with the speaker embedding through XTTS's HiFi-GAN, and compares log-mels with the
  target speech at the vocoder's 24 kHz, over each clip's own frames. One GPT pass serves both terms, so these
  latents carry GPTTrainer's attention mask (which hides each text's own stop token; inference shows it): a small
  difference from inference latents, against a second full GPT pass per step.
  The mel is the pack's front end (torchaudio's MelSpectrogram) with XTTS's cloning-mel analysis (n_fft 2048,
  window 1024, hop 256, 80 slaney-normalised HTK bands 0-8 kHz, log of the power clamped at 1e-5), taken at 24 kHz:
  it is the spectrogram XTTS itself reads a voice through (its conditioning encoder's input), it weighs the speech
  band where timbre and intelligibility live, and hop 256 gives every GPT latent about 4.35 frames of its own. Not
  divided by `mel_stats` (that per-band divisor would only re-weight bands).

Gradients flow from every term into the voice conditioning (conditioning latents through the GPT; the speaker
embedding through HiFi-GAN), so an entangler in front of XTTS learns from the audio even when XTTS is frozen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import NarrateInputError
from ..xtts.gpt_train import cond_latents_from_mels, forward_train
from ..xtts.mel import mel_spectrogram

LOG_CLAMP = 1e-5


@dataclass(frozen=True)
class AudioLossWeights:
    text_ce: float = 0.01      # GPTTrainer's gpt_loss_text_ce_weight
    mel_ce: float = 1.0        # GPTTrainer's gpt_loss_mel_ce_weight
    spectrogram: float = 1.0   # the paper's spectrogram MSE; 0 skips the vocoder pass entirely


@dataclass
class AudioBatch:
    """One training batch of the audio side (what the dataset caches, plus the voice conditioning to train through).

    Give `cond_latents` (e.g. from the entangler) or `cond_mels` (upstream's path through the conditioning encoder)."""
    text_ids: torch.Tensor            # [B, T] int64, padded
    text_lengths: torch.Tensor        # [B]
    audio_codes: torch.Tensor         # [B, N] DVAE codes of the target speech
    wav_lengths: torch.Tensor         # [B] target lengths in samples at 22.05 kHz (the code rate: 1024 per code)
    speaker_embedding: torch.Tensor   # [B, 512, 1] HiFi-GAN's speaker conditioning g
    target_wav: torch.Tensor          # [B, T24] target speech at the vocoder's 24 kHz, zero-padded
    cond_latents: Optional[torch.Tensor] = None  # [B, 32, C]
    cond_mels: Optional[torch.Tensor] = None     # [B, 1, 80, T] normalised cloning mels
    cond_idxs: Optional[torch.Tensor] = None     # [B, 2] prompt segment in target samples (22.05 kHz)


@lru_cache(maxsize=4)
def _mel_module(sample_rate: int, device: torch.device) -> torch.nn.Module:
    return mel_spectrogram(sample_rate, n_fft=2048, win_length=1024, hop_length=256, n_mels=80, f_min=0.0,
                          f_max=8000.0, norm="slaney").to(device)


def log_mel(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """[B, T] -> [B, 80, T // 256 + 1] log-mel (the cloning-mel analysis at `sample_rate`), float32."""
    wav = wav.float()
    return torch.log(torch.clamp(_mel_module(sample_rate, wav.device)(wav), min=LOG_CLAMP))


def spectrogram_mse(generated: torch.Tensor, target: torch.Tensor, target_lengths: torch.Tensor,
                    sample_rate: int) -> torch.Tensor:
    """MSE between log-mels of generated [B, T'] and target [B, T] speech over each clip's own frames: frame k counts
    for item i when its centre k * hop lies inside both signals (hop 256)."""
    mel_gen, mel_tgt = log_mel(generated, sample_rate), log_mel(target, sample_rate)
    frames = min(mel_gen.shape[-1], mel_tgt.shape[-1])
    hop = _mel_module(sample_rate, generated.device).spectrogram.hop_length
    valid_len = torch.clamp(target_lengths.to(generated.device), max=generated.shape[-1])
    valid = torch.arange(frames, device=generated.device)[None] * hop < valid_len[:, None]  # [B, frames]
    err = (mel_gen[..., :frames] - mel_tgt[..., :frames]).pow(2).mean(dim=1)               # [B, frames]
    return (err * valid).sum() / (valid.sum() * 1.0).clamp_min(1.0)


def code_windows(latents: torch.Tensor, code_lengths: torch.Tensor, target_wav: torch.Tensor,
                 target_lengths: torch.Tensor, window: int, samples_per_code: float,
                 generator: Optional[torch.Generator] = None):
    """A random window of `window` latents per clip (start uniform over the clip's own codes; 0 when the clip is
    shorter) and the target samples they voice: latent i starts at sample i * samples_per_code.
    -> (latents [B, window, C], target [B, ceil(window * samples_per_code)], target lengths [B])."""
    b, n, c = latents.shape
    span = (code_lengths.cpu() - window).clamp(min=0)
    starts = (torch.rand(b, generator=generator) * (span + 1)).floor().long().to(latents.device)
    idx = (starts[:, None] + torch.arange(window, device=latents.device)).clamp(max=n - 1)
    windows = latents.gather(1, idx[..., None].expand(b, window, c))
    width = math.ceil(window * samples_per_code)
    first = torch.floor(starts * samples_per_code).long().to(target_wav.device)
    padded = F.pad(target_wav, (0, width))
    target = padded.gather(1, (first[:, None] + torch.arange(width, device=target_wav.device)).clamp(
        max=padded.shape[1] - 1))
    lengths = (target_lengths.to(target_wav.device) - first).clamp(min=0, max=width)
    return windows, target, lengths


def audio_loss(xtts, batch: AudioBatch, weights: AudioLossWeights = AudioLossWeights(),
               prompt_masking: str = "per_item", vocoder_window: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """The audio term of NFY for one batch -> {"loss_text", "loss_mel", "spectrogram_mse", "total"} (scalars;
    the first three unweighted, "total" weighted). `xtts` is an XttsModel (its `gpt` and `hifigan_decoder`).

    vocoder_window: voice only a random window of that many codes per clip (drawn with `generator`), as HiFi-GAN
    training crops segments. The vocoder's saved activations grow with the audio: the full-size HiFi-GAN keeps about
    410 MB per second of audio in float32 for the backward pass (measured), 5 GB for a 12 s clip, so a window
    (e.g. 64 codes, 3 s) bounds the memory of a batch. None: whole clips."""
    gpt, cfg = xtts.gpt, xtts.gpt.cfg
    if (batch.cond_latents is None) == (batch.cond_mels is None):
        raise NarrateInputError("batch", "give exactly one of cond_latents (e.g. the entangler's) or cond_mels")
    if vocoder_window is not None and vocoder_window < 1:
        raise NarrateInputError("vocoder_window", f"must be a positive number of codes, got {vocoder_window}")
    cond = batch.cond_latents if batch.cond_latents is not None else cond_latents_from_mels(gpt, batch.cond_mels)
    out = forward_train(gpt, batch.text_ids, batch.text_lengths, batch.audio_codes, batch.wav_lengths, cond,
                        batch.cond_idxs, prompt_masking)
    losses = {"loss_text": out.loss_text, "loss_mel": out.loss_mel}
    total = weights.text_ce * out.loss_text + weights.mel_ce * out.loss_mel
    if weights.spectrogram:
        b = batch.target_wav.shape[0]
        if batch.target_wav.dim() != 2 or b != out.latents.shape[0]:
            raise NarrateInputError("target_wav", f"expected [B, samples] at {cfg.output_sample_rate} Hz for "
                                                  f"{out.latents.shape[0]} clips, got {tuple(batch.target_wav.shape)}")
        ratio = cfg.output_sample_rate / cfg.input_sample_rate
        target_lengths = torch.floor(batch.wav_lengths * ratio).long()
        # the codes of the longest clip; shorter clips' extra latents are stop positions, outside their frames
        latents, target = out.latents[:, :int(out.code_lengths.max())], batch.target_wav
        if vocoder_window is not None and vocoder_window < latents.shape[1]:
            latents, target, target_lengths = code_windows(latents, out.code_lengths, target, target_lengths,
                                                           vocoder_window, cfg.gpt_code_stride_len * ratio, generator)
        wav = xtts.hifigan_decoder(latents, batch.speaker_embedding.to(latents.dtype)).reshape(b, -1)
        losses["spectrogram_mse"] = spectrogram_mse(wav, target, target_lengths, cfg.output_sample_rate)
        total = total + weights.spectrogram * losses["spectrogram_mse"]
    losses["total"] = total
    return losses

"""Text chunks + voice -> speech: the GPT writes codes and latents per sentence chunk, the HiFi-GAN voices them.

This is the speech half of the narration as two calls, so the synthesizer and vocoder nodes (and the pipeline) share
one implementation: `synthesize` (GPT, per chunk) and `vocode` (HiFi-GAN, per chunk, joined in order).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import NarrateInputError
from ..progress import ProgressFn, checked, report
from .gpt import GenerationResult
from .sampling import SamplingParams
from .text import TextTokens

# Chunks generated together. A batched step reads every GPT weight once for all of them: on a 2-core CPU (1 thread)
# a step of 4 chunks cost 2.5x one chunk's, of 8 3x. The KV cache grows with the batch (about 170 MB per chunk at
# the full 602-code window, fp32).
BATCH_SIZE = 8


@dataclass
class SpeechLatents:
    """The synthesizer's output: one generation per sentence chunk, in order."""
    chunks: list[GenerationResult]
    sample_rate: int
    samples_per_latent: float  # output audio samples per GPT latent (1024 / 22050 s of audio at 24 kHz)

    @property
    def num_codes(self) -> int:
        return sum(c.codes.shape[1] for c in self.chunks)

    @property
    def seconds(self) -> float:
        return sum(c.latents.shape[1] for c in self.chunks) * self.samples_per_latent / self.sample_rate


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def synthesize(model, tokens: TextTokens, voice, params: SamplingParams, progress: ProgressFn = None,
               batch_size: int = BATCH_SIZE) -> SpeechLatents:
    """Generates every chunk of `tokens` in the voice; chunk i is seeded with params.seed + i.

    Up to `batch_size` chunks are generated together in one batched pass (`XttsGPT.generate_batch`): the result is
    the same as one chunk after another, but the weights are read once per step for the whole group."""
    if not tokens.ids or not any(tokens.ids):
        raise NarrateInputError("tokens", "there is no text to speak; give Text BPE a non-empty text.")
    cfg, device = model.gpt.cfg, _device_of(model)
    dtype = model.gpt.mel_embedding.weight.dtype  # the GPT's precision (its voice encoders may stay float32)
    cond = voice.gpt_cond_latent.to(device, dtype)
    for i, ids in enumerate(tokens.ids):
        # the GPT's text window holds gpt_max_text_tokens; the text splitter keeps chunks well under it
        if len(ids) > cfg.gpt_max_text_tokens:
            raise NarrateInputError("tokens", f"chunk {i + 1} has {len(ids)} tokens, more than the model's "
                                              f"{cfg.gpt_max_text_tokens}; turn on split_sentences in Text BPE.")
    per_chunk = params.max_new_tokens or cfg.max_gen_mel_tokens
    if tokens.max_codes and tokens.max_codes < per_chunk:  # the short-text guard (text.py)
        per_chunk = tokens.max_codes
        params = replace(params, max_new_tokens=per_chunk)
    total = per_chunk * len(tokens.ids)
    chunks = []
    for first in range(0, len(tokens.ids), max(1, batch_size)):
        group = tokens.ids[first:first + max(1, batch_size)]
        group_progress = None if progress is None else (
            lambda d, t, first=first, n=len(group): progress(first * per_chunk + d * n, total))
        chunks += model.gpt.generate_batch(group, cond, params, group_progress,
                                           seeds=[params.seed + first + j for j in range(len(group))])
        report(progress, (first + len(group)) * per_chunk, total)
    hop = cfg.gpt_code_stride_len * cfg.output_sample_rate / cfg.input_sample_rate
    return SpeechLatents(chunks, cfg.output_sample_rate, hop)


def vocode_chunks(model, speech: SpeechLatents, voice, progress: ProgressFn = None) -> list[torch.Tensor]:
    """HiFi-GAN over each chunk's latents with the voice's speaker embedding: one waveform [T] per chunk."""
    device = _device_of(model)
    dtype = model.hifigan_decoder.waveform_decoder.conv_pre.weight.dtype  # its speaker encoder stays float32
    speaker = voice.speaker_embedding.to(device, dtype)
    pieces = []
    for i, chunk in enumerate(speech.chunks):
        with checked(model.hifigan_decoder, progress, i, len(speech.chunks)):  # a long chunk takes a while
            wav = model.hifigan_decoder(chunk.latents.to(device, dtype), speaker) if chunk.latents.shape[1] else None
        pieces.append(torch.zeros(0) if wav is None else wav.reshape(-1).float().cpu())
        report(progress, i + 1, len(speech.chunks))
    if not any(p.numel() for p in pieces):
        raise NarrateInputError("speech", "the synthesizer produced no speech codes; try another seed or text.")
    return pieces


def join_chunks(pieces: list[torch.Tensor], sample_rate: int, fade_ms: float = 5.0) -> torch.Tensor:
    """Chunks joined end to end (the total length is kept); where one ends and the next begins, each side fades
    over `fade_ms` so the join never clicks: upstream's plain concatenation can leave a step in the waveform."""
    fade = max(1, int(sample_rate * fade_ms / 1000))
    ramp = 0.5 - 0.5 * torch.cos(torch.linspace(0, torch.pi, fade))  # raised cosine 0 -> 1
    out = [p.clone() for p in pieces]
    for i, piece in enumerate(out):
        n = min(fade, piece.numel())
        if i > 0 and n:
            piece[:n] *= ramp[:n]
        if i + 1 < len(out) and n:
            piece[-n:] *= ramp[:n].flip(0)
    return torch.cat(out)


def vocode(model, speech: SpeechLatents, voice, progress: ProgressFn = None) -> dict:
    """HiFi-GAN over each chunk, chunks joined in order -> AUDIO (24 kHz)."""
    pieces = vocode_chunks(model, speech, voice, progress)
    return {"waveform": join_chunks(pieces, speech.sample_rate).view(1, 1, -1), "sample_rate": speech.sample_rate}

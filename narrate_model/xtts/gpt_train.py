"""Teacher-forced training pass of the XTTS GPT, as coqui-tts 0.28.0's `GPT.forward` runs under `GPTTrainer`.

A batch of clips (text ids, DVAE codes of the target speech, voice conditioning) becomes one GPT-2 pass over
`[cond (32) | text | codes]` and two cross-entropies. The framing follows upstream step by step:
* code lengths come from the wav lengths: `ceil(wav_len / 1024) + 3`; the codes are cut (or zero-padded) to the
  longest, one stop code (1025) is appended, and every position from `ceil(wav_len / 1024)` on becomes 1025;
* text is cut to the longest text length and gets a stop token (0); inputs get the start tokens (261 / 1024) in
  front, targets the stop tokens at the end;
* attention hides text positions from `len + 1` on (so the text's own stop token is hidden too) and code positions
  from `code_len + 1` on; the conditioning latents are always visible;
* targets after the same positions are -1 (ignored), and the cross-entropy averages over what is left.

`latents` is the vocoder's view: `final_norm` of the code part, latent i being the state that predicts code i.
`return_latent_train` reproduces upstream's `return_latent=True` call in train mode (no attention mask, last latent
dropped: `sub = -1`), the latents the README calls `latents_train`.

Nothing here runs under `no_grad`: gradients reach the GPT, the conditioning encoder and perceiver, and whatever
produced `cond_latents` (the entangler).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import NarrateInputError
from .conditioning import style_embedding
from .gpt import XttsGPT

IGNORE = -1
# Prompt masking (targets of the audio segment the conditioning was cut from are not trained on):
#   "per_item":  each item masks its own segment, in code units (samples / 1024) -- ours, the default;
#   "last_item": upstream's quirk -- the loop variable left over from the previous loop masks only the LAST item,
#                and v2 divides the sample indices by the perceiver's 256 instead of the code stride -- for parity.
PROMPT_MASKING = ("per_item", "last_item")
UPSTREAM_PROMPT_DIVISOR = 256  # coqui's `perceiver_cond_length_compression`
GPT_TRAINER_DROPOUT = 0.1  # GPT-2's default attention / residual / embedding dropout, on while GPTTrainer trains


@dataclass
class TrainTargets:
    """The framed batch: inputs and targets of the text and code parts, and their key masks (True = visible)."""
    text_inputs: torch.Tensor   # [B, Tt + 2]  [261] + ids + [0], cut to the longest text
    text_targets: torch.Tensor  # [B, Tt + 2]  ids + [0, 0], -1 after each length
    text_keys: torch.Tensor     # [B, Tt + 2]  bool, False from len + 1 on
    mel_inputs: torch.Tensor    # [B, M + 2]   [1024] + codes + stop padding
    mel_targets: torch.Tensor   # [B, M + 2]   codes + stop padding + [1025], -1 after each code length
    mel_keys: torch.Tensor      # [B, M + 2]   bool, False from code_len + 1 on
    code_lengths: torch.Tensor  # [B]          real codes per item: ceil(wav_len / 1024)


@dataclass
class TrainOutput:
    loss_text: torch.Tensor     # scalar cross-entropy of the text part (ignore_index -1)
    loss_mel: torch.Tensor      # scalar cross-entropy of the code part (ignore_index -1)
    text_logits: torch.Tensor   # [B, V_text, Tt + 2] (upstream's layout: classes second)
    mel_logits: torch.Tensor    # [B, V_audio, M + 2]
    latents: torch.Tensor       # [B, M + 2, C] final_norm of the code part; latent i predicts code i
    code_lengths: torch.Tensor  # [B] real codes per item (what the vocoder should voice)


def cond_latents_from_mels(gpt: XttsGPT, cond_mels: torch.Tensor) -> torch.Tensor:
    """Upstream `get_style_emb(cond_mels).transpose(1, 2)`: [B, 1, 80, T] or [B, 80, T] -> [B, 32, C], with grad."""
    mels = cond_mels.squeeze(1) if cond_mels.dim() == 4 else cond_mels
    return style_embedding(gpt.conditioning_encoder, gpt.conditioning_perceiver, mels).transpose(1, 2)


def _check(text_ids, text_lengths, audio_codes, wav_lengths) -> None:
    b = text_ids.shape[0]
    if text_ids.dim() != 2 or audio_codes.dim() != 2 or audio_codes.shape[0] != b:
        raise NarrateInputError("batch", f"expected text ids [B,T] and codes [B,N] of one batch, got "
                                         f"{tuple(text_ids.shape)} and {tuple(audio_codes.shape)}")
    if tuple(text_lengths.shape) != (b,) or tuple(wav_lengths.shape) != (b,):
        raise NarrateInputError("batch", f"expected one text length and one wav length per item ({b}), got "
                                         f"{tuple(text_lengths.shape)} and {tuple(wav_lengths.shape)}")
    if int(text_lengths.min()) < 1 or int(text_lengths.max()) > text_ids.shape[1]:
        raise NarrateInputError("text_lengths", f"lengths must lie in 1..{text_ids.shape[1]} (the padded text "
                                                f"width), got {text_lengths.tolist()}")
    if int(wav_lengths.min()) < 1:
        raise NarrateInputError("wav_lengths", f"every clip needs audio, got {wav_lengths.tolist()}")


def frame_batch(gpt: XttsGPT, text_ids: torch.Tensor, text_lengths: torch.Tensor, audio_codes: torch.Tensor,
                wav_lengths: torch.Tensor, cond_idxs: Optional[torch.Tensor] = None,
                prompt_masking: str = "per_item") -> TrainTargets:
    """Inputs, targets and key masks of a padded batch, as upstream's `GPT.forward` builds them.

    cond_idxs: optional [B, 2] start/end (in target-wav samples at 22.05 kHz) of the segment the voice conditioning
    was cut from; its codes are then left out of the code loss (see PROMPT_MASKING). Never modified in place
    (upstream divides the caller's tensor in place)."""
    if prompt_masking not in PROMPT_MASKING:
        raise ValueError(f"prompt_masking must be one of {PROMPT_MASKING}, not {prompt_masking!r}")
    _check(text_ids, text_lengths, audio_codes, wav_lengths)
    cfg, device = gpt.cfg, audio_codes.device
    text_lengths, wav_lengths = text_lengths.to(device), wav_lengths.to(device)
    stride = cfg.gpt_code_stride_len
    code_lengths = torch.ceil(wav_lengths / stride).long()  # real codes; upstream's `code_lengths` is this + 3
    framed_lengths = code_lengths + 3
    max_mel, max_text = int(framed_lengths.max()), int(text_lengths.max())
    if max_mel + 2 > cfg.max_mel_tokens or max_text + 2 > cfg.max_text_tokens:
        raise NarrateInputError("batch", f"{max_mel - 3} codes / {max_text} text tokens per clip; the GPT holds at "
                                         f"most {cfg.max_mel_tokens - 5} codes and {cfg.max_text_tokens - 2} "
                                         "text tokens: cut the clips shorter")
    positions_m = torch.arange(max_mel + 2, device=device)[None]
    positions_t = torch.arange(max_text + 2, device=device)[None]

    codes = F.pad(audio_codes[:, :max_mel], (0, max(0, max_mel - audio_codes.shape[1])))
    codes = F.pad(codes, (0, 1), value=cfg.gpt_stop_audio_token)
    codes = codes.masked_fill(positions_m[:, :-1] >= code_lengths[:, None], cfg.gpt_stop_audio_token)
    mel_inputs = F.pad(codes, (1, 0), value=cfg.gpt_start_audio_token)
    mel_targets = F.pad(codes, (0, 1), value=cfg.gpt_stop_audio_token)
    mel_keys = positions_m <= framed_lengths[:, None]
    mel_targets = mel_targets.masked_fill(~mel_keys, IGNORE)

    # positions from each length on hold the stop token, whatever the collate padded with (upstream pads with 0 =
    # stop, so its target at `len` is the stop token; this keeps that true for any padding)
    text = text_ids[:, :max_text].masked_fill(positions_t[:, :max_text] >= text_lengths[:, None],
                                              cfg.gpt_stop_text_token)
    text = F.pad(text, (0, 1), value=cfg.gpt_stop_text_token)
    text_inputs = F.pad(text, (1, 0), value=cfg.gpt_start_text_token)
    text_targets = F.pad(text, (0, 1), value=cfg.gpt_stop_text_token)
    text_keys = positions_t <= text_lengths[:, None]
    text_targets = text_targets.masked_fill(~text_keys, IGNORE)

    if cond_idxs is not None:
        if prompt_masking == "last_item":
            start, end = (cond_idxs[-1] // UPSTREAM_PROMPT_DIVISOR).tolist()
            mel_targets[-1, start:end] = IGNORE
        else:  # every code that overlaps the segment [start, end) samples
            start = cond_idxs[:, 0:1].to(device) // stride
            end = torch.div(cond_idxs[:, 1:2].to(device) + stride - 1, stride, rounding_mode="floor")
            mel_targets = mel_targets.masked_fill((positions_m >= start) & (positions_m < end), IGNORE)
    return TrainTargets(text_inputs, text_targets, text_keys, mel_inputs, mel_targets, mel_keys, code_lengths)


def _hidden(gpt: XttsGPT, cond_latents: torch.Tensor, t: TrainTargets, masked: bool) -> tuple[torch.Tensor, int]:
    """final_norm of the GPT pass over [cond | text | codes] -> ([B, text + codes, C], text width)."""
    text_emb = gpt.text_embedding(t.text_inputs) + gpt.text_pos_embedding(0, t.text_inputs.shape[1])
    mel_emb = gpt.mel_embeddings(t.mel_inputs)
    x = torch.cat([cond_latents.to(text_emb.dtype), text_emb, mel_emb], dim=1)
    mask = None
    if masked:  # causal, with the padding keys of each item hidden (the conditioning is always visible)
        n = x.shape[1]
        keys = torch.cat([t.text_keys.new_ones(x.shape[0], cond_latents.shape[1]), t.text_keys, t.mel_keys], dim=1)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        mask = (causal[None] & keys[:, None, :])[:, None]
    h = gpt.gpt(x, mask=mask)
    return gpt.final_norm(h[:, cond_latents.shape[1]:]), t.text_inputs.shape[1]


def forward_train(gpt: XttsGPT, text_ids: torch.Tensor, text_lengths: torch.Tensor, audio_codes: torch.Tensor,
                  wav_lengths: torch.Tensor, cond_latents: torch.Tensor, cond_idxs: Optional[torch.Tensor] = None,
                  prompt_masking: str = "per_item", label_smoothing: float = 0.0) -> TrainOutput:
    """Upstream `GPT.forward(...)` (the losses path) with conditioning latents [B, 32, C] given directly (use
    `cond_latents_from_mels` for upstream's `cond_mels`). Unlike upstream, the framing does not depend on the module
    mode; GPT-2's dropout applies when `gpt.gpt.dropout` is set (GPT_TRAINER_DROPOUT to train the GPT as coqui does)
    and the GPT is in train mode."""
    t = frame_batch(gpt, text_ids, text_lengths, audio_codes, wav_lengths, cond_idxs, prompt_masking)
    enc, n_text = _hidden(gpt, cond_latents, t, masked=True)
    text_logits = gpt.text_head(enc[:, :n_text]).transpose(1, 2)
    latents = enc[:, n_text:]
    mel_logits = gpt.mel_head(latents).transpose(1, 2)
    loss_text = F.cross_entropy(text_logits, t.text_targets, ignore_index=IGNORE, label_smoothing=label_smoothing)
    loss_mel = F.cross_entropy(mel_logits, t.mel_targets, ignore_index=IGNORE, label_smoothing=label_smoothing)
    return TrainOutput(loss_text, loss_mel, text_logits, mel_logits, latents, t.code_lengths)


def return_latent_train(gpt: XttsGPT, text_ids: torch.Tensor, text_lengths: torch.Tensor, audio_codes: torch.Tensor,
                        wav_lengths: torch.Tensor, cond_latents: torch.Tensor) -> torch.Tensor:
    """Upstream `GPT.forward(..., return_latent=True)` in train mode: no attention mask, the code part's latents
    without the last one (`sub = -1`) -> [B, M + 1, C]."""
    t = frame_batch(gpt, text_ids, text_lengths, audio_codes, wav_lengths)
    enc, n_text = _hidden(gpt, cond_latents, t, masked=False)
    return enc[:, n_text:-1]

"""Next-code selection for the XTTS GPT: the HF `generate()` logits pipeline, vectorised over the vocabulary.

Order and formulas follow transformers' processors as XTTS drives them (num_beams=1): repetition penalty first,
then, only when sampling, temperature -> top-k -> top-p; greedy decoding takes the argmax of the penalised scores.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..errors import NarrateInputError


@dataclass
class SamplingParams:
    """How codes are drawn. Defaults are `Xtts.inference()`'s.

    length_penalty: accepted for parity with upstream, which forwards it to HF `generate`; with num_beams=1 (the only
    mode XTTS uses) HF applies it to nothing, so it has no effect here either.
    max_new_tokens: cap on generated tokens, stop token included (None -> the model's max_gen_mel_tokens, 602 for v2).
    speed: >1 speaks faster; the latents are resampled to length/speed before the vocoder (codes are unchanged).
    """

    temperature: float = 0.75
    top_p: float = 0.85
    top_k: int = 50
    repetition_penalty: float = 10.0
    length_penalty: float = 1.0
    do_sample: bool = True
    max_new_tokens: Optional[int] = None
    seed: int = 0
    speed: float = 1.0

    def validate(self) -> None:
        if self.repetition_penalty <= 0:
            raise NarrateInputError("repetition_penalty", f"must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if self.speed <= 0:
            raise NarrateInputError("speed", f"must be > 0 (1.0 = natural pace), got {self.speed}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise NarrateInputError("max_new_tokens", f"must be at least 1, got {self.max_new_tokens}")
        if not self.do_sample:
            return
        if self.temperature <= 0:
            raise NarrateInputError("temperature", f"must be > 0 when sampling, got {self.temperature}; "
                                                   "turn sampling off for deterministic (greedy) speech")
        if not 0 < self.top_p <= 1:
            raise NarrateInputError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise NarrateInputError("top_k", f"must be >= 0 (0 = off), got {self.top_k}")


def penalize_repeats(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF repetition penalty: every id in `seen` [B,V] gets score*penalty if negative, else score/penalty."""
    if penalty == 1.0:
        return scores
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask everything below the k-th best score (ties with it survive, as in HF)."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def keep_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: drop the least likely ids whose total probability is <= 1-p; the best id always survives."""
    if p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
    drop_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def process_scores(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Raw next-code logits [B,V] -> the scores a code is chosen from (HF's `output_scores`)."""
    scores = penalize_repeats(logits.float(), seen, params.repetition_penalty)
    if params.do_sample:
        if params.temperature != 1.0:
            scores = scores / params.temperature
        scores = keep_top_k(scores, params.top_k)
        scores = keep_top_p(scores, params.top_p)
    return scores


def choose(scores: torch.Tensor, params: SamplingParams,
           generator: Union[torch.Generator, Sequence[torch.Generator]]) -> torch.Tensor:
    """Pick one id per row [B] from processed scores: argmax when greedy, else a draw from softmax(scores).

    `generator` may be one per row, so each row draws exactly what it would draw alone with that generator."""
    if not params.do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    if isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if len(generator) != probs.shape[0]:
        raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generator)]).view(-1)

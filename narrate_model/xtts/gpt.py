"""The XTTS-v2 GPT: text + voice conditioning -> audio codes (the "spectrogram synthesizer") and vocoder latents.

A GPT-2 decoder over the sequence `[cond_latent (32) | text | audio codes]`. Text ids are framed as
`[start_text] + ids + [stop_text]`, audio codes start with `start_audio` (1024); every part carries its own learned
position embedding (GPT-2's `wpe` is unused upstream, positions restart at 0 for text and for audio). The latent the
vocoder consumes for code i is `final_norm` of the last hidden state at the input that predicted code i.

State-dict keys are the checkpoint's `gpt.*` keys without the `gpt.` prefix (GPT-2 `Conv1D` weights stay [in, out]).
The teacher-forced training pass (losses, padding, targets as coqui's GPTTrainer) is in `gpt_train.py`.
"""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import NarrateInputError
from ..progress import ProgressFn, report
from .conditioning import ConditioningEncoder, PerceiverResampler
from .config import XttsConfig
from .sampling import SamplingParams, choose, process_scores

PROGRESS_BLOCK = 16  # codes per progress report (and Cancel check)
# Steps between two reads of the "every sentence has stopped" flag on an accelerator. Reading a device flag on the
# host waits for the device to finish all queued work, so doing it every token keeps the host from queueing the next
# step ahead; at most SYNC_EVERY - 1 steps are computed past the last stop and trimmed. On the CPU the flag is already
# on the host (reading it costs nothing, a wasted step costs a real step), so the CPU checks every step.
SYNC_EVERY = 16


def default_sync_every(device: torch.device) -> int:
    return 1 if device.type == "cpu" else SYNC_EVERY


class Conv1D(nn.Module):
    """GPT-2's linear layer, weight stored [in, out] as in the checkpoint."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.weight, std=0.02)  # GPT-2's init; checkpoints overwrite it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class KVCache:
    """Preallocated keys/values of every layer, [layers, B, heads, capacity, head_dim]; `length` positions filled."""

    def __init__(self, layers: int, batch: int, heads: int, capacity: int, head_dim: int, like: torch.Tensor,
                 zeroed: bool = False):
        """zeroed: for steps that attend to the whole capacity (write_at): a masked-out position still enters the
        weighted sum with weight 0, and 0 * NaN from uninitialised memory would be NaN."""
        shape = (layers, batch, heads, capacity, head_dim)
        make = torch.zeros if zeroed else torch.empty
        self.k = make(shape, dtype=like.dtype, device=like.device)
        self.v = make(shape, dtype=like.dtype, device=like.device)
        self.length = 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new positions of one layer; returns all keys/values so far (views, no copy)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def write_at(self, layer: int, position: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Static-shape variant for compiled / CUDA-graph steps: one position given as a device tensor [1]; returns
        the whole capacity (the caller's mask hides what is not written yet)."""
        self.k[layer].index_copy_(2, position, k)
        self.v[layer].index_copy_(2, position, v)
        return self.k[layer], self.v[layer]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = Conv1D(dim, 3 * dim)
        self.c_proj = Conv1D(dim, dim)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache], layer: int,
                mask: Optional[torch.Tensor] = None, dropout: float = 0.0,
                position: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if position is not None:  # static-shape step (fast_decode.py): `mask` covers the cache's whole capacity
            k, v = cache.write_at(layer, position, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.c_proj(out.transpose(1, 2).reshape(b, t, c))
        first = cache is None or cache.length == 0
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        if not first and t > 1:
            raise ValueError("KV-cached steps feed one position at a time")
        if mask is not None:  # padded batch: the caller's mask [B,1,t,keys] already holds causality
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:  # causal mask only over a fresh sequence; a single cached step may see every earlier position
            out = F.scaled_dot_product_attention(q, k, v, is_causal=first and t > 1, dropout_p=dropout)
        return self.c_proj(out.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = Conv1D(dim, 4 * dim)
        self.c_proj = Conv1D(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


def _drop(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p) if p else x


class Block(nn.Module):
    """Pre-LayerNorm GPT-2 block."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = SelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache], layer: int,
                mask: Optional[torch.Tensor] = None, dropout: float = 0.0,
                position: Optional[torch.Tensor] = None) -> torch.Tensor:
        """dropout: GPT-2's attention and residual dropout probability (0 outside training).
        position: static-shape cached step (see SelfAttention)."""
        x = x + _drop(self.attn(self.ln_1(x), cache, layer, mask, dropout, position), dropout)
        return x + _drop(self.mlp(self.ln_2(x)), dropout)


class GPT2Stack(nn.Module):
    """GPT-2 without token and position embeddings (upstream deletes `wte` and zeroes `wpe`): keys `h.N.*`, `ln_f`."""

    def __init__(self, dim: int, layers: int, heads: int):
        super().__init__()
        self.h = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim, eps=1e-5)
        # Training option: recompute each block in the backward pass instead of keeping its activations. Only on
        # uncached passes that record gradients, so generation is unaffected.
        self.gradient_checkpointing = False
        # GPT-2's dropout (embeddings, attention, residuals; 0.1 when coqui's GPTTrainer trains), applied only in
        # train mode. 0 by default: inference never uses it.
        self.dropout = 0.0

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None,
                mask: Optional[torch.Tensor] = None, position: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mask: optional boolean attention mask [B,1,T,keys] (True = may attend), for left-padded batches.
        position: a static-shape step writes its one position there (a device tensor [1]) and attends to the whole
        cache under `mask`; `cache.length` is then the caller's to advance."""
        recompute = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        p = self.dropout if self.training else 0.0
        x = _drop(x, p)
        for i, block in enumerate(self.h):
            if recompute:  # non-reentrant: parameter gradients survive even when x itself needs none; the RNG state
                x = checkpoint(block, x, None, i, mask, p, use_reentrant=False)  # is replayed, same dropout masks
            else:
                x = block(x, cache, i, mask, p, position)
        if cache is not None and position is None:
            cache.length += x.shape[1]
        return self.ln_f(x)


class LearnedPositions(nn.Module):
    """Upstream's `LearnedPositionEmbeddings` (key `emb.weight`): rows start..start+n."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(rows, dim)

    def forward(self, start: int, n: int) -> torch.Tensor:
        return self.emb.weight[start:start + n]


@dataclass
class GenerationResult:
    """codes: [1, N] generated audio codes, stop token excluded.
    latents: [1, M, C] what the vocoder consumes: one latent per generated token — N, plus the one that predicted the
    stop token when it was emitted (upstream's second pass runs over the codes *including* 1025) — then resampled
    to length M = floor((N + stopped) / speed) when speed != 1.
    stopped: whether the stop token ended generation (False: max_new_tokens was reached).
    step_logits / step_scores: [steps, V] raw next-code logits and the processed scores the code was chosen from
    (only with `record_scores=True`)."""

    codes: torch.Tensor
    latents: torch.Tensor
    stopped: bool
    step_logits: Optional[torch.Tensor] = None
    step_scores: Optional[torch.Tensor] = None


def apply_speed(latents: torch.Tensor, speed: float) -> torch.Tensor:
    """Upstream's speed control: linear resampling of the latents [B,T,C] by 1/speed before the vocoder."""
    length_scale = 1.0 / max(speed, 0.05)  # upstream clamps the speed at 0.05
    if length_scale == 1.0:
        return latents
    return F.interpolate(latents.transpose(1, 2), scale_factor=length_scale, mode="linear").transpose(1, 2)


class XttsGPT(nn.Module):
    def __init__(self, cfg: XttsConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.gpt_n_model_channels
        self.heads = cfg.gpt_n_heads
        self.conditioning_encoder = ConditioningEncoder(cfg)
        self.conditioning_perceiver = PerceiverResampler(cfg)
        self.text_embedding = nn.Embedding(cfg.gpt_number_text_tokens, dim)
        self.mel_embedding = nn.Embedding(cfg.gpt_num_audio_tokens, dim)
        self.gpt = GPT2Stack(dim, cfg.gpt_layers, cfg.gpt_n_heads)
        self.mel_pos_embedding = LearnedPositions(cfg.max_mel_tokens, dim)
        self.text_pos_embedding = LearnedPositions(cfg.max_text_tokens, dim)
        self.final_norm = nn.LayerNorm(dim)
        self.text_head = nn.Linear(dim, cfg.gpt_number_text_tokens)
        self.mel_head = nn.Linear(dim, cfg.gpt_num_audio_tokens)
        # generation settings (not weights): see generate_batch and fast_decode.py
        self.sync_every: Optional[int] = None
        self.fast_decode = None  # a fast_decode.FastDecode: fixed-shape steps, compiled and/or CUDA-graphed

    # --- embeddings ---
    def prefix_embeddings(self, text_ids: torch.Tensor, cond_latent: torch.Tensor) -> torch.Tensor:
        """[cond_latent | embed([start_text] + ids + [stop_text])] -> [B, 32 + Tt + 2, C]."""
        cfg = self.cfg
        limit = cfg.gpt_max_text_tokens
        if text_ids.shape[1] >= limit:
            raise NarrateInputError("text", f"{text_ids.shape[1]} text tokens; XTTS reads fewer than {limit} per "
                                            "sentence. Split the text into shorter sentences.")
        text = F.pad(F.pad(text_ids, (1, 0), value=cfg.gpt_start_text_token), (0, 1), value=cfg.gpt_stop_text_token)
        text_emb = self.text_embedding(text) + self.text_pos_embedding(0, text.shape[1])
        return torch.cat([cond_latent.to(text_emb.dtype), text_emb], dim=1)

    def mel_embeddings(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Audio codes [B,T] at audio positions start.. -> [B,T,C]."""
        return self.mel_embedding(codes) + self.mel_pos_embedding(start, codes.shape[1])

    # --- teacher-forced pass ---
    def forward_latents(self, text_ids: torch.Tensor, cond_latent: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Latents [B,N,C] for given codes [B,N]: latent i is the state that predicts code i (`return_latent`).

        Upstream pads the codes to N+5 inputs ([start] + codes + stop padding) and drops the last 5 outputs
        (`sub = -5` in eval mode); the pass is causal, so only the first N inputs [start] + codes[:-1] matter."""
        if codes.shape[1] > self.cfg.max_mel_tokens:
            raise NarrateInputError("codes", f"{codes.shape[1]} codes; at most {self.cfg.max_mel_tokens} fit.")
        prefix = self.prefix_embeddings(text_ids, cond_latent)
        mel_in = F.pad(codes, (1, 0), value=self.cfg.gpt_start_audio_token)[:, :codes.shape[1]]
        h = self.gpt(torch.cat([prefix, self.mel_embeddings(mel_in)], dim=1))
        return self.final_norm(h[:, prefix.shape[1]:])

    def mel_logits(self, latents: torch.Tensor) -> torch.Tensor:
        """Next-code logits [B,N,V] from latents [B,N,C]."""
        return self.mel_head(latents)

    # --- generation ---
    @torch.no_grad()
    def generate(self, text_ids: torch.Tensor, cond_latent: torch.Tensor, params: Optional[SamplingParams] = None,
                 progress: ProgressFn = None, record_scores: bool = False) -> GenerationResult:
        """Autoregressive codes for one sentence (batch 1) with a KV cache, plus the vocoder latents.

        The latents are collected during generation (the same states upstream's second teacher-forced pass
        recomputes), so no second pass is run. Sampling is seeded with params.seed."""
        if text_ids.shape[0] != 1 or cond_latent.shape[0] != 1:
            raise ValueError("generate() takes one sentence (batch 1); use generate_batch() for several")
        params = params or SamplingParams()
        return self.generate_batch([text_ids[0]], cond_latent, params, progress, record_scores,
                                   seeds=[params.seed])[0]

    @torch.no_grad()
    def generate_batch(self, text_ids: Sequence, cond_latent: torch.Tensor, params: Optional[SamplingParams] = None,
                       progress: ProgressFn = None, record_scores: bool = False,
                       seeds: Optional[Sequence[int]] = None, sync_every: Optional[int] = None) -> list[GenerationResult]:
        """Several sentences generated together, one batched KV-cached pass per step; one result per sentence.

        text_ids: token ids per sentence (lists or 1-D tensors, lengths may differ); cond_latent [1 or B, 32, C].
        Each result equals `generate()` of that sentence alone (the same greedy codes unless float rounding flips a
        near-tie, latents within rounding): prefixes are left-padded and the padding is masked out of attention, the positions are
        XTTS's own per-part embeddings (added before padding), and each sentence keeps its own repetition-penalty
        history, stop and random generator — sentence i is seeded seeds[i] (default params.seed + i, as
        `speech.synthesize` seeds its chunks). The step cost is dominated by reading the weights, which a batch
        shares, so B sentences take far less than B times one.

        sync_every: steps between two host reads of the stop flag (None: self.sync_every, else SYNC_EVERY on an
        accelerator and 1 on the CPU); nothing else reads device values on the host until generation ends, and steps
        past a sentence's stop are trimmed, so the codes do not depend on it. 1 is the per-token check.
        With `self.fast_decode` set (fast_decode.py: torch.compile / CUDA graphs) the steps after the prompt run at
        fixed shapes."""
        params = params or SamplingParams()
        params.validate()
        cfg = self.cfg
        if len(text_ids) == 0:
            raise ValueError("generate_batch() needs at least one sentence")
        device = self.mel_embedding.weight.device
        rows = [torch.as_tensor(ids, dtype=torch.long, device=device).reshape(1, -1) for ids in text_ids]
        batch = len(rows)
        if cond_latent.shape[0] not in (1, batch):
            raise ValueError(f"cond_latent has batch {cond_latent.shape[0]}; expected 1 or {batch}")
        seeds = [params.seed + i for i in range(batch)] if seeds is None else list(seeds)
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} sentences")
        max_new = params.max_new_tokens or cfg.max_gen_mel_tokens
        if max_new > cfg.max_gen_mel_tokens:
            raise NarrateInputError("max_new_tokens", f"{max_new} exceeds the model's limit of "
                                                      f"{cfg.max_gen_mel_tokens} codes per sentence.")
        sync_every = sync_every or self.sync_every or default_sync_every(device)
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        prefixes = [self.prefix_embeddings(r, cond_latent[min(i, cond_latent.shape[0] - 1)][None])
                    for i, r in enumerate(rows)]
        width = max(p.shape[1] for p in prefixes)
        dim, vocab = prefixes[0].shape[2], cfg.gpt_num_audio_tokens
        # left padding: every sentence's last prefix position lines up, so all share one cache length per step
        start = torch.full((1, 1), cfg.gpt_start_audio_token, dtype=torch.long, device=device)
        x = torch.cat([torch.cat([p.new_zeros(1, width - p.shape[1], dim), p], dim=1) for p in prefixes])
        x = torch.cat([x, self.mel_embeddings(start).expand(batch, 1, dim)], dim=1)
        static = None if self.fast_decode is None else self.fast_decode.decoder(self, batch, cond_latent.shape[1])
        if static is not None:  # its own fixed-capacity cache and key mask, reset for this call
            cache, keys_real = static.start(width + 1 + max_new)
        else:
            cache = KVCache(cfg.gpt_layers, batch, self.heads, width + 1 + max_new, dim // self.heads, x)
            keys_real = torch.ones(batch, width + 1 + max_new, dtype=torch.bool, device=device)
        for i, p in enumerate(prefixes):
            keys_real[i, :width - p.shape[1]] = False
        padded = any(p.shape[1] < width for p in prefixes)
        mask = None
        if padded:  # causal, padding hidden from real queries; pad queries see earlier pads (no empty softmax row)
            causal = torch.ones(width + 1, width + 1, dtype=torch.bool, device=device).tril()
            real = keys_real[:, :width + 1]
            mask = (causal & (real[:, None, :] | ~real[:, :, None]))[:, None]

        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        # Upstream quirk: HF generate() sees fake prompt ids [1]*len(prefix) + [start_audio], so its repetition
        # penalty hits ids 1 and 1024 from the first step on.
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        seen[:, [1, cfg.gpt_start_audio_token]] = True
        latents = x.new_empty(batch, max_new, dim)
        codes = torch.empty(batch, max_new, dtype=torch.long, device=device)
        logs = [] if record_scores else None
        active = torch.ones(batch, dtype=torch.bool, device=device)
        steps_taken = torch.zeros(batch, dtype=torch.long, device=device)  # tokens emitted, a stop included
        steps = 0
        latent = self.final_norm(self.gpt(x, cache, mask)[:, -1])  # the prompt pass predicts the first code
        while True:
            latents[:, steps] = latent
            logits = self.mel_head(latent)
            scores = process_scores(logits, seen, params)
            code = choose(scores, params, generators)
            if logs is not None:
                logs.append((logits.float(), scores))
            codes[:, steps] = code
            steps_taken += active
            steps += 1
            active &= code != cfg.gpt_stop_audio_token
            # the only host read of a device value in the loop, every sync_every steps
            if steps == max_new or (steps % sync_every == 0 and not bool(active.any())):
                break
            seen.scatter_(1, code[:, None], True)
            x = self.mel_embeddings(code[:, None], steps)
            if static is not None:
                latent = static.step(x)
            else:
                if padded:
                    mask = keys_real[:, None, None, :cache.length + 1]
                latent = self.final_norm(self.gpt(x, cache, mask)[:, -1])
            if steps % PROGRESS_BLOCK == 0:
                report(progress, steps, max_new)
        report(progress, max_new, max_new)

        # trim: steps_taken stopped counting at each sentence's stop; later steps were computed for nothing
        last = codes.gather(1, (steps_taken - 1)[:, None])[:, 0]
        taken, ended = torch.stack([steps_taken, (last == cfg.gpt_stop_audio_token).long()]).tolist()
        results = []
        for i, (n, stopped) in enumerate(zip(taken, map(bool, ended))):
            result = GenerationResult(codes[i:i + 1, :n - 1 if stopped else n],
                                      apply_speed(latents[i:i + 1, :n], params.speed), stopped)
            if logs is not None:
                result.step_logits = torch.stack([l[i] for l, _ in logs[:n]])
                result.step_scores = torch.stack([s[i] for _, s in logs[:n]])
            results.append(result)
        return results

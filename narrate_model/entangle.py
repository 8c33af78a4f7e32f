"""The dual entanglement transformer: voice and face conditioning attend to each other (and to the text).

What the paper says: two cross-attention transformer encoders "entangle" the audio and visual latent spaces. The
audio side refines the TTS conditioning with the text (BPE) features and visual tokens, the video side refines the
portrait conditioning with the text and voice features. The ablation compares separate encoders per direction (ETE)
with one shared encoder (STE).

What the published code does (NFY @906a7d4): one ``helper.TransformerEncoderSA`` (512 channels, 8 heads, pre-LN
cross-attention + a linear LayerNorm/Linear feed-forward, no positional encoding) per direction, fed with reshapes,
not learned tokens: each 1024-d XTTS conditioning latent split into two 512 halves, raw pixel rows of the reference
image and of the face-box mask (1536 "tokens" each), raw token ids written as floats into one 512 vector. Its
initialisation zeroes every weight, so the blocks are the identity with exactly zero gradients (they can never
learn), the audio-side extraction is off by one row (the speaker slice comes out empty, so no training step ever
completes), and STE does not exist.

What we do: the same block (``TransformerEncoderSA``, NFY's state-dict keys, so published blocks load), fed with
learned tokens of what XTTS and Hallo really consume:
* voice tokens: each of the 32 GPT conditioning latents (Linear C_gpt->512) and the speaker embedding (Linear);
* face tokens: p x p patches of the VAE reference latent with the face / lip masks as extra channels (Linear
  (4+M)p^2->512; the masks tag which patches are face and lips, instead of doubling the sequence with mask tokens),
  and the 512-d identity embedding (Linear);
* text tokens: the entangler owns an embedding table over the XTTS vocabulary (6681 ids for v2) and takes the ids
  from the tokenizer, so it needs nothing from the XTTS model.
Audio side: queries = voice tokens, keys/values = text + face tokens; video side: queries = face tokens,
keys/values = text + voice tokens (both read the un-entangled tokens). Each output token is projected back
("write-back") and ADDED to the input it came from, so XTTS and Hallo receive exactly the shapes they expect and the
rest of the pipeline is unchanged. The speaker embedding is rescaled to its input L2 norm (1 for the unit vector
XTTS's speaker encoder emits; averaged multi-reference embeddings keep their norm, as XTTS uses them). The masks pass
through unchanged (they are geometry, not style).

Checkpoint layout (one safetensors file): ``audio.<NFY keys>`` and ``video.<NFY keys>`` (ETE) or
``shared.<NFY keys>`` (STE), plus ``text_embedding.weight``, ``{latents,speaker,patches,identity}_in.{weight,bias}``
and ``{latents,speaker,patches,identity}_out.weight``; the config is JSON in the metadata entry ``nfy_entangler``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Mapping

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import CheckpointError, NarrateInputError
from .state_dict import key_mismatch

METADATA_KEY = "nfy_entangler"


@dataclass(frozen=True)
class EntanglerConfig:
    mode: str = "ETE"          # "ETE": separate audio / video encoders; "STE": one shared encoder
    gpt_dim: int = 1024        # XTTS GPT width (C_gpt of the [B,32,C_gpt] conditioning latents)
    vocab_size: int = 6681     # XTTS-v2 text vocabulary
    latent_channels: int = 4   # SD VAE latent channels of Hallo's reference latent
    mask_channels: int = 2     # face and lip masks at latent resolution
    patch_size: int = 4        # 64x64 latent -> 256 patch tokens
    speaker_dim: int = 512
    identity_dim: int = 512
    width: int = 512           # NFY's TransformerEncoderSA(num_channels=512, num_heads=8)
    heads: int = 8


@dataclass
class VoiceConditioning:
    cond_latents: Tensor       # [B, 32, C_gpt] XTTS GPT conditioning latents
    speaker_embedding: Tensor  # [B, 512, 1] XTTS speaker embedding (HiFi-GAN g)


@dataclass
class FaceConditioning:
    reference_latent: Tensor   # [B, 4, h, w] VAE latent of the reference portrait
    masks: Tensor              # [B, M, h, w] face / lip masks in 0..1 (returned unchanged)
    identity: Tensor           # [512] or [B, 512] face-identity embedding


class CrossAttention(nn.Module):
    """``nn.MultiheadAttention(bias=False, batch_first=True)``'s parameters, run through SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.out_proj = nn.Linear(width, width, bias=False)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        b, n, c = x.shape
        w = self.in_proj_weight
        q = F.linear(x, w[:c]).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = F.linear(y, w[c:]).view(b, y.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class TransformerEncoderSA(nn.Module):
    """NFY's block: ``a = MHA(q=ln(x), k=v=ln(y)) + x; out = ff_self(a) + a`` (one LayerNorm shared by x and y)."""

    def __init__(self, width: int = 512, heads: int = 8):
        super().__init__()
        self.mha = CrossAttention(width, heads)
        self.ln = nn.LayerNorm(width)
        # NFY quirk: no activation between the two Linears (the feed-forward is linear up to the LayerNorms).
        self.ff_self = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width, bias=False),
                                     nn.LayerNorm(width), nn.Linear(width, width, bias=False))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        a = self.mha(self.ln(x), self.ln(y)) + x
        return self.ff_self(a) + a


def _patchify(x: Tensor, p: int) -> Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def _unpatchify(t: Tensor, p: int, h: int, w: int) -> Tensor:
    b = t.shape[0]
    return t.view(b, h // p, w // p, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)


def load_strict(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """``load_state_dict`` that raises CheckpointError naming missing / unexpected / mis-shaped keys."""
    problems = key_mismatch({k: v.shape for k, v in module.state_dict().items()}, state)
    if problems:
        raise CheckpointError(f"{what} does not match: {problems}")
    module.load_state_dict(dict(state))


class Entangler(nn.Module):
    def __init__(self, config: EntanglerConfig = EntanglerConfig()):
        super().__init__()
        if config.mode not in ("ETE", "STE"):
            raise ValueError(f"mode must be 'ETE' or 'STE', got {config.mode!r}")
        self.config = cfg = config
        c, patch_in = cfg.width, (cfg.latent_channels + cfg.mask_channels) * cfg.patch_size ** 2
        self.text_embedding = nn.Embedding(cfg.vocab_size, c)
        self.latents_in = nn.Linear(cfg.gpt_dim, c)
        self.speaker_in = nn.Linear(cfg.speaker_dim, c)
        self.patches_in = nn.Linear(patch_in, c)
        self.identity_in = nn.Linear(cfg.identity_dim, c)
        if cfg.mode == "ETE":
            self.audio, self.video = TransformerEncoderSA(c, cfg.heads), TransformerEncoderSA(c, cfg.heads)
        else:
            self.shared = TransformerEncoderSA(c, cfg.heads)
        self.latents_out = nn.Linear(c, cfg.gpt_dim, bias=False)
        self.speaker_out = nn.Linear(c, cfg.speaker_dim, bias=False)
        self.patches_out = nn.Linear(c, cfg.latent_channels * cfg.patch_size ** 2, bias=False)
        self.identity_out = nn.Linear(c, cfg.identity_dim, bias=False)
        # Identity at init AND trainable: only the write-backs (the last projection of each residual branch) start at
        # zero, so the outputs equal the inputs exactly while the write-backs get gradients at the first step and
        # everything upstream from the second. NFY zeroes every weight instead, so its blocks never get a gradient.
        for out in (self.latents_out, self.speaker_out, self.patches_out, self.identity_out):
            nn.init.zeros_(out.weight)

    def encoders(self) -> tuple[TransformerEncoderSA, TransformerEncoderSA]:
        """(audio-side, video-side) encoders; the same module twice in STE mode."""
        return (self.audio, self.video) if self.config.mode == "ETE" else (self.shared, self.shared)

    @classmethod
    def from_nfy_blocks(cls, audio_state: Mapping[str, Tensor], video_state: Mapping[str, Tensor],
                        config: EntanglerConfig = EntanglerConfig()) -> "Entangler":
        """ETE entangler whose encoders are NFY's published audio / video blocks (token projections freshly
        initialised, write-backs zero: still the identity until fine-tuned, since NFY's tokens are raw reshapes)."""
        model = cls(replace(config, mode="ETE"))
        load_strict(model.audio, audio_state, "NFY audio block")
        load_strict(model.video, video_state, "NFY video block")
        return model

    def _check(self, voice: VoiceConditioning, face: FaceConditioning, text_ids: Tensor) -> None:
        cfg, lat, spk = self.config, voice.cond_latents, voice.speaker_embedding
        ref, masks, b = face.reference_latent, face.masks, voice.cond_latents.shape[0]
        if lat.dim() != 3 or lat.shape[2] != cfg.gpt_dim or tuple(spk.shape) != (b, cfg.speaker_dim, 1):
            raise NarrateInputError("voice", f"expected conditioning latents [B,32,{cfg.gpt_dim}] and a speaker "
                                    f"embedding [B,{cfg.speaker_dim},1], got {tuple(lat.shape)} and "
                                    f"{tuple(spk.shape)}; encode the voice with the XTTS model this entangler is for")
        p = cfg.patch_size
        if (ref.dim() != 4 or ref.shape[:2] != (b, cfg.latent_channels) or ref.shape[2] % p or ref.shape[3] % p
                or tuple(masks.shape) != (b, cfg.mask_channels, *ref.shape[2:])
                or face.identity.shape[-1] != cfg.identity_dim or face.identity.numel() != b * cfg.identity_dim):
            raise NarrateInputError("face", f"expected a reference latent [{b},{cfg.latent_channels},h,w] (h, w "
                                    f"multiples of {p}), masks [{b},{cfg.mask_channels},h,w] and an identity "
                                    f"[{cfg.identity_dim}], got {tuple(ref.shape)}, {tuple(masks.shape)}, "
                                    f"{tuple(face.identity.shape)}; re-run the face encode node")
        if text_ids.dim() != 2 or text_ids.shape[0] != b or text_ids.is_floating_point():
            raise NarrateInputError("tokens", f"expected integer token ids [{b},T], got {tuple(text_ids.shape)}")
        if text_ids.numel() and not 0 <= int(text_ids.min()) <= int(text_ids.max()) < cfg.vocab_size:
            raise NarrateInputError("tokens", f"token ids must lie in 0..{cfg.vocab_size - 1} (this entangler's "
                                    "vocabulary); tokenize with the matching XTTS vocabulary")

    def forward(self, voice: VoiceConditioning, face: FaceConditioning,
                text_ids: Tensor) -> tuple[VoiceConditioning, FaceConditioning]:
        """Entangle voice and face conditioning (and read the text ids [T] or [B,T]); shapes are preserved."""
        text_ids = text_ids.unsqueeze(0) if text_ids.dim() == 1 else text_ids
        self._check(voice, face, text_ids)
        p, dtype = self.config.patch_size, self.latents_in.weight.dtype
        lat, spk, ref, ident = voice.cond_latents, voice.speaker_embedding, face.reference_latent, face.identity
        b, n, (h, w) = lat.shape[0], lat.shape[1], ref.shape[2:]
        voice_tokens = torch.cat([self.latents_in(lat.to(dtype)),
                                  self.speaker_in(spk.to(dtype).transpose(1, 2))], dim=1)
        patches = _patchify(torch.cat([ref, face.masks.to(ref.dtype)], dim=1).to(dtype), p)
        face_tokens = torch.cat([self.patches_in(patches),
                                 self.identity_in(ident.to(dtype).reshape(b, 1, -1))], dim=1)
        text_tokens = self.text_embedding(text_ids.to(self.text_embedding.weight.device))
        audio_encoder, video_encoder = self.encoders()
        voice_out = audio_encoder(voice_tokens, torch.cat([text_tokens, face_tokens], dim=1))
        face_out = video_encoder(face_tokens, torch.cat([text_tokens, voice_tokens], dim=1))

        new_spk = spk + self.speaker_out(voice_out[:, n:]).transpose(1, 2).to(spk.dtype)
        # Keep the input's L2 norm (unit for XTTS); an exact no-op at init, since x / x == 1 in floating point.
        new_spk = new_spk * (spk.norm(dim=1, keepdim=True) / new_spk.norm(dim=1, keepdim=True).clamp_min(1e-12))
        new_voice = VoiceConditioning(lat + self.latents_out(voice_out[:, :n]).to(lat.dtype), new_spk)
        new_face = FaceConditioning(
            ref + _unpatchify(self.patches_out(face_out[:, :-1]), p, h, w).to(ref.dtype), face.masks,
            ident + self.identity_out(face_out[:, -1]).reshape(ident.shape).to(ident.dtype))
        return new_voice, new_face


def save_entangler(model: Entangler, path: str) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={METADATA_KEY: json.dumps(asdict(model.config))})


def load_entangler(path: str, device: torch.device | str = "cpu") -> Entangler:
    """Build the entangler a file saved by ``save_entangler`` describes and load it (keys checked strictly)."""
    with safe_open(path, framework="pt", device=str(device)) as f:
        meta = (f.metadata() or {}).get(METADATA_KEY)
        if meta is None:
            raise CheckpointError(f"{path} is not an NFY entangler file (no '{METADATA_KEY}' metadata); for NFY's "
                                  "per-block files use Entangler.from_nfy_blocks")
        state = {k: f.get_tensor(k) for k in f.keys()}
    try:
        config = EntanglerConfig(**json.loads(meta))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable entangler config in the metadata ({e})") from e
    with torch.device(device):
        model = Entangler(config)
    load_strict(model, state, f"entangler checkpoint {path}")
    return model

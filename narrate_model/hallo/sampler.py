"""Hallo's sampling loop (`FaceAnimatePipeline.__call__` + the clip loop of `scripts/inference.py`).

The video is made clip by clip (`clip_length` frames). Every clip is conditioned on the reference image and
`motion_frames` frames before it: for the first clip the reference image itself, later the last frames of the
previous clip, decoded to pixels and encoded again (as Hallo does). One CPU generator seeded once draws each clip's
initial noise, so a seed gives the same video on every device.

Latent convention at this API: latents are *unscaled* VAE latents (ComfyUI's LATENT, diffusers' `latent_dist.mean`);
the UNet works on them times `HalloConfig.latent_scale` (0.18215). The VAE stays behind two callables:
`vae_encode(pixels [N,H,W,3] in 0..1) -> latents [N,4,H/8,W/8]` and `vae_decode(latents) -> pixels [N,H,W,3] 0..1`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import diffusers
import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..errors import NarrateInputError
from ..progress import ProgressFn, report
from .attention import ReferenceKVCache
from .net import HalloNet
from .reference import write_banks

VaeEncode = Callable[[torch.Tensor], torch.Tensor]
VaeDecode = Callable[[torch.Tensor], torch.Tensor]

# configs/inference/default.yaml noise_scheduler_kwargs + the zero-SNR update of inference.py
HALLO_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
    set_alpha_to_one=True, steps_offset=1, prediction_type="v_prediction", rescale_betas_zero_snr=True,
    timestep_spacing="trailing")

SCHEDULER_NAMES = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
}


@dataclass
class SamplerSettings:
    steps: int = 40
    cfg: float = 3.5
    seed: int = 0
    clip_length: int = 16
    motion_frames: int = 2
    scheduler: Union[str, SchedulerMixin] = "ddim"  # a name above, a diffusers scheduler class name, or an instance
    motion_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # pose (full), face, lip audio weights
    reference_kv_cache: bool = True  # project the reference K/V once per clip, not at every step (same result)


@dataclass
class FaceInputs:
    """The portrait side of the conditioning (what Hallo's `ImageProcessor.preprocess` returns, resized).

    embedding: face-identity embedding [512] (insightface's raw `embedding`; zeros when no face was found).
    region: face-box image [3, H, W] in 0..1 at the video resolution (the FaceLocator input).
    full_masks, face_masks, lip_masks: 4 levels each (latent size, /2, /4, /8), a mask [h*w] or [1, h*w] in 0..1.
    """
    embedding: torch.Tensor
    region: torch.Tensor
    full_masks: Sequence[torch.Tensor]
    face_masks: Sequence[torch.Tensor]
    lip_masks: Sequence[torch.Tensor]


def make_scheduler(scheduler: Union[str, SchedulerMixin] = "ddim") -> SchedulerMixin:
    """Hallo's DDIM by default; other diffusers schedulers by name, configured with Hallo's betas and zero-SNR."""
    if isinstance(scheduler, SchedulerMixin):
        return scheduler
    cls = getattr(diffusers, SCHEDULER_NAMES.get(scheduler, scheduler), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise NarrateInputError("scheduler", f"unknown scheduler {scheduler!r}; use one of "
                                f"{', '.join(SCHEDULER_NAMES)} or a diffusers scheduler class name")
    return cls.from_config(DDIMScheduler(**HALLO_SCHEDULER_CONFIG).config)


TILED_DECODE_ABOVE = 512  # pixels per side: larger frames are decoded in overlapping tiles (diffusers' tiled_decode)


def diffusers_vae_callables(vae, tile_above: Optional[int] = TILED_DECODE_ABOVE) -> tuple[VaeEncode, VaeDecode]:
    """`vae_encode` / `vae_decode` for a diffusers `AutoencoderKL` (unscaled latents, pixels [N,H,W,3] 0..1).
    Frames larger than `tile_above` pixels a side are decoded tile by tile, so the decoder's activations stay those
    of a 512x512 frame on a small card (None: never tiled)."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(vae.device, vae.dtype) * 2 - 1
        return vae.encode(x).latent_dist.mean

    def decode(latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(vae.device, vae.dtype)
        tiled = tile_above is not None and max(z.shape[-2:]) * 8 > tile_above
        x = (vae.tiled_decode(z) if tiled else vae.decode(z)).sample
        return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return encode, decode


def _step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator) -> dict:
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _check(settings: SamplerSettings, net: HalloNet, audio: torch.Tensor, ref_latents: torch.Tensor,
           face: FaceInputs) -> None:
    if settings.steps < 1:
        raise NarrateInputError("steps", "must be at least 1")
    if settings.clip_length < 1 or settings.motion_frames < 0:
        raise NarrateInputError("clip_length", "clip_length must be >= 1 and motion_frames >= 0")
    max_len = net.config.unet.motion.max_len
    if settings.clip_length + settings.motion_frames > max_len:
        raise NarrateInputError("clip_length", f"clip_length + motion_frames must be at most {max_len} (the motion "
                                f"modules' position table); got {settings.clip_length} + {settings.motion_frames}")
    if audio.dim() not in (3, 4) or audio.shape[0] < 1:
        raise NarrateInputError("audio_features", "expected per-frame audio tokens [frames, tokens, dim] or wav2vec "
                                f"windows [frames, window, layers, dim] with at least one frame; got {tuple(audio.shape)}")
    ap = net.config.audioproj
    tokens_shape, windows_shape = (ap.context_tokens, ap.output_dim), (ap.seq_len, ap.blocks, ap.channels)
    if tuple(audio.shape[1:]) not in (tokens_shape, windows_shape):
        raise NarrateInputError("audio_features", f"per-frame audio must be tokens {list(tokens_shape)} or wav2vec "
                                f"windows {list(windows_shape)}; got {list(audio.shape[1:])} (use the wav2vec2-base "
                                "features Hallo was trained on)")
    if ref_latents.dim() != 4 or ref_latents.shape[0] != 1:
        raise NarrateInputError("face", f"reference latents must be [1, 4, h, w]; got {tuple(ref_latents.shape)}")
    h, w = ref_latents.shape[-2:]
    if tuple(face.region.shape[-2:]) != (8 * h, 8 * w):
        raise NarrateInputError("face", f"face region {tuple(face.region.shape[-2:])} does not match the reference "
                                f"latents {h}x{w} (expected {8 * h}x{8 * w} pixels); encode both from the same image")
    for name in ("full_masks", "face_masks", "lip_masks"):
        masks = getattr(face, name)
        sizes = [-(-h // 2 ** level) * -(-w // 2 ** level) for level in range(4)]  # the UNet's 4 resolutions
        if [m.numel() for m in masks] != sizes:
            raise NarrateInputError("face", f"{name} must be 4 masks of {sizes} values for {h}x{w} latents; got "
                                    f"{[m.numel() for m in masks]}")


class ClipConditioning:
    """What every clip shares, on the compute device: face tokens ([uncond, cond] with CFG), the FaceLocator
    feature repeated over the clip's frames (zeros for uncond), and the region masks repeated per frame."""

    def __init__(self, net: HalloNet, face: FaceInputs, clip_length: int, cfg: bool):
        device, dtype = net.device, net.dtype
        embedding = face.embedding.reshape(1, -1).to(device, dtype)
        cond = net.imageproj(embedding)
        halves = 2 if cfg else 1
        # CFG's uncond tokens are imageproj(0), not zeros
        self.face_tokens = torch.cat([net.imageproj(torch.zeros_like(embedding)), cond]) if cfg else cond
        region = face.region.reshape(1, *face.region.shape[-3:]).to(device, dtype)
        located = net.face_locator(region)[:, :, None].expand(-1, -1, clip_length, -1, -1)  # same for every frame
        self.located = torch.cat([torch.zeros_like(located), located]) if cfg else located
        self.masks = [[m.reshape(1, -1).to(device, dtype).repeat(clip_length * halves, 1) for m in region_masks]
                      for region_masks in (face.full_masks, face.face_masks, face.lip_masks)]
        self.cfg = cfg


def _clip_audio_tokens(net: HalloNet, audio: torch.Tensor, cfg: bool) -> torch.Tensor:
    """One clip's audio [f, ...] -> tokens [halves, f, N, D]; uncond = zeros (not audioproj of zeros)."""
    audio = audio.to(net.device, net.dtype)[None]
    tokens = net.audioproj(audio) if audio.dim() == 5 else audio
    return torch.cat([torch.zeros_like(tokens), tokens]) if cfg else tokens


@torch.no_grad()
def denoise_clip(net: HalloNet, scheduler: SchedulerMixin, generator: torch.Generator, cond: ClipConditioning,
                 audio_tokens: torch.Tensor, ref_latents: torch.Tensor, settings: SamplerSettings,
                 on_step: Optional[Callable[[], None]] = None,
                 reference_kv: Optional[ReferenceKVCache] = None) -> torch.Tensor:
    """Denoise one clip. ref_latents: scaled [1 + motion_frames, 4, h, w]. Returns scaled latents [1,4,f,h,w].
    reference_kv: a cache to reuse across clips; without one, a fresh one when `settings.reference_kv_cache`."""
    device, dtype = net.device, net.dtype
    h, w = ref_latents.shape[-2:]
    scheduler.set_timesteps(settings.steps, device=device)
    # drawn on the CPU in the model's dtype, as Hallo's randn_tensor does (fp16 draws differ from fp32 ones), so a
    # seed gives Hallo's noise on any device; the scheduler then runs in fp32, the UNet in its own dtype
    noise = torch.randn((1, 4, settings.clip_length, h, w), generator=generator, dtype=dtype)
    latents = noise.to(device, torch.float32) * scheduler.init_noise_sigma
    banks = write_banks(net.reference_unet, ref_latents, cond.face_tokens)  # ReferenceNet once per clip, t = 0
    if reference_kv is None and settings.reference_kv_cache:
        reference_kv = ReferenceKVCache()
    if reference_kv is not None:
        net.denoising_unet.project_reference(banks, cond.face_tokens.shape[0], reference_kv)
    step_kwargs = _step_kwargs(scheduler, generator)
    for t in scheduler.timesteps:
        x = torch.cat([latents] * 2) if cond.cfg else latents
        x = scheduler.scale_model_input(x, t).to(dtype)
        pred = net.denoising_unet(x, t, cond.face_tokens, audio_tokens, cond.masks, cond.located, banks,
                                  settings.motion_scale, uncond_plain=cond.cfg, reference_kv=reference_kv).float()
        if cond.cfg:
            uncond, conditioned = pred.chunk(2)
            pred = uncond + settings.cfg * (conditioned - uncond)
        latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
        if on_step is not None:
            on_step()
    return latents


@torch.no_grad()
def iter_video_clips(net: HalloNet, face_inputs: FaceInputs, audio_tokens_or_windows: torch.Tensor,
                     ref_latents: torch.Tensor, settings: Optional[SamplerSettings] = None, *,
                     vae_encode: VaeEncode, vae_decode: VaeDecode, progress: ProgressFn = None
                     ) -> Iterator[torch.Tensor]:
    """Generate the video clip by clip, yielding each finished clip's unscaled latents [f, 4, h, w] (CPU, float32).

    Arguments as `sample_video`. Every clip has `clip_length` frames except the last, which is cut to the audio's
    frame count. Only the motion frames are carried from one clip to the next, so memory does not grow with the
    audio's length: a consumer that decodes or writes each clip as it comes streams the video.
    """
    settings = settings or SamplerSettings()
    audio = audio_tokens_or_windows
    _check(settings, net, audio, ref_latents, face_inputs)
    scale, clip_length, n_motion = net.config.latent_scale, settings.clip_length, settings.motion_frames
    frames = audio.shape[0]
    clips = math.ceil(frames / clip_length)

    cfg = settings.cfg > 1.0
    cond = ClipConditioning(net, face_inputs, clip_length, cfg)
    scheduler = make_scheduler(settings.scheduler)
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    reference = ref_latents.to(net.device, torch.float32) * scale
    motion = reference.expand(n_motion, -1, -1, -1)  # first clip: the reference image stands in for the past frames
    total, done = clips * settings.steps, 0
    reference_kv = ReferenceKVCache() if settings.reference_kv_cache else None  # entries follow each clip's banks

    def step_done():
        nonlocal done
        done += 1
        report(progress, done, total)

    for start in range(0, frames, clip_length):
        clip_audio = audio[start:start + clip_length]
        kept = clip_audio.shape[0]
        # the last clip is padded by repeating its last frame (and cut back below)
        clip_audio = torch.cat([clip_audio, clip_audio[-1:].expand(clip_length - kept, *audio.shape[1:])])
        tokens = _clip_audio_tokens(net, clip_audio, cfg)
        latents = denoise_clip(net, scheduler, generator, cond, tokens, torch.cat([reference, motion]), settings,
                               on_step=step_done, reference_kv=reference_kv)
        if start + clip_length < frames and n_motion:
            # Hallo feeds the last generated frames back through pixels: decode, then encode again
            tail = latents[0, :, -n_motion:].transpose(0, 1) / scale
            motion = vae_encode(vae_decode(tail)).to(net.device, torch.float32) * scale
        yield latents[0, :, :kept].transpose(0, 1).float().cpu() / scale  # [f, 4, h, w]


def sample_video(net: HalloNet, face_inputs: FaceInputs, audio_tokens_or_windows: torch.Tensor,
                 ref_latents: torch.Tensor, settings: Optional[SamplerSettings] = None, *,
                 vae_encode: VaeEncode, vae_decode: VaeDecode, progress: ProgressFn = None) -> torch.Tensor:
    """Generate the talking-face video latents for the whole audio.

    audio_tokens_or_windows: per video frame, either audio tokens [F, 32, 768] (after `audioproj`) or wav2vec
      windows [F, 5, 12, 768] (before it). The last clip is padded by repeating the last frame and cut off again.
    ref_latents: unscaled VAE latents of the reference image [1, 4, h, w].
    Returns unscaled latents [F, 4, h, w] on the CPU (float32), one per audio frame.
    Progress: one unit per denoising step over all clips.
    """
    return torch.cat(list(iter_video_clips(net, face_inputs, audio_tokens_or_windows, ref_latents, settings,
                                           vae_encode=vae_encode, vae_decode=vae_decode, progress=progress)))

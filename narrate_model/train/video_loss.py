"""The video term of NFY's loss: Hallo's stage-2 training objective, one step at a time.

Reproduces the loop body of Hallo's `scripts/train_stage2.py` with `configs/train/stage2.yaml` (@8fd7c57) up to
`loss.backward()`:
* noise: N(0, 1) plus an offset of 0.05 * N(0, 1) per video and channel (constant over frames and pixels);
* a timestep uniform in 0..999 per video; x_t by the *training* scheduler, which is Hallo's DDIM configuration with
  `scaled_linear` betas (inference uses `linear`), rescaled to zero terminal SNR, v-prediction;
* target v = sqrt(a)*noise - sqrt(1-a)*x0, loss = MSE(model_pred, v) over the target frames only (the motion frames
  are conditioning, never predicted);
* min-SNR weighting, gamma 5, for v-prediction: w = min(SNR + 1, gamma) / (SNR + 1). As Hallo does, the batch-mean
  MSE is multiplied by the mean weight (not per sample: the same for batch 1, different for larger batches);
* conditioning dropout: the reference (the ReferenceNet does not run: plain self-attention and four zero motion
  frames), the audio (zero audio tokens after audioproj, so audioproj gets no gradient), or both.
  The issue asks for "reference, audio or both, each with probability 0.05": three exclusive events drawn from one
  uniform number. Hallo's script draws two independent flags instead (both at once with 0.0025; stage2.yaml's
  `uncond_ia_ratio` is never read).

Gradient checkpointing. Hallo checkpoints each module of the 3D down and up blocks, reentrantly. A reentrant segment
none of whose explicit inputs needs a gradient passes none on, so with the audio dropped the down blocks' audio and
motion modules get no gradient: 476 of the stage-2 trainable tensors get one instead of 688.
`checkpointing="reentrant"` reproduces exactly that. Our default, `"non_reentrant"`, gives the same prediction and
loss and also the gradients Hallo loses (680: everything but audioproj, which a dropped audio never reaches).
`None` turns checkpointing off. Whatever the checkpointing, the UNet takes its motion-frame ("training") branch, the
branch inference runs; Hallo takes it only when checkpointing is on (`motion_frames_branch=False` gives its other one).

Optional, from the paper: an L1 between the VAE decode of the one-step x0 estimate and the target frames, on a few
frames (`pixel_l1_weight`, default 0).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import Tensor, nn

from ..entangle import FaceConditioning
from ..errors import NarrateInputError
from ..hallo.net import HalloNet
from ..hallo.reference import reference_banks
from ..hallo.sampler import HALLO_SCHEDULER_CONFIG
from ..hallo.unet import CHECKPOINTING_MODES, EMPTY_BANK_MOTION_FRAMES

# stage2.yaml's noise_scheduler_kwargs + the zero-SNR update, with the training betas of `get_noise_scheduler`
TRAIN_SCHEDULER_CONFIG = {**HALLO_SCHEDULER_CONFIG, "beta_schedule": "scaled_linear"}
# what Hallo's stage 2 trains (`trainable_para` of the denoising UNet, and audioproj)
STAGE2_TRAINABLE = ("audio_modules", "motion_modules", "audioproj")


def make_train_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**TRAIN_SCHEDULER_CONFIG)


@dataclass(frozen=True)
class VideoLossConfig:
    clip_frames: int = 14           # target frames per sample (stage2.yaml n_sample_frames)
    motion_frames: int = 2          # frames before the clip, fed through the ReferenceNet (n_motion_frames)
    noise_offset: float = 0.05
    snr_gamma: float = 5.0          # 0: plain MSE
    drop_reference: float = 0.05
    drop_audio: float = 0.05
    drop_both: float = 0.05
    # stage2.yaml start_ratio: so often the motion frames are blank (zero pixels), as at the start of a video
    start_ratio: float = 0.05
    checkpointing: Optional[str] = "non_reentrant"  # None, "reentrant" (Hallo's) or "non_reentrant"
    motion_frames_branch: bool = True
    pixel_l1_weight: float = 0.0
    pixel_l1_frames: int = 2        # frames decoded per sample for the pixel L1


@dataclass
class VideoBatch:
    """One batch of the video branch; latents are scaled by the VAE factor (0.18215), the UNet's space.

    latents [b, 4, f, h, w]: the target frames (Hallo samples `latent_dist`; the mean works as well).
    ref_latents [b, 1 + M, 4, h, w]: the reference frame, then the M motion frames (the frames right before the clip).
    face_embedding [b, 512]: the face-identity embedding.
    face_region [b, 3, 8h, 8w]: the FaceLocator input (face-box image in 0..1).
    audio [b, f, 5, layers, C]: wav2vec2 windows per target frame (before audioproj).
    masks: (full, face, lip), each 4 levels (latent size, /2, /4, /8) of [b, f, h_l * w_l] in 0..1.
    pixels [b, f, 8h, 8w, 3] in 0..1, optional: target frames of the pixel L1 (decoded from `latents` if absent).
    """
    latents: Tensor
    ref_latents: Tensor
    face_embedding: Tensor
    face_region: Tensor
    audio: Tensor
    masks: Sequence[Sequence[Tensor]]
    pixels: Optional[Tensor] = None


@dataclass
class VideoDraws:
    """The random choices of one step: from `draw_step`, or set by hand to force a pattern."""
    timesteps: Tensor  # [b] int64
    noise: Tensor      # like the latents, offset included
    drop_reference: bool = False
    drop_audio: bool = False


@dataclass
class VideoLossOutput:
    loss: Tensor        # what to backpropagate: min-SNR weighted MSE (+ pixel_l1_weight * pixel_l1)
    mse: Tensor         # unweighted MSE over the target frames
    weights: Tensor     # [b] min-SNR weights (ones when snr_gamma is 0)
    snr: Tensor         # [b]
    model_pred: Tensor  # [b, 4, f, h, w], float32
    target: Tensor
    noisy_latents: Tensor
    pixel_l1: Optional[Tensor] = None


def set_trainable(net: HalloNet, parts: Sequence[str] = ()) -> list[nn.Parameter]:
    """Freeze the Net except the parameters whose name contains one of `parts` (Hallo's stage 2: STAGE2_TRAINABLE;
    NFY's default trains none of them, only the entangler). Every module is put in eval mode, as Hallo keeps its
    ReferenceNet (the Net has no dropout; the UNet's branch is an argument, not the mode). Returns the trainable ones."""
    net.eval()
    trainable = []
    for name, param in net.named_parameters():
        param.requires_grad_(any(part in name for part in parts))
        if param.requires_grad:
            trainable.append(param)
    return trainable


def entangled_batch(batch: VideoBatch, face: FaceConditioning, latent_scale: float = 0.18215) -> VideoBatch:
    """The batch with the entangler's face side as conditioning: its reference latent (unscaled, [b, 4, h, w], as the
    entangler works) replaces the reference frame and its identity the face embedding; gradients flow back through
    the ReferenceNet banks and the face tokens into the entangler."""
    ref = face.reference_latent * latent_scale
    motion = batch.ref_latents[:, 1:].to(ref)
    return replace(batch, ref_latents=torch.cat([ref[:, None], motion], dim=1),
                   face_embedding=face.identity.reshape(ref.shape[0], -1))


def draw_step(shape: Sequence[int], config: VideoLossConfig = VideoLossConfig(),
              scheduler: Optional[DDIMScheduler] = None, generator: Optional[torch.Generator] = None) -> VideoDraws:
    """Noise, timesteps and dropout for latents of `shape` [b, 4, f, h, w], drawn on the CPU from `generator`."""
    b, c = shape[:2]
    steps = (scheduler or make_train_scheduler()).config.num_train_timesteps
    noise = torch.randn(tuple(shape), generator=generator)
    if config.noise_offset:
        noise = noise + config.noise_offset * torch.randn((b, c, 1, 1, 1), generator=generator)
    timesteps = torch.randint(0, steps, (b,), generator=generator)
    u = torch.rand((), generator=generator).item()
    p_ref, p_audio, p_both = config.drop_reference, config.drop_audio, config.drop_both
    both = p_ref + p_audio <= u < p_ref + p_audio + p_both
    return VideoDraws(timesteps, noise, drop_reference=u < p_ref or both, drop_audio=p_ref <= u < p_ref + p_audio or both)


def compute_snr(scheduler: DDIMScheduler, timesteps: Tensor) -> Tensor:
    """SNR(t) = a / (1 - a), computed as Hallo's `compute_snr` does (sqrt tables, then squared ratio)."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)
    alpha = (alphas ** 0.5)[timesteps].float()
    sigma = ((1.0 - alphas) ** 0.5)[timesteps].float()
    return (alpha / sigma) ** 2


def min_snr_weights(snr: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma weights for v-prediction (SNR + 1 in place of SNR)."""
    snr = snr + 1
    return snr.clamp(max=gamma) / snr


def x0_estimate(scheduler: DDIMScheduler, noisy_latents: Tensor, v_pred: Tensor, timesteps: Tensor) -> Tensor:
    """One-step clean-latent estimate from a v-prediction: x0 = sqrt(a) * x_t - sqrt(1 - a) * v."""
    a = scheduler.alphas_cumprod.to(noisy_latents.device)[timesteps].float().reshape(-1, 1, 1, 1, 1)
    return a.sqrt() * noisy_latents - (1 - a).sqrt() * v_pred


def _check(net: HalloNet, batch: VideoBatch, config: VideoLossConfig) -> None:
    if config.checkpointing not in CHECKPOINTING_MODES:
        raise NarrateInputError("checkpointing", f"must be one of {CHECKPOINTING_MODES}, got {config.checkpointing!r}")
    if batch.latents.dim() != 5:
        raise NarrateInputError("latents", f"expected target latents [b, 4, f, h, w], got {tuple(batch.latents.shape)}")
    b, c, f, h, w = batch.latents.shape
    m = config.motion_frames
    if f != config.clip_frames:
        raise NarrateInputError("latents", f"the clip has {f} frames, the configuration {config.clip_frames}; "
                                "prepare the data with the same clip length")
    if tuple(batch.ref_latents.shape) != (b, 1 + m, c, h, w):
        raise NarrateInputError("ref_latents", f"expected [{b}, {1 + m}, {c}, {h}, {w}] (reference + {m} motion "
                                f"frames), got {tuple(batch.ref_latents.shape)}")
    max_len = net.config.unet.motion.max_len
    if f + max(m, EMPTY_BANK_MOTION_FRAMES) > max_len:
        raise NarrateInputError("clip_frames", f"frames + motion frames must fit the motion modules' {max_len} "
                                f"positions; got {f} + {max(m, EMPTY_BANK_MOTION_FRAMES)}")
    if tuple(batch.audio.shape[:2]) != (b, f) or tuple(batch.face_embedding.shape) != (b, net.config.imageproj
                                                                                         .clip_embeddings_dim):
        raise NarrateInputError("audio", f"expected audio windows [{b}, {f}, ...] and a face embedding [{b}, "
                                f"{net.config.imageproj.clip_embeddings_dim}], got {tuple(batch.audio.shape)} and "
                                f"{tuple(batch.face_embedding.shape)}")
    if tuple(batch.face_region.shape) != (b, 3, 8 * h, 8 * w):
        raise NarrateInputError("face_region", f"expected [{b}, 3, {8 * h}, {8 * w}], got "
                                f"{tuple(batch.face_region.shape)}")
    sizes = [-(-h // 2 ** level) * -(-w // 2 ** level) for level in range(4)]
    if [[tuple(m.shape) for m in region] for region in batch.masks] != [[(b, f, s) for s in sizes]] * 3:
        raise NarrateInputError("masks", f"expected (full, face, lip) x 4 levels of [{b}, {f}, h*w] for the sizes "
                                f"{sizes}")


def predict(net: HalloNet, batch: VideoBatch, noisy_latents: Tensor, timesteps: Tensor, drop_reference: bool,
            drop_audio: bool, config: VideoLossConfig = VideoLossConfig()) -> Tensor:
    """Hallo's training `Net.forward`: the denoising UNet's v-prediction [b, 4, f, h, w] with autograd."""
    device, dtype = net.device, net.dtype
    b, _, frames = noisy_latents.shape[:3]
    face_tokens = net.imageproj(batch.face_embedding.to(device, dtype))
    located = net.face_locator(batch.face_region.to(device, dtype))[:, :, None].expand(-1, -1, frames, -1, -1)
    if drop_audio:  # Hallo zeroes audioproj's output
        ap = net.config.audioproj
        audio = torch.zeros(b, frames, ap.context_tokens, ap.output_dim, device=device, dtype=dtype)
    else:
        audio = net.audioproj(batch.audio.to(device, dtype))
    banks = None
    if not drop_reference:
        banks = reference_banks(net.reference_unet, batch.ref_latents.flatten(0, 1).to(device), face_tokens)
    masks = [[m.to(device, dtype).flatten(0, 1) for m in region] for region in batch.masks]
    return net.denoising_unet(noisy_latents.to(dtype), timesteps, face_tokens, audio, masks, located, banks,
                              motion_frames_branch=config.motion_frames_branch, checkpointing=config.checkpointing)


def pixel_l1(batch: VideoBatch, x0: Tensor, frames: int, vae_decode: Callable[[Tensor], Tensor],
             latent_scale: float) -> Tensor:
    """L1 between decoded x0 estimates and the target frames, on `frames` evenly spaced frames per sample."""
    f = x0.shape[2]
    index = torch.linspace(0, f - 1, min(frames, f)).round().long()

    def pick(latents: Tensor) -> Tensor:  # [b, 4, f, h, w] -> unscaled [(b k), 4, h, w]
        return latents[:, :, index.to(latents.device)].transpose(1, 2).flatten(0, 1) / latent_scale

    decoded = vae_decode(pick(x0))
    if batch.pixels is not None:
        target = batch.pixels[:, index].flatten(0, 1)
    else:
        with torch.no_grad():
            target = vae_decode(pick(batch.latents.to(x0)))
    return F.l1_loss(decoded.float(), target.to(decoded.device).float())


def video_loss(net: HalloNet, batch: VideoBatch, draws: VideoDraws, config: VideoLossConfig = VideoLossConfig(),
               scheduler: Optional[DDIMScheduler] = None,
               vae_decode: Optional[Callable[[Tensor], Tensor]] = None) -> VideoLossOutput:
    """Hallo's stage-2 loss for one batch and one set of draws (backpropagate `.loss`).

    vae_decode(unscaled latents [N, 4, h, w]) -> pixels [N, H, W, 3] in 0..1, with autograd: needed only for the
    pixel L1 (e.g. `hallo.sampler.diffusers_vae_callables(vae)[1]`).
    """
    _check(net, batch, config)
    scheduler = scheduler or make_train_scheduler()
    if config.pixel_l1_weight and vae_decode is None:
        raise NarrateInputError("vae", "the pixel L1 (pixel_l1_weight > 0) decodes frames: give a VAE decoder")
    device = net.device
    latents = batch.latents.to(device, torch.float32)
    noise, timesteps = draws.noise.to(device, torch.float32), draws.timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps)
    pred = predict(net, batch, noisy, timesteps, draws.drop_reference, draws.drop_audio, config).float()
    mse = F.mse_loss(pred, target)
    snr = compute_snr(scheduler, timesteps)
    weights = min_snr_weights(snr, config.snr_gamma) if config.snr_gamma else torch.ones_like(snr)
    loss = mse * weights.mean()
    l1 = None
    if config.pixel_l1_weight:
        x0 = x0_estimate(scheduler, noisy, pred, timesteps)
        l1 = pixel_l1(batch, x0, config.pixel_l1_frames, vae_decode, net.config.latent_scale)
        loss = loss + config.pixel_l1_weight * l1
    return VideoLossOutput(loss, mse, weights, snr, pred, target, noisy, l1)


def video_training_step(net: HalloNet, batch: VideoBatch, config: VideoLossConfig = VideoLossConfig(),
                        scheduler: Optional[DDIMScheduler] = None, generator: Optional[torch.Generator] = None,
                        vae_decode: Optional[Callable[[Tensor], Tensor]] = None) -> VideoLossOutput:
    """Draw noise, timesteps and dropout from `generator`, then `video_loss` (the caller backpropagates)."""
    scheduler = scheduler or make_train_scheduler()
    draws = draw_step(batch.latents.shape, config, scheduler, generator)
    return video_loss(net, batch, draws, config, scheduler, vae_decode)

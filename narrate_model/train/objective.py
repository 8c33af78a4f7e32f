"""NFY's training objective over prepared samples: ``L = L_video + 0.1 L_audio`` through the entangler.

Per sample of a micro-batch, the entangler turns the frozen conditioning the dataset cached (XTTS conditioning
latents + speaker embedding; the portrait's VAE latent, its face / lip masks and identity) and the text ids into
entangled conditioning, exactly as ``pipeline.entangle`` does at inference. Then
* audio term: XTTS's GPT teacher-forced on the target's DVAE codes with the entangled voice, plus the spectrogram MSE
  of HiFi-GAN(GPT latents, entangled speaker embedding) against the target speech (``audio_loss.py``);
* video term: Hallo's stage-2 loss on a random window of the target frames, with the entangled reference latent and
  identity as the ReferenceNet / face conditioning (``video_loss.py``).
``total`` weights them with ``config.loss_weights`` (``loop.weighted_total``); a term whose weight is absent is not
computed (``loss_weights audio=1`` trains on speech alone, without a Hallo Net).

The objective module is also the root of every model (``entangler``, ``xtts``, ``hallo``), so ``select_trainable``
patterns read ``hallo.*audio_modules*`` or ``xtts.gpt.*``. All randomness (frame window, latent sample, noise,
timestep, dropout, vocoder window) comes from torch's global generator, which the loop seeds and checkpoints.
"""
from __future__ import annotations

import json
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..entangle import Entangler, EntanglerConfig, FaceConditioning, VoiceConditioning, load_entangler
from ..errors import NarrateInputError
from . import video_loss
from .audio_loss import AudioBatch, AudioLossWeights, audio_loss
from .config import TrainConfig

LATENT_SCALE = 0.18215          # SD VAE scaling: the dataset caches unscaled moments, the UNet works scaled
VOCODER_WINDOW = 64             # codes voiced per clip for the spectrogram term (~3 s; bounds HiFi-GAN's memory)
HALLO_PATHS = ("narrate/hallo/net.safetensors", "narrate/hallo/net.pth")
VAL_EVERY_NTH = 10              # with >= 10 samples, every 10th is held out for validation


@dataclass
class TrainingSetup:
    """Everything ``loop.train`` needs besides the config and the run folder."""
    objective: Callable
    trainable: nn.Module               # the root module of every model; select_trainable chose what trains
    train_items: Sequence
    val_items: Sequence
    manifest_sha256: Optional[str] = None
    base_checkpoints: Mapping[str, str] = field(default_factory=dict)   # name -> SHA-256 of each base file
    collate: Callable = list


# ----------------------------------------------------------------------------------------------- one micro-batch
def _pad(tensors: Sequence[Tensor], value=0) -> Tensor:
    """[n_i, ...] tensors -> [B, max n_i, ...] padded at the end with `value`."""
    longest = max(t.shape[0] for t in tensors)
    return torch.stack([F.pad(t, (0, 0) * (t.dim() - 1) + (0, longest - t.shape[0]), value=value) for t in tensors])


def entangler_inputs(sample: Mapping) -> tuple[VoiceConditioning, FaceConditioning, Tensor]:
    """One cached sample's conditioning as the entangler takes it at inference (``pipeline.entangle``): the voice's
    conditioning latents and speaker embedding, the portrait's unscaled VAE latent (the mean, as the Face Encode node
    takes it), its face and lip masks at latent resolution and its identity, and the text ids [1, T]."""
    ref = sample["portrait_latent_mean"]
    h, w = ref.shape[-2:]
    masks = torch.cat([sample["mask_face_0"], sample["mask_lip_0"]]).reshape(1, 2, h, w)
    voice = VoiceConditioning(sample["gpt_cond_latent"][None], sample["speaker_embedding"].reshape(1, -1, 1))
    face = FaceConditioning(ref, masks.to(ref), sample["identity"].reshape(1, -1))
    return voice, face, sample["text_ids"][None]


def _audio_batch(samples: Sequence[Mapping], voices: Sequence[VoiceConditioning]) -> AudioBatch:
    device = samples[0]["text_ids"].device
    return AudioBatch(
        text_ids=_pad([s["text_ids"] for s in samples]),
        text_lengths=torch.tensor([s["text_ids"].numel() for s in samples], device=device),
        audio_codes=_pad([s["dvae_codes"] for s in samples]),
        wav_lengths=torch.tensor([s["meta"]["target_samples_22050"] for s in samples], device=device),
        speaker_embedding=torch.cat([v.speaker_embedding for v in voices]),
        target_wav=_pad([s["target_wav_24k"] for s in samples]),
        cond_latents=torch.cat([v.cond_latents for v in voices]))


def video_window(sample: Mapping, clip_frames: int, motion_frames: int, start_ratio: float = 0.0):
    """Hallo's stage-2 window over one sample: `clip_frames` target frames from a random start that leaves
    `motion_frames` frames before it, each frame a draw from its cached VAE posterior (Hallo samples
    ``latent_dist``), scaled. With probability `start_ratio` the motion frames are blank instead (Hallo's start-frame
    augmentation: it zeroes their pixels before encoding, so the model also learns the first clip of a video, which
    has no frames before it). -> (latents [1, 4, f, h, w], motion latents [1, m, 4, h, w], frame slice)."""
    frames = sample["latents_mean"].shape[0]
    if frames < clip_frames + motion_frames:
        raise NarrateInputError("data", f"sample {sample['meta'].get('id', '?')} has {frames} frames; the video "
                                f"term needs {clip_frames} + {motion_frames} motion frames: prepare longer targets")
    start = int(torch.randint(motion_frames, frames - clip_frames + 1, ()))
    span = slice(start - motion_frames, start + clip_frames)
    mean, std = sample["latents_mean"][span], sample["latents_std"][span]
    drawn = (mean + std * torch.randn(mean.shape).to(mean)) * LATENT_SCALE
    target, motion = drawn[motion_frames:].transpose(0, 1)[None], drawn[:motion_frames]
    if start_ratio and float(torch.rand(())) < start_ratio:
        if "blank_latent_mean" not in sample:
            raise NarrateInputError("data", f"sample {sample['meta'].get('id', '?')} was prepared before the start-"
                                    "frame augmentation (no blank_latent_mean): prepare the dataset again, or "
                                    "train with start_ratio 0")
        mean, std = sample["blank_latent_mean"].expand_as(motion), sample["blank_latent_std"].expand_as(motion)
        motion = (mean + std * torch.randn(mean.shape).to(mean)) * LATENT_SCALE
    return target, motion[None], slice(start, start + clip_frames)


class NFYObjective(nn.Module):
    """``objective(samples) -> {"total", "video", "audio", <parts>}`` over a micro-batch (a list of loaded samples)."""

    def __init__(self, entangler: Entangler, xtts: nn.Module, hallo: Optional[nn.Module] = None, *,
                 loss_weights: Mapping[str, float], audio_weights: AudioLossWeights = AudioLossWeights(),
                 video_config=None, vocoder_window: Optional[int] = VOCODER_WINDOW,
                 vae_decode: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__()
        unknown = sorted(set(loss_weights) - {"audio", "video"})
        if unknown:
            raise ValueError(f"NFY's objective has the terms 'audio' and 'video', not {unknown}")
        self.entangler, self.xtts = entangler, xtts
        self.weights = dict(loss_weights)
        self.audio_weights, self.vocoder_window = audio_weights, vocoder_window
        self.video = None
        if "video" in self.weights:
            if hallo is None:
                raise ValueError("the video term needs a Hallo Net (or train with loss_weights audio=1 only)")
            self.video = video_loss
            self.video_config = video_config or self.video.VideoLossConfig()
            self.scheduler = self.video.make_train_scheduler()
            self.vae_decode = vae_decode
            self.hallo = hallo

    def _video_terms(self, samples, faces) -> dict[str, Tensor]:
        v, cfg = self.video, self.video_config
        batches = []
        for sample, face in zip(samples, faces):
            target, motion, span = video_window(sample, cfg.clip_frames, cfg.motion_frames, cfg.start_ratio)
            regions = [[sample[f"mask_{name}_{i}"].expand(cfg.clip_frames, -1)[None] for i in range(4)]
                       for name in ("full", "face", "lip")]
            plain = v.VideoBatch(latents=target,
                                 ref_latents=torch.cat([sample["portrait_latent_mean"][None] * LATENT_SCALE, motion], 1),
                                 face_embedding=sample["identity"].reshape(1, -1),
                                 face_region=sample["face_region"].expand(3, -1, -1)[None],
                                 audio=sample["audio_windows"][span][None], masks=regions)
            batches.append(v.entangled_batch(plain, face, LATENT_SCALE))
        batch = v.VideoBatch(*(torch.cat([getattr(b, k) for b in batches]) for k in
                               ("latents", "ref_latents", "face_embedding", "face_region", "audio")),
                             masks=[[torch.cat([b.masks[r][i] for b in batches]) for i in range(4)] for r in range(3)])
        out = v.video_training_step(self.hallo, batch, cfg, self.scheduler, vae_decode=self.vae_decode)
        terms = {"video": out.loss, "video_mse": out.mse}
        if out.pixel_l1 is not None:
            terms["video_pixel_l1"] = out.pixel_l1
        return terms

    def forward(self, samples: Sequence[Mapping]) -> dict[str, Tensor]:
        from .loop import weighted_total

        voices, faces = [], []
        for sample in samples:  # one at a time: the entangler has no padding mask for texts of other lengths
            voice, face = self.entangler(*entangler_inputs(sample))
            voices.append(voice)
            faces.append(face)
        losses = {}
        if "audio" in self.weights:
            a = audio_loss(self.xtts, _audio_batch(samples, voices), self.audio_weights,
                           vocoder_window=self.vocoder_window)
            losses.update(audio=a["total"], audio_text_ce=a["loss_text"], audio_mel_ce=a["loss_mel"])
            if "spectrogram_mse" in a:
                losses["audio_spectrogram_mse"] = a["spectrogram_mse"]
        if self.video is not None:
            losses.update(self._video_terms(samples, faces))
        return weighted_total(losses, self.weights)


# ----------------------------------------------------------------------------------------------- the training run
class DatasetSamples(Sequence):
    """Samples of a prepared dataset, read from their shards when the loop asks (epochs never re-run encoders)."""

    def __init__(self, dataset: Path, ids: Sequence[str]):
        self.dataset, self.ids = Path(dataset), list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        from .data import load_sample
        return load_sample(self.dataset, self.ids[index])


def make_entangler(init: Union[str, Path, Entangler, None], sample: Mapping, seed: int = 0) -> Entangler:
    """The entangler to train: 'ETE' / 'STE' at the identity initialisation (sized to the dataset's XTTS and VAE), a
    saved entangler file to continue from, or a module. The identity initialisation draws its attention weights
    from a generator seeded with `seed` (the run's): only the write-backs start at zero, so the rest of the draw
    shapes every step after the first, and the same seed must give the same run."""
    if isinstance(init, Entangler):
        return init
    if init is None or str(init).upper() in ("ETE", "STE"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Entangler(EntanglerConfig(mode=str(init or "ETE").upper(),
                                             gpt_dim=sample["gpt_cond_latent"].shape[-1],
                                             latent_channels=sample["portrait_latent_mean"].shape[1]))
    return load_entangler(str(init))


def build_objective(models: Mapping[str, nn.Module], config: TrainConfig, **kw) -> NFYObjective:
    """NFY's objective over loaded models {"entangler", "xtts", "hallo"?}, weighted by ``config.loss_weights``;
    the entangler trains, everything else is frozen and in eval mode (plus ``config.train_modules`` /
    ``lora_modules``)."""
    from .trainable import select_trainable

    objective = NFYObjective(models["entangler"], models["xtts"], models.get("hallo"),
                             loss_weights=config.loss_weights, **kw)
    extra = tuple(config.train_modules)
    select_trainable(objective, ["entangler", *extra] if extra else None, config.lora_modules, config.lora_rank,
                     config.lora_alpha)
    return objective


def _file_args(models_dir: Path, paths: Mapping[str, Optional[Path]]) -> Namespace:
    names = ("xtts", "dvae", "mel_stats", "vae", "wav2vec2", "landmarker", "identity_model")
    unknown = sorted(set(paths) - set(names) - {"hallo"})
    if unknown:
        raise ValueError(f"unknown model paths {unknown}; known: {names + ('hallo',)}")
    return Namespace(models_dir=models_dir, **{n: paths.get(n) for n in names})


def hallo_file(models_dir: Path, explicit: Optional[Path] = None) -> Path:
    if explicit is not None:
        candidates = [Path(explicit)]
    else:
        candidates = [Path(models_dir) / p for p in HALLO_PATHS]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        from ..errors import CheckpointError
        raise CheckpointError(f"Hallo's net not found at {' or '.join(map(str, candidates))}; pass --hallo")
    return found


def build_run(data_dir: Path, models_dir: Path, config: TrainConfig, *,
              paths: Optional[Mapping[str, Optional[Path]]] = None, entangler=None, video_config=None,
              vocoder_window: Optional[int] = VOCODER_WINDOW, device: Optional[str] = None) -> TrainingSetup:
    """Load the prepared dataset and the base models (the models folder's layout, or explicit ``paths`` by name:
    xtts, dvae, mel_stats, vae, wav2vec2, landmarker, identity_model, hallo), refuse a dataset made with other base
    checkpoints or without samples, choose what trains and build the objective."""
    from ..hallo.checkpoint import load_hallo
    from ..weights import sha256_file
    from ..xtts.checkpoint import load_xtts
    from .data import MANIFEST, check_base_checkpoints, dataset_info, load_sample, sample_ids
    from .prepare_cli import model_files

    data_dir, models_dir, paths = Path(data_dir), Path(models_dir), dict(paths or {})
    dataset_info(data_dir)  # a clear error when it is not a dataset
    ids = sample_ids(data_dir)
    if not ids:
        raise NarrateInputError("data", f"{data_dir} holds no accepted sample (see {data_dir / MANIFEST} for the "
                                        "reasons): prepare clips with a face, speech and a transcript")
    files = model_files(_file_args(models_dir, paths))
    hashes = {name: {"file": p.name, "sha256": sha256_file(p)} for name, p in files.items()}
    check_base_checkpoints(data_dir, hashes)

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    xtts, _ = load_xtts(files["xtts"].parent, device=device)
    models = {"xtts": xtts, "entangler": make_entangler(entangler, load_sample(data_dir, ids[0]), config.seed)}
    base = {name: h["sha256"] for name, h in hashes.items()}
    kw = dict(vocoder_window=vocoder_window)
    if "video" in config.loss_weights:
        net_path = hallo_file(models_dir, paths.get("hallo"))
        models["hallo"] = load_hallo(net_path).to(device)
        base["hallo"] = sha256_file(net_path)
        kw["video_config"] = video_config
        if video_config is not None and video_config.pixel_l1_weight:
            kw["vae_decode"] = _vae_decoder(files["vae"], device)
    objective = build_objective(models, config, **kw)
    train_ids = [i for n, i in enumerate(ids) if len(ids) < VAL_EVERY_NTH or n % VAL_EVERY_NTH != VAL_EVERY_NTH - 1]
    val_ids = [i for i in ids if i not in train_ids]
    return TrainingSetup(objective, objective, DatasetSamples(data_dir, train_ids), DatasetSamples(data_dir, val_ids),
                         manifest_sha256=sha256_file(data_dir / MANIFEST), base_checkpoints=base)


def _vae_decoder(path: Path, device) -> Callable[[Tensor], Tensor]:
    """The SD VAE's decoder with autograd (the pixel L1): unscaled latents [N, 4, h, w] -> pixels [N, H, W, 3]."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from .prepare_cli import SD_VAE_CONFIG

    sidecar = path.with_suffix(".json")
    vae = AutoencoderKL(**(json.loads(sidecar.read_text()) if sidecar.is_file() else SD_VAE_CONFIG))
    vae.load_state_dict(load_file(str(path)))
    vae = vae.to(device).eval().requires_grad_(False)

    def decode(latents: Tensor) -> Tensor:
        return (vae.decode(latents.to(vae.dtype)).sample.permute(0, 2, 3, 1) + 1).div(2).clamp(0, 1)
    return decode


__all__ = ["NFYObjective", "TrainingSetup", "build_objective", "build_run",
           "entangler_inputs", "make_entangler", "video_window"]

"""Hallo's speech features: wav2vec2 hidden states resampled to the video frame rate, in 5-frame windows.

Reproduces `AudioProcessor.preprocess` + `process_audio_emb` of Hallo: normalise the 16 kHz waveform, zero-pad it
to whole clips, run the wav2vec2 CNN, stretch its 50 Hz features linearly (align_corners=True) to one vector per
video frame, run the transformer encoder and keep every layer's output. Hallo's vocal separation (Kim_Vocal_2) is
not part of this stage: the speech we feed is synthesised, so there is nothing to separate.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, NarrateInputError
from ..progress import ProgressFn, report
from ..resample import resample

SAMPLE_RATE = 16000
WINDOW_RADIUS = 2  # Hallo's process_audio_emb: frames i-2 .. i+2
# A wav2vec2-for-CTC folder (facebook/wav2vec2-base-960h) also carries the CTC head, which the encoder does not use.
IGNORED_KEY_PREFIXES = ("lm_head.",)


@dataclass
class AudioFeatures:
    windows: torch.Tensor  # [F, 5, layers, C]; F = num_frames rounded up to whole clips
    fps: float | Fraction
    num_frames: int  # ceil(seconds * fps): the frames the video keeps
    seconds: float


def load_wav2vec(folder: str | Path):
    """The wav2vec2 encoder of a local transformers folder (config.json + weights), in eval mode.

    The feature extractor's `do_normalize` (preprocessor_config.json; True for wav2vec2-base-960h) is kept on the
    model's config, where `speech_features` reads it.
    """
    from transformers import Wav2Vec2Model

    folder = Path(folder)
    hint = ("put the facebook/wav2vec2-base-960h folder (config.json, model.safetensors or pytorch_model.bin, "
            "preprocessor_config.json) there")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"no wav2vec2 model at {folder}: config.json is missing; {hint}")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "wav2vec2":
        raise CheckpointError(f"{folder} holds a '{config.get('model_type')}' model, not wav2vec2; {hint}")
    try:
        model, info = Wav2Vec2Model.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                                    ignore_mismatched_sizes=True)  # reported below, by name
    except (OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"cannot load the wav2vec2 model in {folder}: {error}; {hint}") from error
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(IGNORED_KEY_PREFIXES))
    mis_shaped = [f"{key} {tuple(stored)} vs {tuple(wanted)}" for key, stored, wanted in info["mismatched_keys"]]
    problems = [(name, sorted(keys)) for name, keys in
                (("missing", info["missing_keys"]), ("unexpected", unexpected), ("mis-shaped", mis_shaped))]
    problems = [f"{len(keys)} {name} (e.g. {', '.join(keys[:4])})" for name, keys in problems if keys]
    if problems:
        raise CheckpointError(f"the wav2vec2 weights in {folder} do not match its config: {'; '.join(problems)}")
    extractor = folder / "preprocessor_config.json"
    model.config.do_normalize = json.loads(extractor.read_text()).get("do_normalize", True) \
        if extractor.is_file() else True
    return model.eval()


def mono_16k(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """[C,T] (or [T]) at any rate -> [T] float32 mono at 16 kHz (channel mean, as librosa.load(mono=True))."""
    if waveform.dim() == 3 and waveform.shape[0] == 1:
        waveform = waveform[0]
    if waveform.dim() == 1:
        waveform = waveform[None]
    if waveform.dim() != 2 or waveform.shape[-1] == 0:
        raise NarrateInputError("audio", f"expected a [channels, samples] waveform with samples, got shape "
                                         f"{tuple(waveform.shape)}; connect an AUDIO output with some speech")
    mono = waveform.float().mean(0)
    return resample(mono, sample_rate, SAMPLE_RATE)


def normalize(signal: torch.Tensor) -> torch.Tensor:
    """Wav2Vec2FeatureExtractor's zero-mean unit-variance normalisation (population variance, eps 1e-7)."""
    signal64 = signal.double()
    return ((signal64 - signal64.mean()) / torch.sqrt(signal64.var(unbiased=False) + 1e-7)).float()


def frame_count(samples: int, fps: float | Fraction) -> int:
    return math.ceil(Fraction(samples, SAMPLE_RATE) * Fraction(fps))


def pad_to_clips(signal: torch.Tensor, num_frames: int, fps: float | Fraction,
                 clip_length: int) -> tuple[torch.Tensor, int]:
    """Zero-pad the (normalised) signal by whole frames of 16000//fps samples up to a multiple of clip_length."""
    missing = -num_frames % clip_length
    samples_per_frame = int(SAMPLE_RATE // Fraction(fps))  # Hallo's integer self.sample_rate // self.fps
    return F.pad(signal, (0, missing * samples_per_frame)), num_frames + missing


def frame_aligned_cnn_features(model, input_values: torch.Tensor, frames: int) -> torch.Tensor:
    """CNN features [1,C,T50Hz] stretched to [1, frames, C] (Hallo's linear_interpolation, align_corners=True)."""
    cnn = model.feature_extractor(input_values)
    return F.interpolate(cnn, size=frames, mode="linear", align_corners=True).transpose(1, 2)


def encoder_layer_states(model, features: torch.Tensor, progress: ProgressFn = None) -> torch.Tensor:
    """Feature projection + transformer encoder; every layer's output (not the embedding) -> [frames, layers, C]."""
    layers = model.encoder.layers
    states: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        # Collected by hooks because transformers 5 returns hidden_states only from the top-level model call.
        states.append(output[0] if isinstance(output, tuple) else output)
        report(progress, len(states), len(layers))

    hooks = [layer.register_forward_hook(keep) for layer in layers]
    try:
        hidden, _ = model.feature_projection(features)
        last = model.encoder(hidden)[0]
    finally:
        for hook in hooks:
            hook.remove()
    states[-1] = last  # equal for post-LN encoders; stable-layer-norm encoders add their final LayerNorm here
    return torch.stack(states, dim=2)[0]


def frame_windows(per_frame: torch.Tensor, radius: int = WINDOW_RADIUS) -> torch.Tensor:
    """[F, ...] -> [F, 2r+1, ...]: frame i stacks frames i-r .. i+r, clamped at both ends."""
    frames = per_frame.shape[0]
    index = (torch.arange(frames)[:, None] + torch.arange(-radius, radius + 1)).clamp(0, frames - 1)
    return per_frame[index.to(per_frame.device)]


@torch.no_grad()
def speech_features(model, waveform: torch.Tensor, sample_rate: int, fps: float | Fraction = 25,
                    clip_length: int = 16, progress: ProgressFn = None) -> AudioFeatures:
    """Per-video-frame wav2vec2 windows for Hallo's audio projection, from any waveform [C,T] at any rate."""
    if fps <= 0 or clip_length <= 0:
        raise NarrateInputError("fps", f"fps ({fps}) and clip length ({clip_length}) must be positive")
    signal = mono_16k(waveform, sample_rate)
    seconds = signal.shape[0] / SAMPLE_RATE
    if getattr(model.config, "do_normalize", True):
        signal = normalize(signal)
    num_frames = frame_count(signal.shape[0], fps)
    padded, frames = pad_to_clips(signal, num_frames, fps, clip_length)
    parameter = next(model.parameters())
    input_values = padded[None].to(parameter.device, parameter.dtype)
    features = frame_aligned_cnn_features(model, input_values, frames)
    per_frame = encoder_layer_states(model, features, progress)
    return AudioFeatures(windows=frame_windows(per_frame), fps=fps, num_frames=num_frames, seconds=seconds)

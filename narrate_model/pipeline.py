"""The whole narration as plain Python: portrait + voice + text -> speech (24 kHz) -> features (16 kHz) -> video.

The stage nodes and the one-box Narrate node share these functions, so a graph of stage nodes and the one box give
the same result for the same inputs. The audio sets the timeline: the frame count is ceil(speech seconds x fps).

Long text is spoken in sentence chunks (XTTS's per-language limits) that are joined into one speech track; the video
is then generated over the whole track, clip after clip with motion frames carried across, so motion is continuous
across sentence boundaries. `narrate_to_mp4` streams: each finished clip is decoded and encoded into the .mp4 right
away, so memory does not grow with the length of the narration.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from itertools import accumulate
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F

from . import av
from .entangle import Entangler, EntanglerConfig, FaceConditioning, VoiceConditioning
from .hallo.audio import AudioFeatures, speech_features
from .hallo.face import FaceEncoding, encode_face
from .hallo.sampler import SamplerSettings, iter_video_clips
from .progress import ProgressFn, report
from .xtts.sampling import SamplingParams
from .xtts.speech import join_chunks, synthesize, vocode_chunks
from .xtts.text import TextTokens, tokenize
from .xtts.voice import VoiceProfile, encode_voice

VaeEncode = Callable[[torch.Tensor], torch.Tensor]  # IMAGE [N,H,W,3] 0..1 -> unscaled latents [N,4,h,w]
VaeDecode = Callable[[torch.Tensor], torch.Tensor]  # unscaled latents -> IMAGE


@dataclass
class NarrationModels:
    xtts: torch.nn.Module  # XttsModel
    tokenizer: object  # XttsTokenizer
    hallo: torch.nn.Module  # HalloNet
    wav2vec: torch.nn.Module
    vae_encode: VaeEncode
    vae_decode: VaeDecode
    landmarker: str
    identity_model: Optional[str] = None
    entangler: Union[Entangler, str, None] = None  # a trained entangler, "ETE"/"STE" (identity init) or None


@dataclass
class NarrationSettings:
    language: str = "en"
    fps: Fraction = Fraction(25)
    size: int = 512
    speech: SamplingParams = field(default_factory=SamplingParams)
    video: SamplerSettings = field(default_factory=SamplerSettings)
    max_voice_seconds: float = 30
    voice_chunk_seconds: float = 4


# --- the stages --------------------------------------------------------------------------------------------------

def prepare_face(image: torch.Tensor, landmarker: str, vae_encode: VaeEncode, size: int = 512,
                 identity_model: Optional[str] = None) -> FaceEncoding:
    """Face / landmark encoding plus the VAE reference latent of the square portrait at the video size."""
    face = encode_face(image, landmarker, identity_model)
    face.reference_latent = vae_encode(face.image(size)).float().cpu()
    return face


def latent_masks(face: FaceEncoding, height: int, width: int) -> torch.Tensor:
    """The face and lip masks at latent resolution [1, 2, h, w] (what the entangler tags face patches with)."""
    masks = [torch.from_numpy(face.blurred[name]).float().div(255)[None, None] for name in ("face", "lip")]
    return F.interpolate(torch.cat(masks, 1), size=(height, width), mode="bilinear", align_corners=False)


def identity_entangler(voice: VoiceProfile, face: FaceEncoding, mode: str = "ETE") -> Entangler:
    """An entangler at its identity initialisation, sized to this voice and face (no trained NFY weights exist)."""
    config = EntanglerConfig(mode=mode, gpt_dim=voice.gpt_cond_latent.shape[-1],
                             latent_channels=face.reference_latent.shape[1])
    return Entangler(config).eval()


def entangle(entangler: Entangler, voice: VoiceProfile, face: FaceEncoding,
             tokens: TextTokens) -> tuple[VoiceProfile, FaceEncoding]:
    """NFY's dual entanglement: voice and face conditioning refined by each other and by the text."""
    device = next(entangler.parameters()).device
    ref = face.reference_latent.to(device)
    identity = face.identity if face.identity is not None else torch.zeros(512)
    text_ids = torch.tensor([i for chunk in tokens.ids for i in chunk], dtype=torch.long, device=device)
    v, f = entangler(VoiceConditioning(voice.gpt_cond_latent.to(device), voice.speaker_embedding.to(device)),
                     FaceConditioning(ref, latent_masks(face, *ref.shape[-2:]).to(device), identity.to(device)),
                     text_ids)
    new_voice = replace(voice, gpt_cond_latent=v.cond_latents.cpu(), speaker_embedding=v.speaker_embedding.cpu())
    new_face = replace(face, reference_latent=f.reference_latent.cpu(), identity=f.identity.cpu())
    return new_voice, new_face


def speak(xtts, tokens: TextTokens, voice: VoiceProfile, params: SamplingParams,
          progress: ProgressFn = None) -> tuple[dict, list[float]]:
    """Text chunks -> one 24 kHz AUDIO track in the voice, and the second at which each chunk starts."""
    speech = synthesize(xtts, tokens, voice, params, progress)
    pieces = vocode_chunks(xtts, speech, voice)
    rate = speech.sample_rate
    starts = [n / rate for n in accumulate((p.numel() for p in pieces[:-1]), initial=0)]
    return {"waveform": join_chunks(pieces, rate).view(1, 1, -1), "sample_rate": rate}, starts


def listen(wav2vec, audio: dict, fps, progress: ProgressFn = None) -> AudioFeatures:
    """Speech -> per-frame wav2vec2 windows. The frame count is ceil(seconds x fps) of the audio as given (not of
    its 16 kHz resampling, whose length can round up by a sample)."""
    waveform, rate = audio["waveform"][0], audio["sample_rate"]
    features = speech_features(wav2vec, waveform, rate, av.exact_fps(fps), progress=progress)
    return replace(features, num_frames=av.frame_count(waveform.shape[-1], rate, fps))


def animate(hallo, face: FaceEncoding, features: AudioFeatures, settings: SamplerSettings, vae_encode: VaeEncode,
            vae_decode: VaeDecode, progress: ProgressFn = None) -> Iterator[torch.Tensor]:
    """Video latents clip by clip (unscaled, [f, 4, h, w] on the CPU), as many frames as the audio needs."""
    if face.reference_latent is None:
        raise ValueError("the face has no reference latent: encode the portrait with the VAE first")
    size = face.reference_latent.shape[-1] * 8
    return iter_video_clips(hallo, face.sampler_inputs(size), features.windows[:features.num_frames],
                            face.reference_latent, settings, vae_encode=vae_encode, vae_decode=vae_decode,
                            progress=progress)


# --- the whole narration -----------------------------------------------------------------------------------------

@dataclass
class Narration:
    path: str
    audio: dict  # the 24 kHz speech (AUDIO)
    frames: int
    fps: Fraction
    chunks: int  # sentence chunks spoken
    chunk_starts: list[float]  # the second at which each chunk's speech starts


def narrate_to_mp4(models: NarrationModels, image: torch.Tensor, voice_clips: list, text: str, path: str,
                   settings: NarrationSettings = NarrationSettings(), progress: ProgressFn = None,
                   crf: int = 19) -> Narration:
    """Portrait + voice clips [(waveform [C,T], rate)] + text -> an .mp4 with the cloned speech, streamed to disk.

    Progress runs over speech codes, then denoising steps, then encoded frames (each stage's own totals)."""
    voice = encode_voice(models.xtts, voice_clips, length_s=settings.max_voice_seconds,
                         chunk_s=settings.voice_chunk_seconds, max_ref_s=settings.max_voice_seconds)
    face = prepare_face(image, models.landmarker, models.vae_encode, settings.size, models.identity_model)
    tokens = tokenize(models.tokenizer, text, settings.language)
    if models.entangler is not None:
        entangler = models.entangler
        if isinstance(entangler, str):
            entangler = identity_entangler(voice, face, entangler)
        voice, face = entangle(entangler, voice, face, tokens)
    audio, chunk_starts = speak(models.xtts, tokens, voice, settings.speech, progress)
    features = listen(models.wav2vec, audio, settings.fps)
    clips = animate(models.hallo, face, features, settings.video, models.vae_encode, models.vae_decode, progress)
    decoded = (models.vae_decode(latents) for latents in clips)
    av.write_mp4(path, decoded, settings.fps, audio["waveform"][0], audio["sample_rate"],
                 total_frames=features.num_frames, crf=crf)
    report(progress, 1, 1)
    return Narration(path, audio, features.num_frames, av.exact_fps(settings.fps), len(chunk_starts), chunk_starts)

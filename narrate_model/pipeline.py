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
from .errors import NarrateInputError
from .progress import ProgressFn, checked, report
from .xtts.sampling import SamplingParams
from .xtts.speech import join_chunks, synthesize, vocode_chunks
from .xtts.text import TextTokens, tokenize
from .xtts.voice import VoiceProfile, encode_voice

DECODE_BATCH = 4  # frames decoded at a time while streaming: a Cancel check (and a written frame) between batches
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
    decode_batch: int = DECODE_BATCH  # frames decoded at a time: bounds the decoder's memory at any video length


# --- the stages --------------------------------------------------------------------------------------------------

def check_size(size: int) -> None:
    """The video side must be a multiple of 64: the sampler's masks and latents are built on a 1/64 grid (the
    widgets step by 64, but the HTTP API accepts any number, which would fail late with a mask-shape error)."""
    if size < 64 or size % 64:
        raise NarrateInputError("size", f"the video size {size} is not a multiple of 64; use e.g. "
                                        f"{max(64, size // 64 * 64)}")


def prepare_face(image: torch.Tensor, landmarker: str, vae_encode: VaeEncode, size: int = 512,
                 identity_model: Optional[str] = None, progress: ProgressFn = None) -> FaceEncoding:
    """Face / landmark encoding plus the VAE reference latent of the square portrait at the video size."""
    check_size(size)
    report(progress, 0, 2)
    face = encode_face(image, landmarker, identity_model)
    report(progress, 1, 2)
    face.reference_latent = vae_encode(face.image(size)).float().cpu()
    report(progress, 2, 2)
    return face


def latent_masks(face: FaceEncoding, height: int, width: int) -> torch.Tensor:
    """The face and lip masks at latent resolution [1, 2, h, w] (what the entangler tags face patches with)."""
    masks = [torch.from_numpy(face.blurred[name]).float().div(255)[None, None] for name in ("face", "lip")]
    return F.interpolate(torch.cat(masks, 1), size=(height, width), mode="bilinear", align_corners=False)


def identity_entangler(voice: VoiceProfile, face: FaceEncoding, mode: str = "ETE",
                       device: Union[str, torch.device, None] = None) -> Entangler:
    """An entangler at its identity initialisation, sized to this voice and face (no trained NFY weights exist)."""
    config = EntanglerConfig(mode=mode, gpt_dim=voice.gpt_cond_latent.shape[-1],
                             latent_channels=face.reference_latent.shape[1])
    return Entangler(config).to(device).eval()


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
    pieces = vocode_chunks(xtts, speech, voice, progress)
    rate = speech.sample_rate
    starts = [n / rate for n in accumulate((p.numel() for p in pieces[:-1]), initial=0)]
    return {"waveform": join_chunks(pieces, rate).view(1, 1, -1), "sample_rate": rate}, starts


def listen(wav2vec, audio: dict, fps, progress: ProgressFn = None) -> AudioFeatures:
    """Speech -> per-frame wav2vec2 windows. The frame count is ceil(seconds x fps) of the audio as given (not of
    its 16 kHz resampling, whose length can round up by a sample)."""
    waveform, rate = audio["waveform"][0], audio["sample_rate"]
    with checked(wav2vec, progress) as progress:  # one pass over the whole speech: checked between its layers
        features = speech_features(wav2vec, waveform, rate, av.exact_fps(fps), progress=progress)
    return replace(features, num_frames=av.frame_count(waveform.shape[-1], rate, fps))


def animate(hallo, face: FaceEncoding, features: AudioFeatures, settings: SamplerSettings, vae_encode: VaeEncode,
            vae_decode: VaeDecode, progress: ProgressFn = None) -> Iterator[torch.Tensor]:
    """Video latents clip by clip (unscaled, [f, 4, h, w] on the CPU), as many frames as the audio needs."""
    if face.reference_latent is None:
        raise ValueError("the face has no reference latent: encode the portrait with the VAE first")
    size = face.reference_latent.shape[-1] * 8
    with checked(hallo, progress) as progress:  # a denoising step is one long pass: checked between its blocks
        yield from iter_video_clips(hallo, face.sampler_inputs(size), features.windows[:features.num_frames],
                                    face.reference_latent, settings, vae_encode=vae_encode,
                                    vae_decode=vae_decode, progress=progress)


# --- the whole narration -----------------------------------------------------------------------------------------

@dataclass
class Narration:
    path: str
    audio: dict  # the 24 kHz speech (AUDIO)
    frames: int
    fps: Fraction
    chunks: int  # sentence chunks spoken
    chunk_starts: list[float]  # the second at which each chunk's speech starts
    notes: list[str] = field(default_factory=list)  # what the stage nodes would show: voice, face and text notes


def narrate_to_mp4(models: NarrationModels, image: torch.Tensor, voice_clips: list, text: str, path: str,
                   settings: NarrationSettings = NarrationSettings(), progress: ProgressFn = None,
                   crf: int = 19) -> Narration:
    """Portrait + voice clips [(waveform [C,T], rate)] + text -> an .mp4 with the cloned speech, streamed to disk.

    Progress runs over each stage in turn with the stage's own totals (voice, face, speech codes, vocoder chunks,
    speech-feature layers, denoising steps, encoded frames), and is called often enough inside every stage that a
    caller's Cancel check in it stops the narration within a fraction of a second."""
    tokens = tokenize(models.tokenizer, text, settings.language)  # first: a bad text fails before any model runs
    check_size(settings.size)
    with checked(models.xtts, progress) as voice_progress:
        voice = encode_voice(models.xtts, voice_clips, length_s=settings.max_voice_seconds,
                             chunk_s=settings.voice_chunk_seconds, max_ref_s=settings.max_voice_seconds)
    report(voice_progress, 1, 1)
    face = prepare_face(image, models.landmarker, models.vae_encode, settings.size, models.identity_model, progress)
    if models.entangler is not None:
        entangler = models.entangler
        if isinstance(entangler, str):  # built on the compute device, beside the other models
            entangler = identity_entangler(voice, face, entangler, next(models.hallo.parameters()).device)
        voice, face = entangle(entangler, voice, face, tokens)
    audio, chunk_starts = speak(models.xtts, tokens, voice, settings.speech, progress)
    features = listen(models.wav2vec, audio, settings.fps, progress)
    clips = animate(models.hallo, face, features, settings.video, models.vae_encode, models.vae_decode, progress)
    decoded = (models.vae_decode(part) for latents in clips for part in latents.split(settings.decode_batch))
    try:
        av.write_mp4(path, decoded, settings.fps, audio["waveform"][0], audio["sample_rate"],
                     total_frames=features.num_frames, crf=crf, progress=progress)
    finally:
        clips.close()  # if writing stopped early: unhooks the Cancel checks from the video model now, not at GC
    notes = voice.warnings + face_notes(face) + tokens.warnings
    return Narration(path, audio, features.num_frames, av.exact_fps(settings.fps), len(chunk_starts), chunk_starts,
                     notes)


def face_notes(face: FaceEncoding) -> list[str]:
    """What Face Encode shows about the portrait (the one-box Narrate shows the same)."""
    return [f"{face.faces_found} face(s) found"] + face.notes

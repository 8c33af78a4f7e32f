"""The whole dialogue as plain Python: speakers + script -> one .mp4 (+ the track, per-speaker stems and an SRT).

1. Everything the user typed is checked first (script, cast, layout, size, every turn's text), so a bad input fails
   before any model runs.
2. Each turn is spoken in its speaker's voice, language and speed (with the narration's sentence chunking), and the
   turns are placed on one track `gap` seconds apart (timeline.py).
3. The video is streamed: every visible speaker has one continuous Hallo run (one seed, motion frames carried from
   clip to clip, so motion flows on across that speaker's turns), and the runs advance together a few frames at a
   time into the .mp4. A run's audio features are computed a turn at a time as the sampler reaches them, so memory
   does not grow with the number of turns.
   - cut: only the active speaker is generated; a speaker's run covers the frames of its own turns back to back.
   - side_by_side / grid: every speaker's run covers the whole video, driven by that speaker's stem, so a listener
     is animated from silence (Hallo's idle head motion) while the others talk.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Iterator, Optional

import torch

from .. import av, pipeline
from ..errors import NarrateInputError
from ..hallo.face import FaceEncoding, encode_face
from ..hallo.sampler import SamplerSettings, iter_video_clips
from ..progress import ProgressFn, checked, report
from ..xtts.sampling import SamplingParams
from ..xtts.text import tokenize
from ..xtts.voice import VoiceProfile, encode_voice
from . import compose
from .script import MAX_SPEAKERS, Turn, parse_script
from .timeline import Timeline, audible_span, mix, place, srt

DECODE_BATCH = pipeline.DECODE_BATCH


@dataclass
class Speaker:
    """One person of the dialogue (what flows on an NFY_SPEAKER socket): the encodings are made once per speaker."""
    name: str
    face: FaceEncoding  # without a reference latent: the dialogue encodes it at its own video size
    voice: VoiceProfile
    language: str = "en"
    speed: float = 1.0
    notes: list[str] = field(default_factory=list)


def encode_speaker(xtts, name: str, image: torch.Tensor, voice_clips: list, landmarker: str,
                   identity_model: Optional[str] = None, language: str = "en", speed: float = 1.0,
                   max_voice_seconds: float = 30, voice_chunk_seconds: float = 4) -> Speaker:
    """The face and voice encodings of one speaker: Face Encode's and Voice Profile Encode's own functions."""
    name = (name or "").strip()
    if not name or ":" in name:
        raise NarrateInputError("name", f"{name!r} cannot name a speaker: give the name the script uses before "
                                        "the colon, e.g. ALICE")
    if not 0.25 <= speed <= 4:
        raise NarrateInputError("speed", f"{speed:g} is outside 0.25-4 (1 = natural)")
    face = encode_face(image, landmarker, identity_model)
    voice = encode_voice(xtts, voice_clips, length_s=max_voice_seconds, chunk_s=voice_chunk_seconds,
                         max_ref_s=max_voice_seconds)
    return Speaker(name, face, voice, language, speed, voice.warnings + pipeline.face_notes(face))


@dataclass
class DialogueModels:
    xtts: torch.nn.Module
    tokenizer: object
    hallo: torch.nn.Module
    wav2vec: torch.nn.Module
    vae_encode: pipeline.VaeEncode
    vae_decode: pipeline.VaeDecode
    vae_module: Optional[torch.nn.Module] = None  # the network behind the VAE callables: Cancel is checked inside it


@dataclass
class DialogueSettings:
    layout: str = "side_by_side"
    gap: float = 0.3  # seconds of silence between two turns
    fps: Fraction = Fraction(25)
    size: int = 512  # the side of each speaker's square panel
    speech: SamplingParams = field(default_factory=SamplingParams)
    video: SamplerSettings = field(default_factory=SamplerSettings)


@dataclass
class Dialogue:
    path: str
    audio: dict  # the whole track (AUDIO, 24 kHz)
    stems: list[dict]  # per speaker, in cast order: that speaker's turns alone (AUDIO)
    srt: str
    frames: int
    fps: Fraction
    timeline: Timeline
    notes: list[str] = field(default_factory=list)


# --- checks before anything runs ---------------------------------------------------------------------------------

def cast_of(speakers: list[Speaker], turns: list[Turn]) -> list[int]:
    """The speaker index of every turn, after checking the cast: 1-6 speakers with distinct names, and every name
    the script uses among them (names match regardless of case)."""
    if not speakers:
        raise NarrateInputError("speakers", "no speaker is connected; connect a Speaker node per person")
    if len(speakers) > MAX_SPEAKERS:
        raise NarrateInputError("speakers", f"{len(speakers)} speakers given; a dialogue has at most {MAX_SPEAKERS}")
    index: dict[str, int] = {}
    for i, speaker in enumerate(speakers):
        key = speaker.name.casefold()
        if key in index:
            raise NarrateInputError("speakers", f"two speakers are named {speaker.name!r} (speaker {index[key] + 1} "
                                                f"and {i + 1}); give each a different name")
        index[key] = i
    known = ", ".join(s.name for s in speakers)
    for turn in turns:
        if turn.speaker.casefold() not in index:
            raise NarrateInputError("script", f"line {turn.line}: no speaker named {turn.speaker!r}; the speakers "
                                              f"are {known}")
    return [index[turn.speaker.casefold()] for turn in turns]


def check_settings(settings: DialogueSettings) -> None:
    compose.check_layout(settings.layout)
    pipeline.check_size(settings.size)
    av.exact_fps(settings.fps)
    if not 0 <= settings.gap <= 10:
        raise NarrateInputError("gap", f"{settings.gap:g} s is outside 0-10 s")


# --- video streaming ---------------------------------------------------------------------------------------------

class WindowsOnDemand:
    """One speaker's per-frame wav2vec windows, as the sampler slices them, computed a piece (a turn's frames) at a
    time and dropped once the sampler has moved past them. Stands in for the windows tensor: `shape`, `dim()` and
    forward slicing are all the clip loop uses."""

    def __init__(self, wav2vec, pieces: list[tuple[torch.Tensor, int]], sample_rate: int, fps: Fraction,
                 progress: ProgressFn):
        self.wav2vec, self.pieces, self.rate, self.fps, self.progress = wav2vec, pieces, sample_rate, fps, progress
        self.starts = [0]
        for _, frames in pieces:
            self.starts.append(self.starts[-1] + frames)
        self.cache: dict[int, torch.Tensor] = {}
        self.shape = torch.Size([self.starts[-1], *self._windows(0).shape[1:]])

    def dim(self) -> int:
        return len(self.shape)

    def _windows(self, i: int) -> torch.Tensor:
        if i not in self.cache:
            waveform, frames = self.pieces[i]
            features = pipeline.listen(self.wav2vec, {"waveform": waveform[None], "sample_rate": self.rate},
                                       self.fps, self.progress)
            windows = features.windows[:frames]
            if windows.shape[0] < frames:  # a frame's rounding at the piece's end
                windows = torch.cat([windows, windows[-1:].expand(frames - windows.shape[0], *windows.shape[1:])])
            self.cache[i] = windows
        return self.cache[i]

    def __getitem__(self, key: slice) -> torch.Tensor:
        start, stop, step = key.indices(self.shape[0])
        assert step == 1, "the clip loop slices forward"
        parts = []
        for i, (a, b) in enumerate(zip(self.starts, self.starts[1:])):
            if a < stop and b > start:
                parts.append(self._windows(i)[max(start, a) - a:min(stop, b) - a])
        for i in [i for i in self.cache if self.starts[i + 1] <= start]:
            del self.cache[i]  # behind the sampler for good
        return torch.cat(parts)


class SpeakerFrames:
    """One speaker's Hallo run as decoded frames on demand; a clip's frames not yet shown wait for the next call."""

    def __init__(self, clips: Iterator[torch.Tensor], decode: pipeline.VaeDecode):
        self.clips, self.decode, self.pending = clips, decode, None

    def take(self, n: int) -> torch.Tensor:
        parts, have = [], 0
        while have < n:
            if self.pending is None or not len(self.pending):
                self.pending = next(self.clips)
            part, self.pending = self.pending[:n - have], self.pending[n - have:]
            parts.append(part)
            have += len(part)
        return self.decode(torch.cat(parts))

    def close(self) -> None:
        self.clips.close()


def speaker_pieces(layout: str, timeline: Timeline, track: torch.Tensor, stems: torch.Tensor, speaker: int,
                   fps: Fraction) -> list[tuple[torch.Tensor, int]]:
    """The audio (views of the track or the stem) and frame count of each piece of one speaker's run."""
    rate = timeline.sample_rate
    pieces = []
    for turn, a, b in timeline.segments(fps):
        if layout == "cut" and timeline.turns[turn].speaker != speaker:
            continue
        source = track if layout == "cut" else stems[speaker:speaker + 1]
        start, end = av.samples_for_frames(a, rate, fps), av.samples_for_frames(b, rate, fps)
        pieces.append((source[:, start:min(end, timeline.samples)], b - a))
    return pieces


# --- the whole dialogue ------------------------------------------------------------------------------------------

def dialogue_to_mp4(models: DialogueModels, speakers: list[Speaker], script: str, path: str,
                    settings: DialogueSettings = DialogueSettings(), progress: ProgressFn = None,
                    crf: int = 19) -> Dialogue:
    """Speakers + script -> an .mp4 streamed to disk. Progress runs over the turns' speech, then over the frames
    written; Cancel is checked inside every model pass as in the narration."""
    items = parse_script(script)
    turns = [item for item in items if isinstance(item, Turn)]
    who = cast_of(speakers, turns)
    check_settings(settings)
    fps = av.exact_fps(settings.fps)
    tokens = []
    for turn, i in zip(turns, who):
        try:
            tokens.append(tokenize(models.tokenizer, turn.text, speakers[i].language))
        except NarrateInputError as error:
            raise NarrateInputError("script", f"line {turn.line} ({speakers[i].name}): {error.message}") from error

    speeches, rate = [], None
    with checked(models.xtts, progress, 0, len(turns)) as tracked:
        for n, (text, i) in enumerate(zip(tokens, who)):
            params = replace(settings.speech, speed=speakers[i].speed * settings.speech.speed,
                             seed=settings.speech.seed + n)
            audio, _ = pipeline.speak(models.xtts, text, speakers[i].voice, params,
                                      lambda done, total, n=n: report(tracked, n, len(turns)))
            speeches.append(audio["waveform"].reshape(-1))
            rate = audio["sample_rate"]
            report(tracked, n + 1, len(turns))
    timeline = place(items, who, [s.numel() for s in speeches], [audible_span(s) for s in speeches], rate,
                     settings.gap)
    track, stems = mix(timeline, speeches, len(speakers))
    del speeches
    total = timeline.frames(fps)

    layout, size = settings.layout, settings.size
    visible = sorted(set(who)) if layout == "cut" else range(len(speakers))
    sources: dict[int, SpeakerFrames] = {}
    watched = [models.hallo, models.wav2vec] + ([models.vae_module] if models.vae_module is not None else [])
    with checked(watched, progress, 0, total) as tracked:
        for i in visible:
            face = replace(speakers[i].face, reference_latent=models.vae_encode(speakers[i].face.image(size))
                           .float().cpu())
            windows = WindowsOnDemand(models.wav2vec, speaker_pieces(layout, timeline, track, stems, i, fps), rate,
                                      fps, tracked)
            sources[i] = SpeakerFrames(iter_video_clips(
                models.hallo, face.sampler_inputs(size), windows, face.reference_latent, settings.video,
                vae_encode=models.vae_encode, vae_decode=models.vae_decode), models.vae_decode)

        def frames() -> Iterator[torch.Tensor]:
            if layout == "cut":
                for turn, a, b in timeline.segments(fps):
                    for f in range(a, b, DECODE_BATCH):
                        yield sources[timeline.turns[turn].speaker].take(min(DECODE_BATCH, b - f))
                return
            for f in range(0, total, DECODE_BATCH):
                n = min(DECODE_BATCH, total - f)
                panels = [sources[i].take(n) for i in range(len(speakers))]
                yield compose.compose(layout, panels, size, [timeline.active_at(k, fps) for k in range(f, f + n)])

        try:
            av.write_mp4(path, frames(), fps, track, rate, total_frames=total, crf=crf, progress=tracked)
        finally:
            for source in sources.values():
                source.close()
    names = [s.name for s in speakers]
    stem_audio = [{"waveform": stems[i].view(1, 1, -1).clone(), "sample_rate": rate} for i in range(len(speakers))]
    notes = [f"{s.name}: {note}" for s in speakers for note in s.notes] + \
            [f"{speakers[i].name}, line {t.line}: {w}" for t, i, x in zip(turns, who, tokens) for w in x.warnings]
    return Dialogue(path, {"waveform": track.view(1, 1, -1), "sample_rate": rate}, stem_audio,
                    srt(timeline, names), total, fps, timeline, notes)

"""Training data: talking-head videos -> cached samples (safetensors shards) + a manifest, so epochs never re-run the
frozen encoders.

Each clip becomes one sample, as in NFY:
* the *target* is the clip from its start (capped by `max_seconds`): speech at 24 kHz, frames at 25 fps through
  Hallo's crop (a square around the portrait's face) at the training size;
* the *voice profile* is the last `voice_seconds` of the same clip's audio, after the target, never overlapping it;
* the *portrait* is the first frame with a face; its face / lip masks and identity are the sample's face side
  (the masks are the portrait's, as the pack computes them at inference; Hallo's own data preprocessing instead
  unions the face / lip boxes over every frame of a clip);
* the *text* is the transcript (`NAME.srt` cues that fall in the target, or an untimed `NAME.txt` / samples.json text,
  which describes the whole clip: the manifest says which, `text_covers`).

Cached per sample: VAE latent moments of the target frames and of the portrait (mean and std, so training can draw
`latent_dist.sample()` as Hallo does), wav2vec2 windows per frame, DVAE codes of the target speech (GPT targets),
the XTTS conditioning mel of the voice segment plus its frozen conditioning latents and speaker embedding, the
region masks and face-locator image, and the BPE text ids. `dataset.json` records the settings and the SHA-256 of
every base checkpoint used; training refuses a dataset made with other checkpoints (`check_base_checkpoints`).

`load_sample(dataset, id)` returns (F target frames, S = settings.size, h = S/8; float32 unless noted):
  latents_mean, latents_std [F,4,h,h] and portrait_latent_mean/_std [1,4,h,h]   unscaled VAE moments
  blank_latent_mean/_std [1,4,h,h]      unscaled VAE moments of an all-zero frame in Hallo's [-1, 1] pixels (mid
                                        grey): the motion frames of Hallo's start-frame augmentation (start_ratio)
  audio_windows [F,5,layers,C]          wav2vec2 windows (Hallo's audioproj input)
  target_wav_24k [F*960]                target speech (the HiFi-GAN spectrogram loss)
  dvae_codes int64 [N]                  GPT audio targets, N = ceil(target samples at 22.05 kHz / 1024)
  cond_mel [80,T] (cloning mel of the voice), gpt_cond_latent [32,C_gpt], speaker_embedding [512]
  text_ids int64 [n]                    tokenizer.encode(text, language), no start/stop ids
  face_region [1,S,S] (face-locator image, one channel of three equal ones), identity [512], landmarks [478,2]
  mask_{full,face,lip}_{0..3} [1, (S/8/2^i)^2]   Hallo's region masks at the four UNet levels
  meta: text, text_covers ("target" | "clip"), target / voice spans in s, frames, crop, source, ...

A bad file never stops the run: it gets a manifest row with a reason from SKIP_REASONS. A rerun skips finished
clips (each shard is written to a temporary name and renamed, so a shard that exists is complete) and unchanged
files rejected for a reason a rerun cannot change.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import av
import numpy as np
import torch
from PIL import Image

from ..errors import NarrateInputError
from ..progress import ProgressFn, report
from ..resample import resample

FORMAT = 1
FPS = 25
TARGET_RATE = 24000
DVAE_RATE = 22050
MIN_TARGET_SECONDS = 1.0
QUIET_RMS = 1e-3  # -60 dBFS: below this a segment holds no usable speech
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".flv", ".mpg", ".mpeg", ".ts", ".wmv"}
SKIP_REASONS = ("no_face", "no_audio_stream", "too_short", "too_quiet", "transcript_missing", "unreadable")
MANIFEST, DATASET_INFO, SAMPLES_DIR = "manifest.jsonl", "dataset.json", "samples"
VAE_BATCH = 8
# Verdicts that depend only on the file, the settings and the models (all fixed for a dataset): a rerun keeps them
# while the file is unchanged. A missing transcript is looked for again (the user may have added one).
FINAL_REASONS = ("no_face", "no_audio_stream", "too_short", "too_quiet", "unreadable")

# What a malformed file can raise past the checks (odd streams, decoder corner cases, broken media); any of these
# marks the one file unreadable instead of stopping the run.
DECODE_ERRORS = (av.error.FFmpegError, OSError, ValueError, RuntimeError, IndexError, EOFError)
VaeMoments = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # IMAGE [N,H,W,3] -> (mean, std) unscaled


class Skip(Exception):
    """A clip that cannot become a sample; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class PrepareSettings:
    size: int = 512  # training resolution of the frames (a multiple of 64)
    voice_seconds: float = 2.0  # the paper's voice-profile length; 3-6 s clones better
    max_seconds: Optional[float] = None  # cap on the target length (None: the rest of the clip)
    language: str = "en"

    def check(self) -> None:
        from ..xtts.text import char_limit

        char_limit(self.language)  # raises NarrateInputError("language", ...) for a language XTTS-v2 lacks
        if self.size < 64 or self.size % 64:
            raise NarrateInputError("size", f"{self.size} is not a multiple of 64 (>= 64); use 512 as Hallo trains")
        if not 0.5 <= self.voice_seconds <= 30:
            raise NarrateInputError("voice-seconds", f"{self.voice_seconds} s is outside 0.5-30 s; use 2-6 s")
        if self.max_seconds is not None and self.max_seconds < MIN_TARGET_SECONDS:
            raise NarrateInputError("max-seconds", f"{self.max_seconds} s leaves no target; use at least "
                                                   f"{MIN_TARGET_SECONDS} s")


@dataclass
class PrepareModels:
    """The frozen encoders, loaded (see prepare_cli.load_models), and the SHA-256 of every file they came from."""
    xtts: torch.nn.Module  # XttsModel: mel_stats, conditioning encoder + perceiver, speaker encoder
    tokenizer: object  # XttsTokenizer
    dvae: torch.nn.Module  # DiscreteVAE
    mel_norms: torch.Tensor  # the DVAE's [80] norms (mel_stats.pth)
    vae_moments: VaeMoments
    wav2vec: torch.nn.Module
    landmarker: str
    checkpoints: dict[str, dict] = field(default_factory=dict)  # name -> {"file": ..., "sha256": ...}
    identity_model: Optional[str] = None


# ----------------------------------------------------------------------------------------------------------- media
def _open(path: Path):
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise Skip("unreadable", f"PyAV cannot open it ({type(error).__name__}: {str(error)[:120]})") from error


def read_audio(path: Path) -> tuple[torch.Tensor, int]:
    """The first audio stream as mono float32 [T] (channel mean) at its own rate."""
    with _open(path) as container:
        if not container.streams.audio:
            raise Skip("no_audio_stream", "the file has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.rate or stream.codec_context.sample_rate
        to_float = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=rate)
        chunks = []
        try:
            for frame in container.decode(stream):
                for out in to_float.resample(frame):
                    chunks.append(out.to_ndarray())
        except av.error.FFmpegError as error:
            raise Skip("unreadable", f"the audio does not decode ({str(error)[:120]})") from error
    if not chunks:
        raise Skip("too_short", "the audio stream holds no samples")
    return torch.from_numpy(np.concatenate(chunks, axis=1)).mean(0), int(rate)


def video_seconds(path: Path) -> float:
    with _open(path) as container:
        if not container.streams.video:
            raise Skip("unreadable", "the file has no video stream")
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if container.duration is not None:
            return container.duration / av.time_base
    return math.inf  # unknown: the audio decides


def frames_at_fps(path: Path, count: int, fps: int = FPS) -> Iterator[np.ndarray]:
    """The first `count` frames at `fps` as RGB uint8 [H, W, 3]: for each output time, the decoded frame nearest to
    it (a source at `fps` passes through unchanged)."""
    if count <= 0:
        return
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or fps)
        k, previous = 0, None
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else i / rate
                picture = frame.to_ndarray(format="rgb24")
                while k < count and t >= k / fps:
                    use_previous = previous is not None and (k / fps - previous[0]) < (t - k / fps)
                    yield previous[1] if use_previous else picture
                    k += 1
                if k >= count:
                    return
                previous = (t, picture)
        except av.error.FFmpegError as error:
            raise Skip("unreadable", f"the video does not decode ({str(error)[:120]})") from error
    while k < count and previous is not None:  # the stream ended a little early: hold the last frame
        yield previous[1]
        k += 1


# ------------------------------------------------------------------------------------------------------ transcripts
_SRT_TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)\s*-->\s*(\d+):(\d+):(\d+)[,.](\d+)")


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """SubRip cues as (start s, end s, text)."""
    cues = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n").strip()):
        lines = block.strip().split("\n")
        for i, line in enumerate(lines):
            match = _SRT_TIME.search(line)
            if match:
                h1, m1, s1, f1, h2, m2, s2, f2 = match.groups()
                start = int(h1) * 3600 + int(m1) * 60 + int(s1) + int(f1) / 10 ** len(f1)
                end = int(h2) * 3600 + int(m2) * 60 + int(s2) + int(f2) / 10 ** len(f2)
                words = " ".join(part.strip() for part in lines[i + 1:] if part.strip())
                words = re.sub(r"<[^>]+>", "", words)  # styling tags
                if words:
                    cues.append((start, end, words))
                break
    return cues


@dataclass
class Transcript:
    text: str
    cues: Optional[list[tuple[float, float, str]]] = None  # timed (.srt, whisper) or None (whole clip)
    source: str = ""

    def for_span(self, end: float) -> tuple[str, str]:
        """(text, covers) for a target [0, end): timed cues whose middle falls inside it, else the whole text."""
        if self.cues is None:
            return self.text, "clip"
        return " ".join(t for s, e, t in self.cues if (s + e) / 2 < end), "target"


def load_text_map(path: Union[str, Path]) -> dict[str, str]:
    """File name -> text, from samples.json ({"samples": [{"video": ".../NAME.mp4", "text": ...}]}) or a plain
    {"NAME.mp4": text} object."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("samples"), list):
        return {Path(s["video"]).name: s["text"] for s in data["samples"] if s.get("video") and s.get("text")}
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        return {Path(k).name: v for k, v in data.items()}
    raise NarrateInputError("text-from", f"{path} is neither samples.json ({{'samples': [{{'video', 'text'}}]}}) "
                                         "nor a {\"NAME.mp4\": \"text\"} object")


def find_transcript(video: Path, text_map: Optional[dict[str, str]] = None) -> Optional[Transcript]:
    srt, txt = video.with_suffix(".srt"), video.with_suffix(".txt")
    if srt.is_file():
        cues = parse_srt(srt.read_text(encoding="utf-8", errors="replace"))
        return Transcript(" ".join(c[2] for c in cues), cues, srt.name) if cues else None
    if txt.is_file() and txt.read_text(encoding="utf-8", errors="replace").strip():
        return Transcript(" ".join(txt.read_text(encoding="utf-8", errors="replace").split()), None, txt.name)
    if text_map and text_map.get(video.name, "").strip():
        return Transcript(text_map[video.name].strip(), None, "text-from")
    return None


def whisper_transcript(model_dir: Union[str, Path], wav: torch.Tensor, rate: int, language: str) -> Transcript:
    """Timed transcript from faster-whisper (optional dependency), on the clip's own audio."""
    model = _whisper_model(str(model_dir))
    segments, _ = model.transcribe(resample(wav, rate, 16000).numpy(), language=language.split("-")[0])
    cues = [(s.start, s.end, s.text.strip()) for s in segments if s.text.strip()]
    return Transcript(" ".join(c[2] for c in cues), cues, "whisper")


_WHISPER: dict = {}


def _whisper_model(model_dir: str):
    from faster_whisper import WhisperModel

    if model_dir not in _WHISPER:
        _WHISPER[model_dir] = WhisperModel(model_dir, device="cpu", compute_type="int8")
    return _WHISPER[model_dir]


def whisper_available() -> bool:
    try:
        import faster_whisper  # noqa: F401
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------------------------------------------ one sample
def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt()) if x.numel() else 0.0


def _crop_resize(rgb: np.ndarray, crop: tuple[int, int, int], size: int) -> np.ndarray:
    """Hallo's crop: the portrait's face square cut from the frame, resized like torchvision's Resize on PIL."""
    x, y, side = crop
    square = rgb[y:y + side, x:x + side]
    if square.shape[:2] != (side, side):  # a frame smaller than the portrait's (resolution change): pad with edge
        square = np.pad(square, ((0, side - square.shape[0]), (0, side - square.shape[1]), (0, 0)), mode="edge")
    return np.asarray(Image.fromarray(square).resize((size, size), Image.BILINEAR))


def _first_face(path: Path, frames: int, models: PrepareModels):
    from ..hallo.face import encode_face

    for index, rgb in enumerate(frames_at_fps(path, frames)):
        try:
            return index, encode_face(torch.from_numpy(rgb).float().div(255), models.landmarker,
                                      models.identity_model)
        except NarrateInputError:
            continue
    raise Skip("no_face", f"no face found in the {frames} frames searched")


def _encode_frames(path: Path, count: int, crop, size: int, vae_moments: VaeMoments):
    means, stds, batch = [], [], []

    def flush():
        pixels = torch.from_numpy(np.stack(batch)).float().div(255)
        mean, std = vae_moments(pixels)
        means.append(mean.float().cpu())
        stds.append(std.float().cpu())
        batch.clear()

    for rgb in frames_at_fps(path, count):
        batch.append(_crop_resize(rgb, crop, size))
        if len(batch) == VAE_BATCH:
            flush()
    if batch:
        flush()
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def prepare_clip(path: Path, transcript: Optional[Transcript], models: PrepareModels, settings: PrepareSettings,
                 whisper_model: Optional[Union[str, Path]] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """One video -> (tensors, metadata) of its sample, or Skip with the reason."""
    from ..av import samples_for_frames
    from ..hallo.audio import speech_features
    from ..xtts.dvae import speech_codes
    from ..xtts.mel import cloning_mel
    from ..xtts.voice import encode_voice

    wav, rate = read_audio(path)
    clip_s = min(wav.shape[0] / rate, video_seconds(path))
    target_s = clip_s - settings.voice_seconds
    if settings.max_seconds is not None:
        target_s = min(target_s, settings.max_seconds)
    frames = math.floor(target_s * FPS + 1e-6)
    if target_s < MIN_TARGET_SECONDS or frames < 1:
        raise Skip("too_short", f"{clip_s:.2f} s leaves {max(target_s, 0):.2f} s of target after the "
                                f"{settings.voice_seconds:g} s voice segment (needs {MIN_TARGET_SECONDS:g} s)")
    target = wav[:samples_for_frames(frames, rate, FPS)]  # exactly `frames` frames of speech
    voice_end = round(clip_s * rate)
    voice = wav[voice_end - round(settings.voice_seconds * rate):voice_end]
    for name, part in (("target", target), ("voice", voice)):
        if _rms(part) < QUIET_RMS:
            raise Skip("too_quiet", f"the {name} segment's RMS is {_rms(part):.1e} (< {QUIET_RMS:g}): no speech")
    if transcript is None and whisper_model is not None and whisper_available():
        transcript = whisper_transcript(whisper_model, wav[:voice_end], rate, settings.language)
    if transcript is None:
        raise Skip("transcript_missing", "no NAME.srt / NAME.txt next to it, no --text-from entry" +
                   ("" if whisper_model is None else ", and faster-whisper is not installed"))
    text, covers = transcript.for_span(frames / FPS)
    if not text.strip():
        raise Skip("transcript_missing", f"no transcript cue falls in the target's first {frames / FPS:.2f} s")
    text_ids = models.tokenizer.encode(text, settings.language)

    portrait_index, face = _first_face(path, math.floor(clip_s * FPS), models)
    size = settings.size
    latents_mean, latents_std = _encode_frames(path, frames, face.crop, size, models.vae_moments)
    if latents_mean.shape[0] != frames:
        raise Skip("unreadable", f"only {latents_mean.shape[0]} of {frames} video frames decoded")
    portrait_mean, portrait_std = models.vae_moments(face.image(size))
    blank_mean, blank_std = models.vae_moments(torch.full((1, size, size, 3), 0.5))
    inputs = face.sampler_inputs(size)

    features = speech_features(models.wav2vec, target[None], rate, fps=FPS)
    wav_22k = resample(target, rate, DVAE_RATE).clamp(-1, 1)
    codes = speech_codes(models.dvae, wav_22k[None], models.mel_norms)[0]
    voice_profile = encode_voice(models.xtts, [(voice[None], rate)], length_s=settings.voice_seconds,
                                 chunk_s=settings.voice_seconds, max_ref_s=settings.voice_seconds)
    voice_22k = resample(voice, rate, DVAE_RATE).clamp(-1, 1)
    cond_mel = cloning_mel(voice_22k[None].to(models.xtts.mel_stats.device), models.xtts.mel_stats)[0]

    tensors = {
        "latents_mean": latents_mean, "latents_std": latents_std,
        "portrait_latent_mean": portrait_mean.float().cpu(), "portrait_latent_std": portrait_std.float().cpu(),
        "blank_latent_mean": blank_mean.float().cpu(), "blank_latent_std": blank_std.float().cpu(),
        "face_region": inputs.region[:1].contiguous(),
        "identity": inputs.embedding.float().reshape(512),
        "landmarks": torch.from_numpy(np.asarray(face.landmarks, np.float32)),
        "audio_windows": features.windows[:frames].float().cpu().contiguous(),
        "target_wav_24k": resample(target, rate, TARGET_RATE).float(),
        "dvae_codes": codes.cpu(),
        "cond_mel": cond_mel.float().cpu(),
        "gpt_cond_latent": voice_profile.gpt_cond_latent[0].float().cpu(),
        "speaker_embedding": voice_profile.speaker_embedding.reshape(-1).float().cpu(),
        "text_ids": torch.tensor(text_ids, dtype=torch.long),
    }
    for name, levels in (("full", inputs.full_masks), ("face", inputs.face_masks), ("lip", inputs.lip_masks)):
        for i, mask in enumerate(levels):
            tensors[f"mask_{name}_{i}"] = mask.reshape(1, -1).float().contiguous()
    meta = {
        "text": text, "text_covers": covers, "transcript": transcript.source, "language": settings.language,
        "clip_seconds": round(clip_s, 4), "source_rate": rate,
        "target": [0.0, frames / FPS], "voice": [(voice_end - voice.shape[0]) / rate, voice_end / rate],
        "frames": frames, "fps": FPS, "portrait_frame": portrait_index, "crop": list(face.crop),
        "has_identity": face.identity is not None, "faces_found": face.faces_found,
        "target_samples_22050": int(wav_22k.shape[0]), "codes": int(codes.numel()), "text_tokens": len(text_ids),
        "notes": list(face.notes) + list(voice_profile.warnings),
    }
    return tensors, meta


# ---------------------------------------------------------------------------------------------------- the dataset
def collect_videos(inputs: Iterable[Union[str, Path]]) -> list[Path]:
    """Files as given (any extension: PyAV decides) and, inside folders, files with a video extension, sorted."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            out += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        else:
            out.append(item)
    return list(dict.fromkeys(p.resolve() for p in out))


def sample_id(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:60] or "clip"
    return f"{stem}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"


def _dataset_info(settings: PrepareSettings, models: PrepareModels) -> dict:
    return {"format": FORMAT, "settings": asdict(settings), "checkpoints": models.checkpoints}


def _read_manifest(out: Path) -> dict[str, dict]:
    path = out / MANIFEST
    if not path.is_file():
        return {}
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {row["source"]: row for row in rows}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_manifest(out: Path, rows: dict[str, dict]) -> None:
    _write_atomic(out / MANIFEST, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows.values()))


def _open_dataset(out: Path, info: dict) -> None:
    """Create the dataset folder, or check that an existing one was made with the same settings and checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    (out / SAMPLES_DIR).mkdir(exist_ok=True)
    path = out / DATASET_INFO
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != json.loads(json.dumps(info)):
            changed = sorted({k for k in ("settings", "checkpoints", "format") if old.get(k) != info.get(k)})
            raise NarrateInputError("out", f"{out} holds a dataset prepared with other {' and '.join(changed)}; "
                                           "resume only with the same ones, or prepare into a new folder")
        return
    _write_atomic(path, json.dumps(info, indent=1))


def _stamp(path: Path) -> Optional[list]:
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return None


def check_dataset_settings(out: Union[str, Path], settings: PrepareSettings) -> None:
    """Fail fast (before loading any model) when `out` holds a dataset prepared with other settings."""
    path = Path(out) / DATASET_INFO
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("settings") != asdict(settings):
        raise NarrateInputError("out", f"{out} holds a dataset prepared with other settings; resume only with the "
                                       "same ones, or prepare into a new folder")


def _save_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"nfy_sample": json.dumps(meta, ensure_ascii=False), "nfy_format": str(FORMAT)})
    os.replace(tmp, path)


@dataclass
class PrepareReport:
    accepted: list[str] = field(default_factory=list)  # ids computed in this run
    reused: list[str] = field(default_factory=list)  # ids finished by an earlier run, not recomputed
    skipped: dict[str, str] = field(default_factory=dict)  # source -> reason


def prepare(inputs: Iterable[Union[str, Path]], out: Union[str, Path], models: PrepareModels,
            settings: PrepareSettings = PrepareSettings(), text_map: Optional[dict[str, str]] = None,
            whisper_model: Optional[Union[str, Path]] = None, progress: ProgressFn = None,
            log: Callable[[str], None] = lambda line: None) -> PrepareReport:
    """Prepare every video into `out` (resumable); one manifest row per video."""
    settings.check()
    out = Path(out)
    videos = collect_videos(inputs)
    if not videos:
        raise NarrateInputError("videos", "no video files given (or none with a video extension in the folders)")
    _open_dataset(out, _dataset_info(settings, models))
    rows = _read_manifest(out)
    report_ = PrepareReport()
    for done, video in enumerate(videos):
        source, sid = str(video), sample_id(video)
        shard = Path(SAMPLES_DIR) / f"{sid}.safetensors"
        old = rows.get(source)
        if old and old.get("status") == "accepted" and (out / shard).is_file():
            report_.reused.append(sid)
            log(f"{video.name}: already prepared ({sid})")
        elif old and old.get("reason") in FINAL_REASONS and old.get("stamp") == _stamp(video):
            report_.skipped[source] = old["reason"]  # same file, same settings and models: same verdict
            log(f"{video.name}: skipped before ({old['reason']}), unchanged")
        else:
            try:
                tensors, meta = prepare_clip(video, find_transcript(video, text_map), models, settings,
                                             whisper_model)
                meta.update(id=sid, source=source)
                _save_shard(out / shard, tensors, meta)
                rows[source] = {"source": source, "status": "accepted", "id": sid, "shard": shard.as_posix(),
                                **{k: meta[k] for k in ("clip_seconds", "target", "voice", "frames", "codes",
                                                        "text_tokens", "text_covers", "portrait_frame")}}
                report_.accepted.append(sid)
                log(f"{video.name}: accepted as {sid} ({meta['frames']} frames, {meta['codes']} codes)")
            except (Skip, *DECODE_ERRORS) as error:
                skip = error if isinstance(error, Skip) else \
                    Skip("unreadable", f"{type(error).__name__} while reading it: {str(error)[:200]}")
                rows[source] = {"source": source, "status": "skipped", "reason": skip.reason,
                                "detail": skip.detail, "stamp": _stamp(video)}
                report_.skipped[source] = skip.reason
                log(f"{video.name}: skipped, {skip.reason}: {skip.detail}")
            _write_manifest(out, rows)  # after every clip, so an interrupted run keeps what it finished
        report(progress, done + 1, len(videos))
    return report_


# ----------------------------------------------------------------------------------------------------- reading back
def read_manifest(dataset: Union[str, Path]) -> list[dict]:
    return list(_read_manifest(Path(dataset)).values())


def sample_ids(dataset: Union[str, Path]) -> list[str]:
    return [row["id"] for row in read_manifest(dataset) if row.get("status") == "accepted"]


def load_sample(dataset: Union[str, Path], sid: str) -> dict:
    """The cached tensors of one sample, plus its metadata under "meta"."""
    from safetensors import safe_open

    path = Path(dataset) / SAMPLES_DIR / f"{sid}.safetensors"
    if not path.is_file():
        raise NarrateInputError("data", f"sample {sid!r} is not in {dataset}; run prepare again")
    with safe_open(str(path), framework="pt") as handle:
        sample = {key: handle.get_tensor(key) for key in handle.keys()}
        sample["meta"] = json.loads((handle.metadata() or {})["nfy_sample"])
    return sample


def iter_samples(dataset: Union[str, Path]) -> Iterator[dict]:
    for sid in sample_ids(dataset):
        yield load_sample(dataset, sid)


def dataset_info(dataset: Union[str, Path]) -> dict:
    path = Path(dataset) / DATASET_INFO
    if not path.is_file():
        raise NarrateInputError("data", f"{dataset} is not a prepared dataset (no {DATASET_INFO}); run "
                                        "`python -m narrate_model prepare VIDEOS... --out DATASET` first")
    return json.loads(path.read_text(encoding="utf-8"))


def check_base_checkpoints(dataset: Union[str, Path], checkpoints: dict[str, dict]) -> None:
    """Refuse a dataset whose cached encoder outputs came from other base checkpoints than `checkpoints`."""
    recorded = dataset_info(dataset)["checkpoints"]
    differ = [f"{name} (dataset {recorded[name]['sha256'][:12]}, now {checkpoints[name]['sha256'][:12]})"
              for name in sorted(set(recorded) & set(checkpoints))
              if recorded[name]["sha256"] != checkpoints[name]["sha256"]]
    missing = sorted(set(recorded) ^ set(checkpoints))
    if differ or missing:
        raise NarrateInputError("data", f"{dataset} was prepared with other base checkpoints: "
                                        + "; ".join(differ + [f"{m} used by only one side" for m in missing])
                                        + ". Prepare the dataset again with the checkpoints you train with.")

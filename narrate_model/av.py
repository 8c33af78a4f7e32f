"""The audio-visual timeline and the .mp4 muxer.

The audio sets the timeline: a narration of S seconds at F frames per second has ceil(S * F) frames, F is kept as an
exact fraction (30000/1001 stays exact), and the audio written next to the frames is padded or trimmed to exactly
the frames' duration, so video and audio never drift apart by more than one frame.

Frames are encoded chunk by chunk (h264 yuv420p + aac through PyAV) with the audio interleaved as the video
advances, so the writer holds one chunk at a time: the streaming path feeds it decoded chunks and RAM stays flat
however long the video is.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction
from typing import Iterable, Union

import av
import numpy as np
import torch

from .errors import NarrateInputError
from .progress import ProgressFn, report

FpsLike = Union[Fraction, float, int, str]


def exact_fps(fps: FpsLike) -> Fraction:
    """An exact frame rate: '30000/1001' and 29.97002997 both give 30000/1001; 25.0 gives 25."""
    value = Fraction(fps) if isinstance(fps, (str, Fraction, int)) else Fraction(fps).limit_denominator(1001)
    if value <= 0 or value > 240:
        raise NarrateInputError("fps", f"{float(value):g} frames per second is outside 0 < fps <= 240.")
    return value


def frame_count(num_samples: int, sample_rate: int, fps: FpsLike) -> int:
    """Frames needed to show `num_samples` of audio: ceil(seconds * fps), computed exactly."""
    return math.ceil(Fraction(num_samples, sample_rate) * exact_fps(fps))


def samples_for_frames(num_frames: int, sample_rate: int, fps: FpsLike) -> int:
    """Audio samples spanning exactly `num_frames` frames (rounded to the nearest sample)."""
    return round(Fraction(num_frames) / exact_fps(fps) * sample_rate)


def fit_audio(waveform: torch.Tensor, sample_rate: int, num_frames: int, fps: FpsLike) -> torch.Tensor:
    """Pads with silence or trims [C, T] audio to the frames' duration."""
    target = samples_for_frames(num_frames, sample_rate, fps)
    if waveform.shape[-1] >= target:
        return waveform[..., :target]
    return torch.nn.functional.pad(waveform, (0, target - waveform.shape[-1]))


def _to_uint8_rgb(frames: torch.Tensor) -> np.ndarray:
    """IMAGE [N,H,W,C] float 0..1 (C = 1, 3 or 4) -> uint8 [N,H,W,3] with even H and W, as yuv420p needs."""
    if frames.ndim != 4:
        raise NarrateInputError("images", f"expected an IMAGE batch [frames, height, width, channels], got shape "
                                          f"{tuple(frames.shape)}.")
    if frames.shape[-1] == 1:
        frames = frames.expand(-1, -1, -1, 3)
    frames = frames[..., :3]
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:  # repeat the last row / column rather than distort the picture
        frames = torch.nn.functional.pad(frames.permute(0, 3, 1, 2), (0, w % 2, 0, h % 2), mode="replicate")
        frames = frames.permute(0, 2, 3, 1)
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def partial_path(path: str) -> str:
    """Where the writer puts a file while it is being written."""
    return os.path.splitext(path)[0] + ".partial.mp4"


class Mp4Writer:
    """Writes an .mp4 (h264 + aac) chunk by chunk. Use as a context manager; `add_frames` takes IMAGE chunks.

    The file is written as '<name>.partial.mp4' and moved to its name only when complete. It never replaces a file:
    an existing target is refused up front, and the final move is a hard link, which fails rather than overwrite.
    If encoding fails or is cancelled, the unfinished file is removed (a half-written video would carry the whole
    soundtrack over a few frames and never show up in ComfyUI), and a note saying so is added to the exception.
    """

    def __init__(self, path: str, fps: FpsLike, audio: torch.Tensor | None, sample_rate: int | None,
                 total_frames: int, crf: int = 19):
        self.path = path
        self.fps = exact_fps(fps)
        self.total_frames = total_frames
        self.partial = partial_path(path)
        for existing in (path, self.partial):
            if os.path.exists(existing):
                raise FileExistsError(f"{existing} already exists; the video writer never replaces a file")
        self.video = None
        self.crf = crf
        self.frames_written = 0
        self.audio = None
        if audio is not None:
            audio = fit_audio(audio.float(), sample_rate, total_frames, self.fps)
            if audio.shape[0] > 2:  # aac here is mono or stereo: fold extra channels into the first two
                audio = audio[:2]
            self.audio = audio.clamp(-1, 1).cpu().numpy().astype(np.float32)
            self.sample_rate = sample_rate
            self.audio_written = 0
        self.container = av.open(self.partial, mode="w", format="mp4")

    def __enter__(self):
        return self

    def _open_streams(self, height: int, width: int) -> None:
        """Video first (the frame size is known with the first frame), then audio: the order players expect."""
        self.video = self.container.add_stream("libx264", rate=self.fps)
        self.video.width, self.video.height = width, height
        self.video.pix_fmt = "yuv420p"
        self.video.options = {"crf": str(self.crf)}
        if self.audio is not None:
            layout = "stereo" if self.audio.shape[0] == 2 else "mono"
            self.audio_stream = self.container.add_stream("aac", rate=self.sample_rate, layout=layout)

    def add_frames(self, frames: torch.Tensor, progress: ProgressFn = None) -> None:
        """Encodes a chunk of IMAGE frames, reporting after every frame (so Cancel stops within one frame)."""
        pixels = _to_uint8_rgb(frames)
        if self.video is None:
            self._open_streams(*pixels.shape[1:3])
        elif pixels.shape[1:3] != (self.video.height, self.video.width):
            raise NarrateInputError("images", f"frame size changed mid-video from {self.video.width}x"
                                              f"{self.video.height} to {pixels.shape[2]}x{pixels.shape[1]}.")
        for picture in pixels:
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = self.frames_written
            frame.time_base = 1 / self.fps
            self.container.mux(self.video.encode(frame))
            self.frames_written += 1
            report(progress, self.frames_written, self.total_frames)
        if self.audio is not None:
            self._add_audio_until(samples_for_frames(self.frames_written, self.sample_rate, self.fps))

    def _add_audio_until(self, end: int) -> None:
        if end <= self.audio_written:
            return
        chunk = np.ascontiguousarray(self.audio[:, self.audio_written:end])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self.audio_stream.layout.name)
        frame.sample_rate = self.sample_rate
        frame.pts = self.audio_written
        frame.time_base = Fraction(1, self.sample_rate)
        self.container.mux(self.audio_stream.encode(frame))
        self.audio_written = end

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._discard(exc)
            return False
        if self.video is not None:
            self.container.mux(self.video.encode(None))
        if self.audio is not None and self.video is not None:
            self._add_audio_until(self.audio.shape[1])
            self.container.mux(self.audio_stream.encode(None))
        self.container.close()
        if self.frames_written != self.total_frames:
            error = RuntimeError(f"wrote {self.frames_written} frames, expected {self.total_frames}")
            self._discard(error)
            raise error
        try:
            os.link(self.partial, self.path)  # FileExistsError instead of replacing a file that appeared meanwhile
        except FileExistsError as error:
            self._discard(error)
            raise
        os.remove(self.partial)
        return False

    def _discard(self, exc: BaseException | None) -> None:
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - the file goes anyway; the original error is the one to report
            pass
        if os.path.exists(self.partial):
            os.remove(self.partial)
        if exc is not None:
            exc.add_note(f"the unfinished video {os.path.basename(self.path)} was removed after "
                         f"{self.frames_written} of {self.total_frames} frames; no video was saved")


def write_mp4(path: str, frames: Union[torch.Tensor, Iterable[torch.Tensor]], fps: FpsLike,
              audio: torch.Tensor | None = None, sample_rate: int | None = None, total_frames: int | None = None,
              chunk: int = 16, crf: int = 19, progress: ProgressFn = None) -> str:
    """Muxes IMAGE frames (one tensor, or an iterable of chunks for streaming) and [C, T] audio into `path`."""
    if isinstance(frames, torch.Tensor):
        total_frames, batch = frames.shape[0], frames
        frames = (batch[i:i + chunk] for i in range(0, total_frames, chunk))
    if not total_frames:
        raise NarrateInputError("images", "there are no frames to write.")
    with Mp4Writer(path, fps, audio, sample_rate, total_frames, crf) as writer:
        for part in frames:
            writer.add_frames(part, progress)
    return path


def stream_latents_to_mp4(path: str, latents: torch.Tensor, decode, fps: FpsLike, audio: torch.Tensor | None = None,
                          sample_rate: int | None = None, chunk: int = 8, crf: int = 19,
                          progress: ProgressFn = None) -> str:
    """Decodes video latents [F, C, h, w] `chunk` frames at a time with `decode` (latents -> IMAGE [n,H,W,3]) and
    encodes each decoded chunk straight into the .mp4, so only one chunk of pixels is ever held in memory."""
    total = latents.shape[0]
    decoded = (decode(latents[i:i + chunk]) for i in range(0, total, chunk))
    return write_mp4(path, decoded, fps, audio, sample_rate, total_frames=total, crf=crf, progress=progress)

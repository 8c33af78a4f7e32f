"""Lip-sync measures: a landmark PROXY that needs no SyncNet (here), and LSE-C / LSE-D with SyncNet (syncnet.py).

The proxy is not LSE and is not comparable with published LSE numbers. Per video frame it takes the mouth opening
(MediaPipe face-mesh landmarks, the landmarker the pack uses for Hallo's masks) and the speech loudness, keeps their
syllable-rate movement (a 9-frame moving average removed, then frame-to-frame differences) and searches +-15 frames
of lag for the peak Pearson correlation: the peak is `lipsync_proxy_corr`, its lag the A/V offset estimate.

Sign convention: a POSITIVE offset means the AUDIO IS LATE (the sound of a syllable comes after the mouth opens for
it), e.g. +5 when the audio track was delayed by 5 frames; negative means the audio is early. Natural speech reads
about +1: the mouth opens slightly before the sound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import MetricSkipped

UPPER_INNER_LIP, LOWER_INNER_LIP = 13, 14    # MediaPipe face-mesh points on the inner lip midline
LEFT_EYE_OUTER, RIGHT_EYE_OUTER = 33, 263    # the face scale the opening is divided by
DETECT_SIDE = 256                            # frames are landmarked at this size at most (speed; the mouth is big)
MAX_LAG = 15                                 # frames searched each way (0.6 s at 25 fps)
DETREND_FRAMES = 9                           # moving average removed before correlating (keeps syllable rhythm)
ENVELOPE_FLOOR_DB = 50.0                     # loudness below (peak - 50 dB) counts as silence


def _video_landmarker(path: str):
    """A MediaPipe face landmarker in VIDEO mode (one face, tracked between frames: several times faster than the
    per-image detection narrate_model.hallo.face runs on portraits). A new one per clip: timestamps must increase."""
    from mediapipe.tasks.python import BaseOptions, vision

    if not Path(path).is_file():
        raise MetricSkipped(f"the MediaPipe face landmarker {path} does not exist; put face_landmarker.task "
                            "(Apache-2.0) there: python -m narrate_model download face-landmarker")
    options = vision.FaceLandmarkerOptions(base_options=BaseOptions(model_asset_path=str(path)),
                                           running_mode=vision.RunningMode.VIDEO, num_faces=1)
    return vision.FaceLandmarker.create_from_options(options)


@dataclass
class FaceTrack:
    """One landmarking pass over a clip, shared by the proxy and SyncNet's face crop. NaN where no face is found."""
    opening: np.ndarray                 # [N] inner-lip gap / outer eye-corner distance (size independent)
    boxes: np.ndarray                   # [N, 4] face-mesh bounding box x0, y0, x1, y1 in the frames' pixels


def face_track(frames: torch.Tensor, landmarker_path: str, fps: float = 25.0, progress=None) -> FaceTrack:
    """Landmark every frame (at most DETECT_SIDE pixels a side) with MediaPipe in VIDEO mode."""
    import cv2
    import mediapipe as mp

    frames = torch.as_tensor(frames)
    opening, boxes = np.full(len(frames), np.nan), np.full((len(frames), 4), np.nan)
    scale = min(1.0, DETECT_SIDE / max(frames.shape[1:3]))
    landmarker = _video_landmarker(str(landmarker_path))
    try:
        for i, frame in enumerate(frames):
            rgb = frame[..., :3].detach().float().cpu().nan_to_num(0).clamp(0, 1).mul(255).round()
            rgb = rgb.to(torch.uint8).numpy()
            if scale < 1:
                rgb = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)),
                                 interpolation=cv2.INTER_AREA)
            image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))
            faces = landmarker.detect_for_video(image, round(i * 1000 / fps)).face_landmarks
            if faces:
                points = np.array([[p.x * rgb.shape[1], p.y * rgb.shape[0]] for p in faces[0]])
                eyes = np.linalg.norm(points[LEFT_EYE_OUTER] - points[RIGHT_EYE_OUTER])
                opening[i] = np.linalg.norm(points[UPPER_INNER_LIP] - points[LOWER_INNER_LIP]) / max(eyes, 1e-6)
                boxes[i] = np.concatenate([points.min(0), points.max(0)]) / scale
            if progress is not None:
                progress(i + 1, len(frames))
    finally:
        landmarker.close()
    return FaceTrack(opening, boxes)


def mouth_opening(frames: torch.Tensor, landmarker_path: str, fps: float = 25.0, progress=None) -> np.ndarray:
    """Per frame, the inner-lip gap (MediaPipe face-mesh points 13-14) divided by the outer eye-corner distance
    (33-263) so that it does not depend on the face size; NaN where no face is found."""
    return face_track(frames, landmarker_path, fps, progress).opening


def speech_envelope(wav: np.ndarray, sr: int, fps: float, n_frames: int) -> np.ndarray:
    """Loudness per video frame: RMS of the samples of frame n (from n/fps to (n+1)/fps) in dB, floored at
    ENVELOPE_FLOOR_DB below the loudest frame. Frames past the end of the audio are NaN."""
    out = np.full(n_frames, np.nan)
    for n in range(n_frames):
        a, b = round(n * sr / fps), round((n + 1) * sr / fps)
        if b > len(wav):
            break
        out[n] = 20 * math.log10(math.sqrt(float(np.mean(wav[a:b] ** 2))) + 1e-12)
    peak = np.nanmax(out) if np.isfinite(out).any() else 0.0
    return np.where(np.isnan(out), np.nan, np.maximum(out, peak - ENVELOPE_FLOOR_DB))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


@dataclass
class ProxyResult:
    correlation: float          # peak correlation ("lipsync_proxy_corr")
    offset_frames: int          # lag of the peak; positive = audio late
    lag_curve: list[float]      # correlation at lags -max_lag .. +max_lag


def syllable_rhythm(series: np.ndarray) -> np.ndarray:
    """What the proxy correlates: the series minus its DETREND_FRAMES moving average (slow drifts of loudness and
    pose out), then frame-to-frame differences (openings and onsets). Without this the correlation is so broad
    that its peak wanders by several frames. NaNs stay NaN (they are filled only to compute the average)."""
    ok = np.isfinite(series)
    filled = np.interp(np.arange(len(series)), np.flatnonzero(ok), series[ok]) if ok.any() else series
    kernel = np.ones(DETREND_FRAMES) / DETREND_FRAMES
    padded = np.pad(filled, DETREND_FRAMES // 2, mode="edge")
    detrended = np.where(ok, filled - np.convolve(padded, kernel, mode="valid"), np.nan)
    return np.diff(detrended)


def lag_search(opening: np.ndarray, envelope: np.ndarray, max_lag: int = MAX_LAG) -> ProxyResult:
    """corr(lag) = Pearson(m[t], e[t + lag]) of the syllable rhythms m and e of the mouth opening and the envelope,
    over the frames both cover; the lag of the peak is the offset (positive = audio late)."""
    opening, envelope = syllable_rhythm(opening), syllable_rhythm(envelope)
    curve = []
    for lag in range(-max_lag, max_lag + 1):
        if lag >= 0:
            a, b = opening[:len(opening) - lag], envelope[lag:]
        else:
            a, b = opening[-lag:], envelope[:len(envelope) + lag]
        n = min(len(a), len(b))
        curve.append(_pearson(a[:n], b[:n]))
    values = np.array(curve)
    if not np.isfinite(values).any():
        raise MetricSkipped("the mouth opening or the speech envelope is constant (no face, or silent audio)")
    best = int(np.nanargmax(values))
    return ProxyResult(float(values[best]), best - max_lag, [None if math.isnan(v) else v for v in curve])


def lipsync_proxy(frames: torch.Tensor, wav: np.ndarray, sr: int, fps: float, landmarker_path: str,
                  max_lag: int = MAX_LAG, notes: list[str] | None = None, opening: np.ndarray | None = None,
                  progress=None) -> ProxyResult:
    """The landmark lip-sync PROXY (see the module docstring). `opening` may pass precomputed mouth openings."""
    if opening is None:
        opening = mouth_opening(frames, landmarker_path, fps, progress)
    missing = int(np.isnan(opening).sum())
    if missing == len(opening):
        raise MetricSkipped("no face found in any frame")
    if missing and notes is not None:
        notes.append(f"lip-sync proxy: no face in {missing} of {len(opening)} frames (left out)")
    envelope = speech_envelope(wav, sr, fps, len(opening))
    return lag_search(opening, envelope, max_lag)

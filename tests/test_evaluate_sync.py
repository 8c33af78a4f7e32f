"""The landmark lip-sync PROXY (narrate_model.evaluate.sync) on the shared media: it finds the true A/V offset
(0 +- 1 frame), follows audio shifted by +5 and -8 frames, and scores another clip's audio lower."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from evaluate_media import media_audio, media_frames, need

from narrate_model.evaluate import MetricModels, evaluate_sync, sync

CLIPS = ("man", "Woman")


@pytest.fixture(scope="module")
def openings(face_landmarker_task) -> dict:
    """Mouth openings of both clips, landmarked once per module at 160 px (the slow part: ~450 frames)."""
    need("mediapipe")
    out = {}
    for name in CLIPS:
        frames, fps = media_frames(name, 160)
        out[name] = sync.mouth_opening(frames, str(face_landmarker_task), fps)
    return out


def shifted(wav: np.ndarray, sr: int, frames: int, fps: float = 25.0) -> np.ndarray:
    """The audio delayed by `frames` video frames (positive: silence prepended, audio late) or advanced."""
    n = round(abs(frames) * sr / fps)
    return np.concatenate([np.zeros(n), wav]) if frames > 0 else wav[n:]


@pytest.mark.parametrize("name", CLIPS)
def test_proxy_finds_the_true_offset_and_follows_shifted_audio(openings, name):
    opening = openings[name]
    assert np.isfinite(opening).all()  # a face in every frame of these clips
    wav, sr = media_audio(name)
    found = {}
    for shift in (0, 5, -8):
        envelope = sync.speech_envelope(shifted(wav, sr, shift), sr, 25.0, len(opening))
        found[shift] = sync.lag_search(opening, envelope)
    assert abs(found[0].offset_frames) <= 1, found[0]
    assert abs(found[5].offset_frames - 5) <= 1, found[5]
    assert abs(found[-8].offset_frames + 8) <= 1, found[-8]
    # another clip's speech correlates less with this face than its own speech
    other = CLIPS[1 - CLIPS.index(name)]
    other_wav, other_sr = media_audio(other)
    wrong = sync.lag_search(opening, sync.speech_envelope(other_wav, other_sr, 25.0, len(opening)))
    assert wrong.correlation < found[0].correlation, (wrong, found[0])


def test_without_the_rhythm_filter_the_offset_is_wrong(openings):
    """Why syllable_rhythm exists (the guard can fail): raw levels correlate so broadly that the peak lands
    several frames away from the true offset on man.mp4."""
    opening = openings["man"]
    wav, sr = media_audio("man")
    envelope = sync.speech_envelope(wav, sr, 25.0, len(opening))
    original = sync.syllable_rhythm
    try:
        sync.syllable_rhythm = lambda series: series
        assert abs(sync.lag_search(opening, envelope).offset_frames) > 1
    finally:
        sync.syllable_rhythm = original


def test_evaluate_sync_reports_the_proxy_with_offset_and_notes(face_landmarker_task):
    frames, fps = media_frames("kid_1", 128)
    wav, sr = media_audio("kid_1")
    frames = frames.clone()
    frames[10:13] = 0  # three black frames: no face there
    report = evaluate_sync(frames, (torch.from_numpy(wav).float(), sr), fps,
                           MetricModels(landmarker=str(face_landmarker_task)))
    assert "lipsync_proxy_corr" in report.values and "lse_d" not in report.values
    assert abs(report.extra["av_offset_frames"]) <= 1
    assert len(report.extra["lag_curve"]) == 2 * sync.MAX_LAG + 1
    assert any("no face in 3 of 80 frames" in n for n in report.notes)
    assert any("lse_d/lse_c skipped: no SyncNet weights" in n for n in report.notes)
    silent = evaluate_sync(frames[:5], (torch.zeros(sr), sr), fps, MetricModels(landmarker=str(face_landmarker_task)))
    assert not silent.values and any("audio is silent" in n for n in silent.notes)
    no_face = evaluate_sync(torch.zeros(20, 64, 64, 3), (torch.from_numpy(wav).float(), sr), fps,
                            MetricModels(landmarker=str(face_landmarker_task)))
    assert any("no face found in any frame" in n for n in no_face.notes)

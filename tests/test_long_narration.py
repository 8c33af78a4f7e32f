"""A long narration streams: each clip is decoded a few frames at a time and written straight into the .mp4, so the
decoded frames held at once do not grow with the narration's length.

Two measures. The first counts the decoded frame tensors alive at any moment, which separates streaming from
holding the video by a large margin at any length (a non-streaming variant inside the test fails the same bound).
The second is the benchmark's peak resident memory of a 5,000-character narration against a one-sentence one,
within 10 %; at 64x64 a whole non-streamed video adds only about 1 % there, so that check alone could not tell.
"""
import sys
import weakref
from fractions import Fraction

import pytest
import torch

from conftest import REPO
from narrate_model import pipeline
from narrate_model.hallo.sampler import SamplerSettings
from narrate_model.xtts.sampling import SamplingParams
from small_checkpoints import small_narration_models
from test_pipeline import portrait, voice_clip

sys.path.insert(0, str(REPO / "benchmarks"))
from narration_memory import measure  # noqa: E402

DECODE_BATCH = 2  # the decode_batch setting under test (pipeline.DECODE_BATCH is the default)
MAX_LIVE_FRAMES = 2 * DECODE_BATCH  # the batch being written and the one being decoded


def peak_live_frames(models, path) -> tuple[int, int]:
    """(most decoded frames alive at once, frames in the video) for a narration with the decoder watched."""
    live, peak = weakref.WeakSet(), [0]
    decode = models.vae_decode

    def watched(latents):
        frames = decode(latents)
        live.add(frames)
        peak[0] = max(peak[0], sum(f.shape[0] for f in live))
        return frames

    models.vae_decode = watched
    try:
        settings = pipeline.NarrationSettings(fps=Fraction(25), size=64,
                                              speech=SamplingParams(seed=1, max_new_tokens=30),
                                              video=SamplerSettings(steps=1, cfg=3.5, seed=1),
                                              decode_batch=DECODE_BATCH)
        with torch.inference_mode():
            result = pipeline.narrate_to_mp4(models, portrait(), [voice_clip()], "One sentence to say.",
                                             str(path), settings)
    finally:
        models.vae_decode = decode
    return peak[0], result.frames


def test_decoded_frames_held_at_once_stay_bounded_and_a_non_streaming_variant_fails(tmp_path, monkeypatch):
    models = small_narration_models()
    peak, frames = peak_live_frames(models, tmp_path / "streamed.mp4")
    assert frames > 3 * MAX_LIVE_FRAMES  # long enough that holding the video would show
    assert peak <= MAX_LIVE_FRAMES, f"{peak} decoded frames alive at once"
    # The control: the same narration with the frames collected before writing (a non-streaming pipeline).
    write = pipeline.av.write_mp4
    monkeypatch.setattr(pipeline.av, "write_mp4", lambda path, frames, *a, **k: write(path, list(frames), *a, **k))
    held, _ = peak_live_frames(models, tmp_path / "held.mp4")
    assert held > MAX_LIVE_FRAMES and held == frames


def test_long_narration_memory_stays_flat(tmp_path):
    report = measure(tmp_path)
    one, long = report["cases"]["one_sentence"], report["cases"]["long_5000_chars"]
    assert long["characters"] == 5000 and long["chunks"] > 20 and one["chunks"] == 1
    assert long["frames"] == long["frames_in_mp4"] and one["frames"] == one["frames_in_mp4"]
    assert long["frames"] > 10 * 16  # many clips, each carrying motion frames into the next
    assert report["peak_ratio_long_over_one"] <= 1.10, report

"""Reference-based speech metrics (narrate_model.evaluate.speech): STOI/ESTOI equal pystoi, PESQ is the pesq
package at the rates the standard requires, MCD-DTW on a hand-checked case, and the per-sample suite's behaviour
on identical, noisy and bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from evaluate_media import media_audio, need, with_noise

from narrate_model.evaluate import evaluate_speech, speech
from narrate_model.evaluate.dtw import dtw_path

SR = 16000


def synthetic_speech(seconds: float = 3.0, sr: int = SR, seed: int = 0) -> np.ndarray:
    """Harmonic 'syllables' at 4 Hz with a gliding pitch: voiced energy in STOI's bands, with pauses."""
    t = np.arange(int(seconds * sr)) / sr
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    return 0.1 * voiced * envelope + 1e-4 * np.random.default_rng(seed).standard_normal(len(t))


@pytest.fixture(scope="module")
def man_clip():
    wav, sr = media_audio("man")
    return wav[: 4 * sr], sr  # 4 s keep the module fast


def test_stoi_and_estoi_equal_pystoi_on_synthetic_and_real_speech(man_clip):
    pystoi = need("pystoi")
    clean = synthetic_speech()
    real, real_sr = man_clip
    cases = {"synthetic 16 kHz": (with_noise(clean, 5), clean, SR),
             "real 44.1 kHz": (with_noise(real, 10), real, real_sr),
             "real, resampled to 10 kHz by STOI": (real[::-1].copy(), real, real_sr)}
    for name, (degraded, reference, sr) in cases.items():
        for extended in (False, True):
            ours = speech.stoi(degraded, reference, sr, extended=extended)
            theirs = pystoi.stoi(reference, degraded, sr, extended=extended)
            assert ours == pytest.approx(theirs, abs=1e-6), (name, extended)
    # the guard can fail: a 20 dB instead of 40 dB silence range changes STOI well beyond 1e-6
    original = speech.STOI_DYN_RANGE
    try:
        speech.STOI_DYN_RANGE = 20.0
        degraded, reference, sr = cases["real 44.1 kHz"]
        assert abs(speech.stoi(degraded, reference, sr) - pystoi.stoi(reference, degraded, sr)) > 1e-4
    finally:
        speech.STOI_DYN_RANGE = original


def test_pesq_resamples_to_the_band_rate_and_calls_the_reference_code(man_clip):
    pesq = need("pesq")
    real, sr = man_clip
    degraded = with_noise(real, 15)
    for band, rate in (("wb", 16000), ("nb", 8000)):
        ref = speech.resample_np(real, sr, rate)
        deg = speech.resample_np(degraded, sr, rate)
        assert speech.pesq(degraded, real, sr, band) == pytest.approx(pesq.pesq(rate, ref, deg, band), abs=1e-6)
    # the band matters: narrow band scores the same pair differently, so a swapped mode would be caught
    assert abs(speech.pesq(degraded, real, sr, "wb") - speech.pesq(degraded, real, sr, "nb")) > 0.05
    # PESQ refuses other rates: calling the C code at 44.1 kHz is an error, which is why we resample
    with pytest.raises(ValueError, match="8000 or 16000"):
        pesq.pesq(sr, real, degraded, "wb")


def test_mcd_matches_a_hand_checked_case():
    """Three reference frames, two generated ones, c0 in column 0 (different on purpose: it must not count).
    c1..c2: ref (0,0) (3,4) (3,4); gen (0,0) (0,4). Frame distances gen x ref: [[0,5,5],[4,3,3]]. The best DTW
    path is (0,0) (1,1) (1,2): costs 0 + 3 + 3 = 6 over 3 pairs, mean 2, MCD = 10 sqrt(2) / ln 10 * 2."""
    ref = np.array([[9.0, 0, 0], [1.0, 3, 4], [-5.0, 3, 4]])
    gen = np.array([[0.0, 0, 0], [7.0, 0, 4]])
    assert speech.mcd_from_cepstra(gen, ref) == pytest.approx(10 * math.sqrt(2) / math.log(10) * 2, rel=1e-12)
    assert dtw_path(np.array([[0, 5, 5], [4, 3, 3.0]])).tolist() == [[0, 0], [1, 1], [1, 2]]
    # the guard can fail: counting c0 gives a different value
    assert speech.mcd_from_cepstra(np.pad(gen, ((0, 0), (1, 0))), np.pad(ref, ((0, 0), (1, 0)))) != \
        pytest.approx(10 * math.sqrt(2) / math.log(10) * 2, rel=1e-3)
    cepstra = speech.mel_cepstra(synthetic_speech(1.0), SR)
    assert cepstra.shape == (SR // speech.MCD_HOP + 1, 25)  # c0..c24, one frame every 10 ms
    # on waveforms: a gain moves only c0 (the level), which MCD leaves out; a spectral change does not
    voice = synthetic_speech(2.0)
    assert speech.mcd(2 * voice, voice, SR) < 1e-9
    muffled = np.convolve(voice, np.ones(4) / 4, mode="same")  # a low-pass: less treble
    assert speech.mcd(muffled, voice, SR) > 1.0


def test_identical_speech_scores_perfect_and_noise_moves_every_metric_the_wrong_way(man_clip):
    need("pesq"), need("resemblyzer")
    real, sr = man_clip
    audio = torch.from_numpy(real).float()
    perfect = evaluate_speech((audio, sr), (audio.clone(), sr))
    assert perfect.values["stoi"] == pytest.approx(1.0, abs=1e-6)
    assert perfect.values["estoi"] == pytest.approx(1.0, abs=1e-6)
    assert perfect.values["pesq_wb"] == pytest.approx(4.644, abs=1e-3)  # P.862.2's ceiling
    assert perfect.values["pesq_nb"] == pytest.approx(4.549, abs=1e-3)  # P.862.1's ceiling
    assert perfect.values["mcd"] == 0.0
    assert perfect.values["sim"] == pytest.approx(1.0, abs=1e-5)
    reports = [perfect] + [evaluate_speech((torch.from_numpy(with_noise(real, snr)), sr), (audio, sr))
                           for snr in (20, 5)]
    for name in ("stoi", "estoi", "pesq_wb", "pesq_nb", "sim"):
        values = [r.values[name] for r in reports]
        assert values[0] > values[1] > values[2], (name, values)
    mcd = [r.values["mcd"] for r in reports]
    assert mcd[0] < mcd[1] < mcd[2], mcd


def test_length_mismatch_is_aligned_by_dtw_and_rates_are_resampled(man_clip):
    real, sr = man_clip
    reference = torch.from_numpy(real)
    # the generated speech starts 0.3 s late and runs at another sample rate
    late = np.concatenate([np.zeros(int(0.3 * 16000)), speech.resample_np(real, sr, 16000)])
    report = evaluate_speech((torch.from_numpy(late), 16000), (reference, sr),
                             models=speech_models_without_sim())
    assert any("resampled from 44100 Hz to 16000 Hz" in n for n in report.notes)
    assert any("aligned to the reference by DTW" in n for n in report.notes)
    assert report.values["stoi"] > 0.85, report.values
    # without the alignment the same pair, cut to equal length, is badly out of step
    naive = speech.stoi(late[: 4 * 16000], speech.resample_np(real, sr, 16000)[: 4 * 16000], 16000)
    assert naive < report.values["stoi"] - 0.2


def speech_models_without_sim():
    from narrate_model.evaluate import MetricModels

    return MetricModels(speaker_encoder=None)


def test_bad_speech_input_gives_notes_not_exceptions(man_clip):
    real, sr = man_clip
    audio = torch.from_numpy(real)
    silent = evaluate_speech((audio, sr), (torch.zeros_like(audio), sr), text="")
    assert "stoi" not in silent.values and any("reference audio is silent" in n for n in silent.notes)
    assert any("wer/cer skipped: the text is empty" in n for n in silent.notes)
    broken = audio.clone()
    broken[1000:1100] = float("nan")
    report = evaluate_speech((broken, sr), (audio, sr), models=speech_models_without_sim())
    assert any("100 NaN/inf values were replaced by 0" in n for n in report.notes)
    assert all(np.isfinite(v) for v in report.values.values()) and report.values["stoi"] > 0.9
    stereo = evaluate_speech((torch.stack([audio, audio]), sr), (audio, sr), models=speech_models_without_sim())
    assert stereo.values["stoi"] == pytest.approx(1.0, abs=1e-6)
    short = evaluate_speech((audio[:2000], sr), (audio[:2000], sr), models=speech_models_without_sim())
    assert any("stoi skipped" in n and "fewer than 30" in n for n in short.notes)
    alone = evaluate_speech((audio, sr))
    assert not alone.values and any("nothing to compare" in n for n in alone.notes)
    batch = evaluate_speech((torch.stack([audio, audio])[:, None], sr), (audio, sr))
    assert not batch.values and any("batch" in n for n in batch.notes)
    no_whisper = evaluate_speech((audio, sr), text="hello", models=speech_models_without_sim())
    assert any("wer/cer skipped: no Whisper model folder" in n for n in no_whisper.notes)

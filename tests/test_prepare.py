"""`python -m narrate_model prepare`: the shared talking-head clips become cached samples, every rejected file gets a
reason, a rerun resumes without recomputing, the voice segment never overlaps the target, and the cached encoder
outputs equal recomputing them. Runs on the fixtures' small models at 64x64, 1 s targets."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, MEDIA, recorded_path
from narrate_model.__main__ import main
from narrate_model.errors import NarrateInputError
from narrate_model.resample import resample
from narrate_model.train.data import (SKIP_REASONS, PrepareSettings, Transcript, check_base_checkpoints,
                                      dataset_info, iter_samples, load_sample, load_text_map, parse_srt,
                                      read_audio, read_manifest, sample_ids)
from narrate_model.weights import sha256_file
from narrate_model.xtts.dvae import load_dvae, speech_codes
from narrate_model.xtts.mel import cloning_mel

XTTS, HALLO = FIXTURES / "xtts", FIXTURES / "hallo"
SHARED_VIDEOS = sorted((MEDIA / "videos").glob("*.mp4"))
EXPECTED_SKIPS = {"no_audio.mp4": "no_audio_stream", "garbage.mp4": "unreadable", "short.mp4": "too_short",
                  "silent.mp4": "too_quiet", "faceless.mp4": "no_face", "untitled.mp4": "transcript_missing"}


def _man_media(seconds: float, side: int = 256):
    """The first `seconds` of man.mp4: frames (IMAGE, downscaled) and its stereo audio [2, T] at 44.1 kHz."""
    frames = []
    with av.open(str(MEDIA / "videos" / "man.mp4")) as c:
        for frame in c.decode(video=0):
            if len(frames) >= round(seconds * 25):
                break
            frames.append(frame.to_ndarray(format="rgb24", width=side, height=side))
    wav, rate = read_audio(MEDIA / "videos" / "man.mp4")
    audio = wav[:round(seconds * rate)].expand(2, -1).contiguous()
    return torch.from_numpy(np.stack(frames)).float().div(255), audio, rate


def _make_bad_clips(folder):
    """One file per skip reason, made with PyAV from man.mp4 (a real face and real speech where needed)."""
    from narrate_model.av import write_mp4

    frames, audio, rate = _man_media(4.0)
    write_mp4(str(folder / "no_audio.mp4"), frames[:75], 25)
    (folder / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    write_mp4(str(folder / "short.mp4"), frames[:38], 25, audio[:, :round(1.5 * rate)], rate)
    write_mp4(str(folder / "silent.mp4"), frames, 25, torch.zeros_like(audio), rate)
    grey = torch.full_like(frames, 0.5) + 0.1 * torch.rand(frames.shape, generator=torch.Generator().manual_seed(0))
    write_mp4(str(folder / "faceless.mp4"), grey, 25, audio, rate)
    (folder / "faceless.txt").write_text("a clip whose picture has no face")
    write_mp4(str(folder / "untitled.mp4"), frames, 25, audio, rate)  # no transcript anywhere


def _model_args(tmp):
    """The fixtures' small models in the files the CLI reads (XTTS folder, DVAE, tiny VAE + its config, wav2vec2)."""
    from small_checkpoints import write_wav2vec_folder

    xtts = tmp / "xtts"
    xtts.mkdir()
    shutil.copy(XTTS / "small_config.json", xtts / "config.json")
    shutil.copy(XTTS / "small_model.safetensors", xtts / "model.safetensors")
    shutil.copy(XTTS / "bpe_vocab.json", xtts / "vocab.json")
    shutil.copy(HALLO / "tiny_vae.safetensors", tmp / "vae.safetensors")
    vae_config = json.loads((HALLO / "tiny_config.json").read_text())["tiny_vae"]["config"]
    (tmp / "vae.json").write_text(json.dumps(vae_config))
    wav2vec = write_wav2vec_folder(tmp / "wav2vec2")
    landmarker = recorded_path("NFY_FACE_LANDMARKER")
    assert landmarker, "run tests/install.sh: it fetches MediaPipe's face_landmarker.task"
    return ["--xtts", str(xtts), "--dvae", str(XTTS / "small_dvae.safetensors"), "--vae", str(tmp / "vae.safetensors"),
            "--wav2vec2", str(wav2vec), "--landmarker", landmarker, "--models-dir", str(tmp / "no-models"),
            "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One prepare over the shared videos and the bad clips; returns a function that runs it again."""
    tmp = tmp_path_factory.mktemp("prepare")
    bad = tmp / "bad"
    bad.mkdir()
    _make_bad_clips(bad)
    out = tmp / "dataset"
    argv = (["prepare", *map(str, SHARED_VIDEOS), str(bad), "--out", str(out), "--text-from",
             str(MEDIA / "samples.json"), "--size", "64", "--max-seconds", "1"] + _model_args(tmp))

    def again(extra=()):
        return main(argv + list(extra))

    assert again() == 0
    return {"out": out, "again": again, "bad": bad}


def test_good_clips_are_accepted_and_every_rejected_file_has_its_reason(run):
    rows = {row["source"].rsplit("/", 1)[-1]: row for row in read_manifest(run["out"])}
    assert len(rows) == len(SHARED_VIDEOS) + len(EXPECTED_SKIPS)
    assert {name: row["reason"] for name, row in rows.items() if row["status"] == "skipped"} == EXPECTED_SKIPS
    assert set(EXPECTED_SKIPS.values()) == set(SKIP_REASONS)  # every reason of the vocabulary is exercised
    for video in SHARED_VIDEOS:
        row = rows[video.name]
        assert row["status"] == "accepted" and row["frames"] == 25 and row["text_covers"] == "clip"
        assert (run["out"] / row["shard"]).is_file()
    samples = {s["meta"]["source"].rsplit("/", 1)[-1]: s for s in iter_samples(run["out"])}
    texts = load_text_map(MEDIA / "samples.json")
    for name, sample in samples.items():
        assert sample["meta"]["text"] == texts[name]
        frames = sample["meta"]["frames"]
        assert sample["latents_mean"].shape == sample["latents_std"].shape == (frames, 4, 8, 8)
        assert sample["audio_windows"].shape[0] == frames and sample["target_wav_24k"].shape == (24000 * frames // 25,)
        assert sample["dvae_codes"].shape == (math.ceil(22050 * frames / 25 / 1024),)
        assert sample["cond_mel"].shape == (80, 173) and sample["gpt_cond_latent"].shape == (32, 64)
        assert sample["face_region"].shape == (1, 64, 64) and sample["mask_lip_0"].shape == (1, 64)
        assert bool((sample["latents_std"] > 0).all())  # moments, so training can sample as Hallo does


def test_dataset_records_the_base_checkpoints_and_refuses_others(run):
    info = dataset_info(run["out"])
    assert info["settings"] == {"size": 64, "voice_seconds": 2.0, "max_seconds": 1.0, "language": "en"}
    checkpoints = info["checkpoints"]
    assert set(checkpoints) == {"xtts", "xtts_config", "xtts_vocab", "dvae", "vae", "wav2vec2", "landmarker"}
    assert checkpoints["dvae"]["sha256"] == sha256_file(XTTS / "small_dvae.safetensors")
    check_base_checkpoints(run["out"], checkpoints)  # the same ones pass
    other = {**checkpoints, "dvae": {"file": "dvae.pth", "sha256": "0" * 64}}
    with pytest.raises(NarrateInputError, match="other base checkpoints: dvae"):
        check_base_checkpoints(run["out"], other)


def test_rerun_resumes_without_recomputing_finished_clips(run, capsys):
    out = run["out"]
    stamps = {sid: (out / "samples" / f"{sid}.safetensors").stat().st_mtime_ns for sid in sample_ids(out)}
    manifest = (out / "manifest.jsonl").read_text()
    capsys.readouterr()
    assert run["again"]() == 0
    assert "0 prepared, 4 already done, 6 skipped" in capsys.readouterr().out
    assert {sid: (out / "samples" / f"{sid}.safetensors").stat().st_mtime_ns for sid in stamps} == stamps
    assert (out / "manifest.jsonl").read_text() == manifest
    # a missing shard is not "finished": exactly that clip is computed again; a transcript added since the last
    # run is found (transcript_missing is re-examined, the other verdicts of unchanged files are kept)
    victim = sorted(stamps)[0]
    (out / "samples" / f"{victim}.safetensors").unlink()
    (run["bad"] / "untitled.txt").write_text("in the district court")
    assert run["again"]() == 0
    captured = capsys.readouterr()
    assert "2 prepared, 3 already done, 5 skipped" in captured.out
    assert "faceless.mp4: skipped before (no_face), unchanged" in captured.err
    assert (out / "samples" / f"{victim}.safetensors").is_file()
    assert {r["source"].rsplit("/", 1)[-1]: r["status"] for r in read_manifest(out)}["untitled.mp4"] == "accepted"
    # other settings would mix incompatible samples into one dataset: refused before any model is loaded
    assert run["again"](["--voice-seconds", "3"]) == 2
    assert "other settings" in capsys.readouterr().err


def _source_audio(sample):
    return read_audio(Path(sample["meta"]["source"]))


def test_voice_segment_is_taken_after_the_target_and_never_overlaps_it(run):
    mel_stats = load_file(str(XTTS / "small_model.safetensors"))["mel_stats"]
    for sample in iter_samples(run["out"]):
        meta = sample["meta"]
        (t0, t1), (v0, v1) = meta["target"], meta["voice"]
        assert t0 == 0 and t1 == meta["frames"] / 25 <= v0 and v1 - v0 == pytest.approx(2.0)
        wav, rate = _source_audio(sample)
        assert v1 == pytest.approx(meta["clip_seconds"], abs=1 / rate)

        def cond_mel(start):
            segment = wav[round(start * rate):round(start * rate) + round(2.0 * rate)]
            return cloning_mel(resample(segment, rate, 22050).clamp(-1, 1)[None], mel_stats)[0]
        # the cached conditioning mel is that of the recorded voice span, not of the clip's start (the target)
        assert torch.allclose(sample["cond_mel"], cond_mel(v0), atol=1e-5)
        assert not torch.allclose(sample["cond_mel"], cond_mel(0.0), atol=1e-2)
        target = resample(wav[:round(t1 * rate)], rate, 24000)
        assert torch.allclose(sample["target_wav_24k"], target, atol=1e-6)


def test_cached_dvae_codes_equal_recomputing_them(run):
    dvae = load_dvae(XTTS / "small_dvae.safetensors")
    norms = load_file(str(XTTS / "small_model.safetensors"))["mel_stats"]  # no mel_stats.pth given: model.pth's
    for sample in iter_samples(run["out"]):
        wav, rate = _source_audio(sample)
        end = round(sample["meta"]["target"][1] * rate)
        codes = speech_codes(dvae, resample(wav[:end], rate, 22050).clamp(-1, 1)[None], norms)[0]
        assert torch.equal(sample["dvae_codes"], codes)
        shifted = speech_codes(dvae, resample(wav[rate // 2:rate // 2 + end], rate, 22050).clamp(-1, 1)[None],
                               norms)[0]
        assert not torch.equal(sample["dvae_codes"], shifted)  # the comparison can fail: other audio, other codes


def test_timed_transcripts_give_the_target_its_own_words():
    srt = "1\n00:00:00,000 --> 00:00:00,800\nHello <i>there</i>\n\n2\n00:00:01,000 --> 00:00:02,500\nsecond line\n" \
          "continued\n\n3\n00:00:03,000 --> 00:00:04,000\nvoice part\n"
    cues = parse_srt(srt)
    assert cues == [(0.0, 0.8, "Hello there"), (1.0, 2.5, "second line continued"), (3.0, 4.0, "voice part")]
    timed = Transcript(" ".join(c[2] for c in cues), cues, "x.srt")
    assert timed.for_span(2.0) == ("Hello there second line continued", "target")
    assert timed.for_span(1.0) == ("Hello there", "target")
    assert Transcript("whole clip text").for_span(1.0) == ("whole clip text", "clip")
    with pytest.raises(NarrateInputError, match="multiple of 64"):
        PrepareSettings(size=100).check()


def test_load_sample_names_a_missing_sample(run):
    with pytest.raises(NarrateInputError, match="not in"):
        load_sample(run["out"], "nope")

"""Hallo audio side: wav2vec2 speech features and audio tokens vs io_audio (atol/rtol 1e-4)."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from narrate_model.errors import CheckpointError, NarrateInputError
from narrate_model.hallo.audio import (
    AudioFeatures, encoder_layer_states, frame_aligned_cnn_features, frame_count, frame_windows, load_wav2vec,
    normalize, pad_to_clips, speech_features)
from narrate_model.hallo.projections import AudioProjModel
from small_checkpoints import write_wav2vec_folder

HALLO = FIXTURES / "hallo"
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def io():
    return load_file(HALLO / "io_audio.safetensors")


@pytest.fixture(scope="module")
def wav2vec(tmp_path_factory):
    return load_wav2vec(write_wav2vec_folder(tmp_path_factory.mktemp("wav2vec2")))


def tiny_audioproj() -> AudioProjModel:
    cfg = json.loads((HALLO / "tiny_config.json").read_text())["audioproj"]
    model = AudioProjModel(**cfg).eval()
    with safe_open(HALLO / "tiny_net.safetensors", "pt") as f:
        model.load_state_dict({k[len("audioproj."):]: f.get_tensor(k) for k in f.keys()
                               if k.startswith("audioproj.")}, strict=True)
    return model


def test_full_size_audioproj_keys_match_net_pth():
    full = json.loads((HALLO / "tiny_config.json").read_text())["full_size_values"]["audioproj"]
    with torch.device("meta"):
        model = AudioProjModel(**full)
    rows = [line.split("\t") for line in (HALLO / "manifest_net.tsv").read_text().splitlines()]
    expected = {r[0][len("audioproj."):]: json.loads(r[1]) for r in rows if r[0].startswith("audioproj.")}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected


def test_each_preprocessing_step_matches_hallo(io, wav2vec):
    normalized = normalize(io["wave_16k"])
    torch.testing.assert_close(normalized, io["input_values_normalized"], **TOL)
    num_frames = frame_count(io["wave_16k"].shape[0], 25)
    assert num_frames == int(io["audio_length"]) == 50
    padded, frames = pad_to_clips(normalized, num_frames, 25, 16)
    assert frames == 64
    torch.testing.assert_close(padded[None], io["input_values_padded"], **TOL)
    with torch.no_grad():
        inputs = io["input_values_padded"]
        torch.testing.assert_close(wav2vec.feature_extractor(inputs), io["cnn_features"], **TOL)
        features = frame_aligned_cnn_features(wav2vec, inputs, frames)
        torch.testing.assert_close(features, io["interpolated_features"], **TOL)
        torch.testing.assert_close(encoder_layer_states(wav2vec, features), io["audio_emb"], **TOL)
    torch.testing.assert_close(frame_windows(io["audio_emb"]), io["audio_emb_windowed"], atol=0, rtol=0)


def test_speech_features_and_audio_tokens_end_to_end(io, wav2vec):
    calls = []
    result = speech_features(wav2vec, io["wave_16k"][None], 16000, fps=25, clip_length=16,
                             progress=lambda done, total: calls.append((done, total)))
    assert isinstance(result, AudioFeatures)
    assert (result.num_frames, result.seconds, result.fps) == (50, 2.0, 25)
    assert calls == [(1, 2), (2, 2)]
    torch.testing.assert_close(result.windows, io["audio_emb_windowed"], **TOL)
    windows = result.windows
    with torch.no_grad():
        tokens = tiny_audioproj()(windows.reshape(-1, 16, *windows.shape[1:]))
    torch.testing.assert_close(tokens, io["audio_tokens_per_clip"], **TOL)


def test_any_rate_and_channel_count(io, wav2vec):
    mono = speech_features(wav2vec, io["wave_16k"][None], 16000)
    stereo = speech_features(wav2vec, io["wave_16k"][None].repeat(2, 1), 16000)
    torch.testing.assert_close(stereo.windows, mono.windows, atol=1e-6, rtol=0)
    # 1.3 s at 44.1 kHz stereo, at 30 fps: ceil(1.3 * 30) = 39 frames kept, padded to 3 clips of 16
    wave = torch.randn(2, int(1.3 * 44100), generator=torch.Generator().manual_seed(0)) * 0.1
    result = speech_features(wav2vec, wave, 44100, fps=30)
    assert result.num_frames == 39 and result.windows.shape == (48, 5, 2, 32)
    assert abs(result.seconds - 1.3) < 1e-4 and torch.isfinite(result.windows).all()


def test_empty_audio_is_a_user_error(wav2vec):
    with pytest.raises(NarrateInputError, match="audio"):
        speech_features(wav2vec, torch.zeros(1, 0), 16000)


def test_wrong_folders_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_wav2vec(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="not wav2vec2"):
        load_wav2vec(write_wav2vec_folder(tmp_path / "bert", model_type="bert"))
    weights = load_file(HALLO / "tiny_wav2vec2.safetensors")
    del weights["wav2vec2.feature_projection.projection.weight"]
    weights["wav2vec2.stray.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="1 missing .*feature_projection.projection.weight.*1 unexpected"):
        load_wav2vec(write_wav2vec_folder(tmp_path / "partial", weights))
    with pytest.raises(CheckpointError, match=r"mis-shaped \(e.g. encoder.layer_norm.bias \(32,\) vs \(48,\)"):
        load_wav2vec(write_wav2vec_folder(tmp_path / "wider", hidden_size=48))

"""Hallo audio side: wav2vec2 speech features and audio tokens vs io_audio."""
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FIXTURES
from narrate_model.hallo.projections import AudioProjModel

HALLO = FIXTURES / "hallo"
TOL = dict(atol=1e-4, rtol=1e-4)


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


def test_audio_tokens_per_clip_from_stored_windows():
    io = load_file(HALLO / "io_audio.safetensors")
    windows = io["audio_emb_windowed"]
    with torch.no_grad():
        tokens = tiny_audioproj()(windows.reshape(-1, 16, *windows.shape[1:]))
    torch.testing.assert_close(tokens, io["audio_tokens_per_clip"], **TOL)

"""XTTS-v2 config, HiFi-GAN decoder and checkpoint loading: fixture parity, the full-size key contract, both
weight-norm layouts, and the errors a user sees for wrong or incomplete files."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from narrate_model.errors import CheckpointError
from narrate_model.xtts.config import XttsConfig
from narrate_model.xtts.hifigan import HifiDecoder

XTTS = FIXTURES / "xtts"
SMALL_FILES = [XTTS / "small_config.json", XTTS / "small_model.safetensors"]


@pytest.fixture(scope="module")
def small_cfg():
    return XttsConfig.from_json(XTTS / "small_config.json")


@pytest.fixture(scope="module")
def small_sd():
    return load_file(str(XTTS / "small_model.safetensors"))


@pytest.fixture(scope="module")
def io_hifigan():
    return load_file(str(XTTS / "io_hifigan.safetensors"))


@pytest.fixture(scope="module")
def loaded():
    from narrate_model.xtts.checkpoint import load_xtts
    return load_xtts(SMALL_FILES)


def vocode(decoder, io):
    with torch.no_grad():
        return decoder(io["latents"], io["speaker_embedding"])


def manifest():
    rows = (XTTS / "manifest_full.tsv").read_text().splitlines()[1:]
    return {key: (json.loads(shape), dtype) for key, shape, dtype, _ in (r.split("\t") for r in rows)}


# ---------------------------------------------------------------------------------------------------------- config
def test_config_v2_and_fixture(small_cfg):
    v2 = XttsConfig.v2()
    assert (v2.gpt_layers, v2.gpt_n_model_channels, v2.gpt_n_heads, v2.gpt_number_text_tokens) == (30, 1024, 16, 6681)
    assert (v2.gpt_start_audio_token, v2.gpt_stop_audio_token, v2.gpt_num_audio_tokens) == (1024, 1025, 1026)
    assert (v2.max_mel_tokens, v2.max_text_tokens, v2.max_gen_mel_tokens, v2.gpt_n_positions) == (608, 404, 602, 1082)
    assert (v2.input_sample_rate, v2.output_sample_rate, v2.d_vector_dim, v2.perceiver_ff_inner) == (22050, 24000,
                                                                                                    512, 2730)
    assert (small_cfg.gpt_layers, small_cfg.gpt_n_model_channels, small_cfg.gpt_n_heads) == (2, 64, 4)
    assert small_cfg.gpt_number_text_tokens == 5413 and small_cfg.perceiver_ff_inner == 170
    assert small_cfg.upsample_initial_channel_decoder == 64 and small_cfg.decoder_input_dim == 64
    assert small_cfg.speaker_encoder_num_filters == [8, 8, 16, 32]


def test_config_reads_coqui_layout(tmp_path):
    """A coqui config.json: model_args + top-level presets, nulls keep defaults, unknown keys are ignored."""
    data = {"model": "xtts", "audio": {"sample_rate": 22050}, "temperature": 0.65, "gpt_cond_chunk_len": 6,
            "model_args": {"gpt_layers": 30, "gpt_number_text_tokens": 6681, "gpt_start_text_token": None,
                           "gpt_stop_text_token": None, "gpt_checkpoint": None, "clvp_checkpoint": None,
                           "duration_const": 102400, "decoder_input_dim": 1024, "gpt_use_perceiver_resampler": True}}
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = XttsConfig.from_json(tmp_path / "config.json")
    assert (cfg.gpt_start_text_token, cfg.gpt_stop_text_token) == (261, 0)
    assert cfg.temperature == 0.65 and cfg.gpt_cond_chunk_len == 6 and cfg.decoder_input_dim == 1024


# ---------------------------------------------------------------------------------------------------------- HiFi-GAN
def test_hifigan_reproduces_upstream(small_cfg, small_sd, io_hifigan):
    decoder = HifiDecoder(small_cfg)
    prefix = "hifigan_decoder."
    decoder.load_state_dict({k[len(prefix):]: v for k, v in small_sd.items() if k.startswith(prefix)}, strict=True)
    decoder.eval()
    seen = {}
    decoder.waveform_decoder.register_forward_pre_hook(lambda m, args: seen.update(z=args[0]))
    wav = vocode(decoder, io_hifigan)
    # upstream hands the generator an unbatched [C,T] for batch 1; ours keeps the batch axis, same numbers
    assert torch.allclose(seen["z"][0], io_hifigan["generator_input_z"], atol=1e-6)
    assert wav.shape == (1, 1, 44544) and torch.allclose(wav, io_hifigan["wav"], atol=1e-4, rtol=0)
    decoder.fold_weight_norm()
    assert not any("parametrizations" in k for k in decoder.state_dict())
    folded = vocode(decoder, io_hifigan)
    assert torch.allclose(folded, io_hifigan["wav"], atol=1e-4, rtol=0)
    # batch > 1: each item as if alone, with one shared or per-item speaker embedding
    latents = torch.cat([io_hifigan["latents"], io_hifigan["latents"].flip(1)])
    with torch.no_grad():
        both = decoder(latents, io_hifigan["speaker_embedding"])
        per_item = decoder(latents, io_hifigan["speaker_embedding"].expand(2, -1, -1))
        second = decoder(latents[1:], io_hifigan["speaker_embedding"])
    assert both.shape == (2, 1, 44544) and torch.allclose(both, per_item, atol=1e-6)
    assert torch.allclose(both[:1], folded, atol=1e-5) and torch.allclose(both[1:], second, atol=1e-5)


# ------------------------------------------------------------------------------------------------ full-size contract
def test_full_size_model_matches_manifest():
    from narrate_model.xtts.model import XttsModel
    model = XttsModel.from_config(XttsConfig.v2())  # meta device: no memory
    ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    expected = manifest()
    assert set(ours) - set(expected) == set() and set(expected) - set(ours) == set()
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    assert len(ours) == 963 and "mel_stats" in ours


def test_small_model_loads_strictly(loaded, small_sd, io_hifigan):
    model, cfg = loaded
    assert not model.training and cfg.gpt_n_model_channels == 64
    assert torch.equal(model.mel_stats, small_sd["mel_stats"])
    assert model.hifigan_decoder.speaker_encoder.bn1.num_batches_tracked.dtype == torch.int64
    assert not any("parametrizations" in k for k in model.state_dict()), "weight norm is folded at load"
    assert not any(t.is_meta for t in model.state_dict().values())
    assert torch.allclose(vocode(model.hifigan_decoder, io_hifigan), io_hifigan["wav"], atol=1e-4, rtol=0)


def _trainer_style_pth(small_sd, path):
    """model.pth as older tools write it: under "model", `xtts.` prefix, DVAE and inference aliases, and
    weight norm as weight_g / weight_v."""
    sd = {}
    for key, value in small_sd.items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        sd["xtts." + key] = value
    sd["xtts.dvae.codebook.embed"] = torch.zeros(4, 4)
    sd["gpt.gpt_inference.lm_head.0.weight"] = torch.zeros(3)
    sd["gpt.gpt.wte.weight"] = small_sd["gpt.mel_embedding.weight"]
    torch.save({"model": sd, "optimizer": None, "step": 7}, path)


def test_old_weight_norm_layout_and_pth(tmp_path, small_sd, loaded, io_hifigan):
    from narrate_model.xtts.checkpoint import load_xtts
    folder = tmp_path / "my_voice_model"
    folder.mkdir()
    shutil.copy(XTTS / "small_config.json", folder / "config.json")
    _trainer_style_pth(small_sd, folder / "model.pth")
    model, _ = load_xtts(folder)
    reference, _ = loaded
    for key, value in reference.state_dict().items():  # identical tensors, folded weights included
        assert torch.equal(model.state_dict()[key], value), key
    # (outputs agree to float noise only: oneDNN may pick other kernels for differently aligned buffers)
    assert torch.allclose(vocode(model.hifigan_decoder, io_hifigan), io_hifigan["wav"], atol=1e-4, rtol=0)


def test_folded_state_dict_round_trips(tmp_path, loaded, io_hifigan):
    """Our own folded model saved as safetensors loads back (plain `weight` where g/v are expected)."""
    from narrate_model.xtts.checkpoint import load_xtts
    model, _ = loaded
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    shutil.copy(XTTS / "small_config.json", tmp_path / "config.json")
    again, _ = load_xtts(tmp_path)
    assert torch.allclose(vocode(again.hifigan_decoder, io_hifigan), vocode(model.hifigan_decoder, io_hifigan),
                          atol=1e-6)


def test_dtype_and_device(loaded):
    from narrate_model.xtts.checkpoint import load_xtts
    model, _ = load_xtts(SMALL_FILES, device="cpu", dtype=torch.bfloat16)
    assert model.hifigan_decoder.waveform_decoder.conv_pre.weight.dtype == torch.bfloat16
    assert model.hifigan_decoder.speaker_encoder.bn1.num_batches_tracked.dtype == torch.int64


# ------------------------------------------------------------------------------------------------------------ errors
def _write_folder(tmp_path, sd, name="model.safetensors"):
    folder = tmp_path / "xtts_v2"
    folder.mkdir()
    shutil.copy(XTTS / "small_config.json", folder / "config.json")
    if name.endswith(".safetensors"):
        save_file(sd, str(folder / name))
    else:
        torch.save(sd, folder / name)
    return folder


@pytest.mark.parametrize("what, sd, name", [
    ("hallo", {"reference_unet.conv_in.weight": torch.zeros(3, 4, 3, 3),
               "denoising_unet.conv_in.weight": torch.zeros(3, 4, 3, 3)}, "net.pth"),
    ("sd15", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3, 4, 3, 3)}, "model.safetensors"),
])
def test_other_model_is_refused(tmp_path, what, sd, name):
    from narrate_model.xtts.checkpoint import load_xtts
    folder = _write_folder(tmp_path, sd, name)
    with pytest.raises(CheckpointError, match="not an XTTS-v2 checkpoint"):
        load_xtts([folder / "config.json", folder / name])


def test_missing_unexpected_and_misshaped_keys(tmp_path, small_sd):
    from narrate_model.xtts.checkpoint import load_xtts
    sd = dict(small_sd)
    del sd["gpt.conditioning_perceiver.norm.gamma"]
    sd["gpt.extra_head.weight"] = torch.zeros(2)
    sd["hifigan_decoder.waveform_decoder.conv_post.weight"] = torch.zeros(1, 16, 7)
    folder = _write_folder(tmp_path, sd)
    with pytest.raises(CheckpointError) as err:
        load_xtts(folder)
    text = str(err.value)
    assert "1 missing: gpt.conditioning_perceiver.norm.gamma" in text
    assert "1 unexpected: gpt.extra_head.weight" in text
    assert "mis-shaped: hifigan_decoder.waveform_decoder.conv_post.weight (1, 16, 7) (expected (1, 4, 7))" in text


def test_missing_files_say_where_they_go(tmp_path):
    from narrate_model.xtts.checkpoint import load_xtts
    folder = tmp_path / "XTTS-v2"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json.*models/narrate/xtts/XTTS-v2/"):
        load_xtts(folder)
    shutil.copy(XTTS / "small_config.json", folder / "config.json")
    with pytest.raises(CheckpointError, match=r"model\.pth.*models/narrate/xtts/XTTS-v2/"):
        load_xtts(folder)


def test_loaded_model_end_to_end_voice_and_vocoder(loaded):
    """The loaded XttsModel through the public entry points: voice profile from the 22.05 kHz clip, and the
    vocoder on the GPT latents of upstream's real inference call (io_generate)."""
    from narrate_model.xtts.voice import encode_voice
    model, _ = loaded
    cond = load_file(str(XTTS / "io_conditioning.safetensors"))
    speaker = load_file(str(XTTS / "io_speaker.safetensors"))
    voice = encode_voice(model, [(cond["wav_22050"], 22050)])
    assert torch.allclose(voice.gpt_cond_latent, cond["gpt_cond_latent_len30_chunk4"], atol=1e-4, rtol=1e-4)
    assert torch.allclose(voice.speaker_embedding, speaker["speaker_embedding"], atol=1e-5, rtol=0)
    gen = load_file(str(XTTS / "io_generate.safetensors"))
    for run in ("rep1", "rep10"):
        with torch.no_grad():
            wav = model.hifigan_decoder(gen[f"{run}.gpt_latents"], gen["speaker_embedding"])
        assert torch.allclose(wav.flatten(), gen[f"{run}.wav"], atol=1e-4, rtol=0), run

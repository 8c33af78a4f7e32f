"""Hallo sampling loop: upstream's 3-step pipeline run (io_sampler) and the multi-clip loop with motion frames."""
import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler
from safetensors.torch import load_file

from conftest import FIXTURES
from narrate_model.errors import NarrateInputError
from narrate_model.hallo.checkpoint import load_net
from narrate_model.hallo.net import build_net, tiny_config
from narrate_model.hallo.sampler import (FaceInputs, SamplerSettings, diffusers_vae_callables, iter_video_clips,
                                         make_scheduler, sample_video)

HALLO = FIXTURES / "hallo"
LEVELS = (16, 8, 4, 2)
SCALE = 0.18215


@pytest.fixture(scope="module")
def net():
    with torch.no_grad():
        return load_net(build_net(tiny_config(HALLO / "tiny_config.json")), HALLO / "tiny_net.safetensors")


@pytest.fixture(scope="module")
def vae():
    config = json.loads((HALLO / "tiny_config.json").read_text())["tiny_vae"]["config"]
    model = AutoencoderKL(**config)
    model.load_state_dict(load_file(str(HALLO / "tiny_vae.safetensors")))
    return diffusers_vae_callables(model.eval())


@pytest.fixture(scope="module")
def inputs():
    data = load_file(str(HALLO / "io_unet.safetensors"))
    return {k[3:]: v for k, v in data.items() if k.startswith("in.")}


@pytest.fixture(scope="module")
def face(inputs):
    return FaceInputs(inputs["face_emb"][0], inputs["face_mask_pixels"][0],
                      *[[inputs[f"{region}_mask_{level}"] for level in LEVELS] for region in ("full", "face", "lip")])


def max_err(a, b):
    assert a.shape == b.shape
    return (a - b).abs().max().item()


class Recorder:
    """Wraps a module's forward and keeps (first positional input, output) of each call."""

    def __init__(self, monkeypatch, module):
        self.calls = []
        forward = module.forward

        def recorded(x, *args, **kwargs):
            out = forward(x, *args, **kwargs)
            self.calls.append((x.clone(), out if not torch.is_tensor(out) else out.clone()))
            return out
        monkeypatch.setattr(module, "forward", recorded)


def test_three_ddim_steps_match_upstream_pipeline(net, vae, inputs, face, monkeypatch):
    expected = load_file(str(HALLO / "io_sampler.safetensors"))
    encode, decode = vae
    ref_pixels = (expected["ref_image"][0, :1].permute(0, 2, 3, 1) + 1) / 2
    ref_latents = encode(ref_pixels).detach()
    assert max_err(ref_latents, expected["ref_latents_unscaled"][:1]) < 1e-4
    unet = Recorder(monkeypatch, net.denoising_unet)
    seen = []
    settings = SamplerSettings(steps=3, cfg=3.5, seed=42, clip_length=4)
    latents = sample_video(net, face, inputs["audio_tokens"][0], ref_latents, settings,
                           vae_encode=encode, vae_decode=decode, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert latents.shape == (4, 4, 16, 16)
    steps = unet.calls
    assert len(steps) == 3
    assert torch.equal(steps[0][0][:1], expected["initial_latents"])  # seed 42 on a CPU generator, as upstream
    for i in range(3):
        assert max_err(steps[i][1], expected["noise_pred_per_step"][i]) < 5e-4
    for i in range(2):  # the latents after step i are the next step's input
        assert max_err(steps[i + 1][0][:1], expected["latents_per_step"][i]) < 1e-3
    final = latents.transpose(0, 1)[None] * SCALE
    assert max_err(final, expected["final_latents"]) < 1e-3
    with torch.no_grad():
        video = decode(latents).permute(3, 0, 1, 2)[None]
    assert max_err(video, expected["videos"]) < 1e-3


def test_two_clips_carry_the_last_frames_over(net, vae, face, monkeypatch):
    encode, decode = vae
    ref_latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    windows = torch.randn(20, 5, 2, 32, generator=torch.Generator().manual_seed(2))  # 20 frames of wav2vec windows
    reference = Recorder(monkeypatch, net.reference_unet)
    decoded, encoded = [], []

    def recording_decode(z):
        decoded.append(z.clone())
        return decode(z)

    def recording_encode(px):
        encoded.append(encode(px))
        return encoded[-1]
    seen = []
    settings = SamplerSettings(steps=1, cfg=3.5, seed=7, clip_length=16, motion_frames=2)
    latents = sample_video(net, face, windows, ref_latents, settings, vae_encode=recording_encode,
                           vae_decode=recording_decode, progress=lambda done, total: seen.append((done, total)))
    assert latents.shape == (20, 4, 16, 16) and torch.isfinite(latents).all()
    assert seen == [(1, 2), (2, 2)]  # one unit per denoising step, over both clips
    # clip 1 conditions on [reference, reference, reference]; clip 2 on [reference, frame 14, frame 15] re-encoded
    first, second = reference.calls[0][0], reference.calls[1][0]
    assert first.shape[0] == 6  # [r, m1, m2] for each CFG half
    assert torch.allclose(first[1:3], ref_latents.expand(2, -1, -1, -1) * SCALE, atol=1e-6)
    assert len(decoded) == 1 and max_err(decoded[0], latents[14:16]) < 1e-5
    assert torch.allclose(second[0], ref_latents[0] * SCALE, atol=1e-6)
    assert torch.allclose(second[1:3], encoded[0] * SCALE, atol=1e-6)


def test_clip_generator_streams_what_sample_video_returns(net, vae, face):
    encode, decode = vae
    ref_latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    windows = torch.randn(9, 5, 2, 32, generator=torch.Generator().manual_seed(9))  # clips of 4: 4 + 4 + 1 frames
    settings = SamplerSettings(steps=2, cfg=3.5, seed=11, clip_length=4, motion_frames=2)
    seen = []
    clips = iter_video_clips(net, face, windows, ref_latents, settings, vae_encode=encode, vae_decode=decode,
                             progress=lambda done, total: seen.append(done))
    first = next(clips)
    assert seen == [1, 2]  # lazy: only the first clip has been denoised when it arrives
    streamed = [first, *clips]
    assert [tuple(c.shape) for c in streamed] == [(4, 4, 16, 16), (4, 4, 16, 16), (1, 4, 16, 16)]
    assert all(c.device.type == "cpu" and c.dtype == torch.float32 for c in streamed)
    whole = sample_video(net, face, windows, ref_latents, settings, vae_encode=encode, vae_decode=decode)
    assert torch.equal(torch.cat(streamed), whole)


def test_windows_and_projected_tokens_give_the_same_video(net, vae, inputs, face):
    encode, decode = vae
    ref_latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    windows = torch.randn(3, 5, 2, 32, generator=torch.Generator().manual_seed(4))
    settings = SamplerSettings(steps=1, cfg=1.0, seed=5, clip_length=4)
    with torch.no_grad():
        tokens = net.audioproj(windows[None])[0]
    a = sample_video(net, face, windows, ref_latents, settings, vae_encode=encode, vae_decode=decode)
    b = sample_video(net, face, tokens, ref_latents, settings, vae_encode=encode, vae_decode=decode)
    assert a.shape == (3, 4, 16, 16)  # 3 audio frames: one clip of 4, padded and cut back
    assert max_err(a, b) < 1e-4  # same maths, only the audioproj batch differs


def test_schedulers_by_name_share_hallos_noise_schedule():
    ddim = make_scheduler("ddim")
    fixture = json.loads((HALLO / "tiny_config.json").read_text())["scheduler"]["config"]
    assert isinstance(ddim, DDIMScheduler)
    assert {k: ddim.config[k] for k in fixture if not k.startswith("_")} == \
        {k: v for k, v in fixture.items() if not k.startswith("_")}
    euler = make_scheduler("euler")
    assert isinstance(euler, EulerDiscreteScheduler) and euler.config.prediction_type == "v_prediction"
    assert make_scheduler("DPMSolverMultistepScheduler").config.beta_schedule == "linear"
    with pytest.raises(NarrateInputError, match="scheduler"):
        make_scheduler("no-such-scheduler")


def test_bad_settings_are_reported(net, vae, inputs, face):
    encode, decode = vae
    ref_latents = torch.zeros(1, 4, 16, 16)
    with pytest.raises(NarrateInputError, match="clip_length"):
        sample_video(net, face, inputs["audio_tokens"][0], ref_latents, SamplerSettings(clip_length=31),
                     vae_encode=encode, vae_decode=decode)
    with pytest.raises(NarrateInputError, match="audio_features"):
        sample_video(net, face, torch.zeros(4, 32, 768), ref_latents, SamplerSettings(),
                     vae_encode=encode, vae_decode=decode)
    with pytest.raises(NarrateInputError, match="face"):
        sample_video(net, face, inputs["audio_tokens"][0], torch.zeros(1, 4, 8, 8), SamplerSettings(),
                     vae_encode=encode, vae_decode=decode)

"""Voice side of XTTS-v2 against the upstream fixtures: mel front ends, resampling, conditioning encoder + perceiver,
speaker encoder, and the voice profile (several clips, any rate / channel count, silent and short clips)."""
from types import SimpleNamespace

import pytest
import torch
import torchaudio as ta  # ComfyUI itself requires torchaudio: its absence is a broken install, not a skip
from safetensors.torch import load_file

from conftest import FIXTURES
from narrate_model.errors import NarrateInputError
from narrate_model import resample as resampling
from narrate_model.xtts import mel
from narrate_model.xtts.conditioning import ConditioningEncoder, PerceiverResampler, gpt_cond_latents, style_embedding
from narrate_model.xtts.config import XttsConfig
from narrate_model.xtts.speaker import SpeakerEncoder
from narrate_model.xtts.voice import VoiceProfile, encode_voice

XTTS = FIXTURES / "xtts"
TOL = dict(atol=1e-4, rtol=1e-4)


def close(actual, expected, atol=1e-4, rtol=1e-4):
    err = (actual - expected).abs().max().item()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"max abs error {err:.3g}"
    return err


@pytest.fixture(scope="module")
def io_cond():
    return load_file(str(XTTS / "io_conditioning.safetensors"))


@pytest.fixture(scope="module")
def io_speaker():
    return load_file(str(XTTS / "io_speaker.safetensors"))


@pytest.fixture(scope="module")
def small():
    """The reduced upstream model's voice modules, loaded strictly from small_model.safetensors."""
    cfg = XttsConfig.from_json(XTTS / "small_config.json")
    sd = load_file(str(XTTS / "small_model.safetensors"))

    def part(module, prefix):
        module.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
        return module.eval()

    encoder = part(ConditioningEncoder(cfg), "gpt.conditioning_encoder.")
    perceiver = part(PerceiverResampler(cfg), "gpt.conditioning_perceiver.")
    speaker = part(SpeakerEncoder(cfg), "hifigan_decoder.speaker_encoder.")
    # duck-typed stand-in for XttsModel: encode_voice only needs these attributes
    return SimpleNamespace(gpt=SimpleNamespace(conditioning_encoder=encoder, conditioning_perceiver=perceiver),
                           hifigan_decoder=SimpleNamespace(speaker_encoder=speaker), mel_stats=sd["mel_stats"])


# ---------------------------------------------------------------------------------------------------- front ends
@pytest.mark.parametrize("name, start, stop", [("mel_len30_chunk4_0", 0, 4), ("mel_len30_chunk4_1", 4, 6),
                                               ("mel_len6_chunk6_0", 0, 6)])
def test_cloning_mel_matches_upstream(io_cond, name, start, stop):
    wav = io_cond["wav_22050"][:, 22050 * start:22050 * stop]
    close(mel.cloning_mel(wav, io_cond["mel_stats"]), io_cond[name], **TOL)


@pytest.mark.parametrize("orig, new", [(44100, 22050), (22050, 16000), (48000, 22050), (8000, 22050)])
def test_own_resampler_equals_torchaudio(orig, new):
    wav = torch.randn(2, 3, 7001)
    ours, theirs = resampling.resample_sinc(wav, orig, new), ta.functional.resample(wav, orig, new)
    assert ours.shape == theirs.shape
    close(ours, theirs, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ conditioning latents
def test_conditioning_encoder_and_style_embeddings(small, io_cond):
    encoder, perceiver = small.gpt.conditioning_encoder, small.gpt.conditioning_perceiver
    with torch.no_grad():
        close(encoder(io_cond["mel_len30_chunk4_0"]), io_cond["conditioning_encoder_out_len30_chunk4_0"], **TOL)
        for tag in ["len30_chunk4_0", "len30_chunk4_1", "len6_chunk6_0"]:
            close(style_embedding(encoder, perceiver, io_cond[f"mel_{tag}"]), io_cond[f"style_emb_{tag}"], **TOL)


@pytest.mark.parametrize("length, chunk", [(30, 4), (6, 6)])
def test_gpt_cond_latents(small, io_cond, length, chunk):
    out = gpt_cond_latents(small.gpt, io_cond["wav_22050"], io_cond["mel_stats"], length, chunk)
    close(out, io_cond[f"gpt_cond_latent_len{length}_chunk{chunk}"], **TOL)


def test_gpt_cond_latents_skips_short_tail(small, io_cond):
    """A 4.2 s clip in 4 s chunks: the 0.2 s tail is under 0.33 s and ignored, as upstream."""
    wav = io_cond["wav_22050"][:, :int(22050 * 4.2)]
    pair = (small.gpt.conditioning_encoder, small.gpt.conditioning_perceiver)
    assert torch.equal(gpt_cond_latents(pair, wav, io_cond["mel_stats"], 30, 4),
                       gpt_cond_latents(pair, wav[:, :22050 * 4], io_cond["mel_stats"], 30, 4))


# ------------------------------------------------------------------------------------------------ speaker encoder
def test_speaker_encoder(small, io_speaker, io_cond):
    encoder = small.hifigan_decoder.speaker_encoder
    wav = io_speaker["wav_16000"].clone()
    with torch.no_grad():
        close(encoder.torch_spec(wav), io_speaker["torch_spec_out"], atol=1e-4, rtol=1e-5)
        emb = encoder(wav).unsqueeze(-1)
        close(emb, io_speaker["speaker_embedding"], atol=1e-5, rtol=0)
        assert torch.equal(wav, io_speaker["wav_16000"]), "the input waveform must not be modified"
        assert torch.allclose(emb.norm(dim=1), torch.ones(1, 1), atol=1e-6)
        for resampler in (resampling.resample, resampling.resample_sinc):  # with torchaudio and with our fallback
            emb_22k = encoder(resampler(io_cond["wav_22050"], 22050, 16000)).unsqueeze(-1)
            close(emb_22k, io_speaker["speaker_embedding_via_get_speaker_embedding_from_22k"], atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------------- voice profile
def test_encode_voice_reproduces_upstream(small, io_cond, io_speaker):
    voice = encode_voice(small, [(io_cond["wav_22050"], 22050)])
    assert isinstance(voice, VoiceProfile)
    close(voice.gpt_cond_latent, io_cond["gpt_cond_latent_len30_chunk4"], **TOL)
    close(voice.speaker_embedding, io_speaker["speaker_embedding"], atol=1e-5, rtol=0)
    assert voice.seconds == pytest.approx(6.0) and voice.warnings == []
    six = encode_voice(small, [(io_cond["wav_22050"], 22050)], length_s=6, chunk_s=6)
    close(six.gpt_cond_latent, io_cond["gpt_cond_latent_len6_chunk6"], **TOL)


def test_encode_voice_any_rate_and_channels(small, io_cond):
    """Stereo 44.1 kHz in: channels are averaged and the result resampled to 22.05 kHz."""
    mono = io_cond["wav_22050"][0, :22050 * 3]
    stereo_44k = resampling.resample(torch.stack([mono * 0.5, mono * 1.5]), 22050, 44100)  # mean = mono
    voice = encode_voice(small, [(stereo_44k, 44100)])
    reference = encode_voice(small, [(resampling.resample(resampling.resample(mono, 22050, 44100), 44100, 22050)[None], 22050)])
    close(voice.gpt_cond_latent, reference.gpt_cond_latent, atol=1e-5, rtol=1e-5)
    close(voice.speaker_embedding, reference.speaker_embedding, atol=1e-6, rtol=0)
    assert voice.gpt_cond_latent.shape == (1, 32, 64) and voice.speaker_embedding.shape == (1, 512, 1)


def test_encode_voice_several_clips(small, io_cond):
    """As upstream get_conditioning_latents: embeddings averaged per clip, GPT latents from the concatenation."""
    a, b = io_cond["wav_22050"][:, :22050 * 2], io_cond["wav_22050"][:, 22050 * 2:22050 * 5]
    voice = encode_voice(small, [(a, 22050), (b, 22050)])
    encoder = small.hifigan_decoder.speaker_encoder
    with torch.no_grad():
        embs = [encoder(resampling.resample(x, 22050, 16000)) for x in (a, b)]
    close(voice.speaker_embedding, ((embs[0] + embs[1]) / 2).unsqueeze(-1), atol=1e-6, rtol=0)
    joined = gpt_cond_latents(small.gpt, torch.cat([a, b], dim=-1), small.mel_stats, 30, 4)
    close(voice.gpt_cond_latent, joined, atol=1e-6, rtol=0)
    assert voice.seconds == pytest.approx(5.0)


def test_encode_voice_errors_and_warnings(small, io_cond):
    speech = io_cond["wav_22050"]
    with pytest.raises(NarrateInputError, match="silent") as err:
        encode_voice(small, [(torch.zeros(2, 22050 * 4), 22050)])
    assert err.value.input_name == "voice"
    with pytest.raises(NarrateInputError, match="silent"):
        encode_voice(small, [(speech[:, :22050 * 2], 22050), (speech[:, :22050 * 2] * 1e-5, 22050)])
    with pytest.raises(NarrateInputError, match="at least 1 s"):
        encode_voice(small, [(speech[:, :11025], 22050)])
    with pytest.raises(NarrateInputError, match="no reference clip"):
        encode_voice(small, [])
    short = encode_voice(small, [(speech[:, :int(22050 * 2.5)], 22050)])
    assert len(short.warnings) == 1 and "2.5 s" in short.warnings[0]


def test_resample_uses_torchaudio_and_falls_back_only_when_it_is_absent(monkeypatch):
    import sys
    import types

    import torchaudio

    wav = torch.randn(1, 4410)
    calls = []
    monkeypatch.setattr(resampling, "resample_sinc", lambda *a: calls.append(a) or torch.zeros(1, 1600))
    assert torch.equal(resampling.resample(wav, 44100, 16000), torchaudio.functional.resample(wav, 44100, 16000))
    assert calls == []  # installed: torchaudio's own
    monkeypatch.setitem(sys.modules, "torchaudio", None)  # absent: `import torchaudio` raises ModuleNotFoundError
    resampling.resample(wav, 44100, 16000)
    assert len(calls) == 1  # ours
    # Installed but broken (here: its `functional` part cannot be imported): the error shows, no silent fallback.
    monkeypatch.setitem(sys.modules, "torchaudio", types.ModuleType("torchaudio"))
    monkeypatch.delitem(sys.modules, "torchaudio.functional")
    with pytest.raises(ModuleNotFoundError, match="torchaudio.functional"):
        resampling.resample(wav, 44100, 16000)
    assert len(calls) == 1

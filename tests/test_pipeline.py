"""The whole narration in plain Python with the small models: portrait + voice + text -> one streamed .mp4 whose
frame count follows the speech, sentence chunks joined, and the entangler's identity start changing nothing."""
import math
from fractions import Fraction

import av as pyav
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MEDIA
from narrate_model import pipeline
from narrate_model.hallo.sampler import SamplerSettings
from narrate_model.xtts.sampling import SamplingParams
from narrate_model.xtts.text import tokenize
from narrate_model.xtts.voice import encode_voice
from small_checkpoints import small_narration_models


def portrait() -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(MEDIA / "images" / "man.jpg").convert("RGB")).copy()).float() / 255


def voice_clip(seconds: float = 4.0):
    with pyav.open(str(MEDIA / "videos" / "man.mp4")) as c:
        rate = c.streams.audio[0].rate
        pcm = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    return torch.from_numpy(pcm[:, :int(seconds * rate)]).float(), rate


@pytest.fixture(scope="module")
def models():
    return small_narration_models()


SETTINGS = pipeline.NarrationSettings(fps=Fraction(25), size=64,
                                      speech=SamplingParams(seed=3, max_new_tokens=20),
                                      video=SamplerSettings(steps=1, cfg=3.5, seed=3))


def test_narration_streams_an_mp4_whose_frames_follow_the_speech(models, tmp_path):
    seen = []
    with torch.inference_mode():
        result = pipeline.narrate_to_mp4(models, portrait(), [voice_clip()], "Hello there. How are you today?",
                                         str(tmp_path / "n.mp4"), SETTINGS, progress=lambda d, t: seen.append(d))
    assert result.chunks == 1 or result.chunks == 2
    seconds = result.audio["waveform"].shape[-1] / result.audio["sample_rate"]
    assert result.frames == math.ceil(seconds * 25) and result.frames > 16  # more than one clip
    with pyav.open(result.path) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        frames = sum(1 for _ in c.decode(video=0))
        assert (video.codec_context.name, audio.codec_context.name) == ("h264", "aac")
        assert frames == result.frames
        assert abs(float(video.duration * video.time_base) - float(audio.duration * audio.time_base)) <= 1 / 25


def test_identity_entangler_leaves_voice_and_face_unchanged(models):
    tokens = tokenize(models.tokenizer, "One sentence. And another one.", "en")
    with torch.inference_mode():
        voice = encode_voice(models.xtts, [voice_clip()])
        face = pipeline.prepare_face(portrait(), models.landmarker, models.vae_encode, 64)
        for mode in ("ETE", "STE"):
            v, f = pipeline.entangle(pipeline.identity_entangler(voice, face, mode), voice, face, tokens)
            assert torch.equal(v.gpt_cond_latent, voice.gpt_cond_latent)
            assert torch.equal(v.speaker_embedding, voice.speaker_embedding)
            assert torch.equal(f.reference_latent, face.reference_latent)


def test_frame_count_comes_from_the_24k_speech_not_its_16k_resampling(models):
    audio = {"waveform": torch.randn(1, 1, 24000 + 7) * 0.1, "sample_rate": 24000}
    with torch.inference_mode():
        features = pipeline.listen(models.wav2vec, audio, 25)
    assert features.num_frames == math.ceil((24007 / 24000) * 25) == 26
    assert features.windows.shape[0] >= features.num_frames

"""The speech graph on the real server, with a small XTTS checkpoint written in the real layout (config.json,
model.pth with the weights under "model", vocab.json): LoadAudio -> Voice Profile Encode -> Text BPE ->
Spectrogram Synthesizer -> Vocoder -> SaveAudio."""
import io

import av
import pytest

from comfy_server import messages_of
from conftest import MEDIA
from small_checkpoints import write_xtts


@pytest.fixture(scope="module")
def small_xtts(comfy_server):
    # a folder of this module's own: a loader another module already ran with the same input would come from the
    # server's cache and show no licence text
    return write_xtts(comfy_server.base / "models", "small-speech")


def speech_prompt(checkpoint: str, voice: str, text: str, seed: int = 0, **load_options) -> dict:
    return {
        "1": {"class_type": "NFY_LoadXTTS", "inputs": {"checkpoint": checkpoint, **load_options}},
        "2": {"class_type": "LoadAudio", "inputs": {"audio": voice}},
        "3": {"class_type": "NFY_VoiceProfileEncode",
              "inputs": {"xtts": ["1", 0], "voice": ["2", 0], "max_seconds": 30, "chunk_seconds": 4}},
        "4": {"class_type": "NFY_TextBPE",
              "inputs": {"xtts": ["1", 0], "text": text, "language": "en", "split_sentences": True}},
        "5": {"class_type": "NFY_SpectrogramSynthesizer",
              "inputs": {"xtts": ["1", 0], "tokens": ["4", 0], "voice": ["3", 0], "do_sample": True,
                         "temperature": 0.75, "top_p": 0.85, "top_k": 50, "repetition_penalty": 10.0,
                         "length_penalty": 1.0, "speed": 1.0, "seed": seed, "max_codes": 0}},
        "6": {"class_type": "NFY_Vocoder", "inputs": {"xtts": ["1", 0], "speech": ["5", 0], "voice": ["3", 0]}},
        "7": {"class_type": "SaveAudio", "inputs": {"audio": ["6", 0], "filename_prefix": "nfy_test/speech"}},
    }


def audio_samples(data: bytes) -> tuple[int, int]:
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        return sum(f.samples for f in c.decode(audio=0)), stream.rate


def test_speech_graph_produces_audio_whose_length_matches_the_codes(comfy, small_xtts):
    voice = comfy.upload(MEDIA / "videos" / "man.mp4")
    entry = comfy.run(speech_prompt(small_xtts, voice, "Hello there. This is a test of the speech graph."))
    assert "Coqui Public Model License" in entry["outputs"]["1"]["text"][0]  # the licence, where it is loaded
    chunks = entry["outputs"]["5"]["nfy_chunks"]
    assert chunks and all(c["codes"] >= 1 for c in chunks)
    samples, rate = audio_samples(comfy.view(entry["outputs"]["7"]["audio"][0]))
    assert rate == 24000
    # each chunk: latents x4 (linear), x24000/22050 (floor), x256 samples (HiFi-GAN hop)
    assert samples == sum(int(4 * c["latents"] * 24000 / 22050) * 256 for c in chunks)


def test_changing_only_the_text_reuses_the_cached_voice(comfy, small_xtts):
    voice = comfy.upload(MEDIA / "videos" / "man.mp4")
    comfy.run(speech_prompt(small_xtts, voice, "First text."))
    entry = comfy.run(speech_prompt(small_xtts, voice, "A different text."))
    cached = {n for m in messages_of(entry, "execution_cached") for n in m["nodes"]}
    assert {"1", "2", "3"} <= cached and "4" not in cached


@pytest.mark.parametrize("text, message", [("   ", "input 'text'")])
def test_bad_text_names_the_node_and_the_input(comfy, small_xtts, text, message):
    voice = comfy.upload(MEDIA / "videos" / "man.mp4")
    prompt_id = comfy.queue(speech_prompt(small_xtts, voice, text))
    entry = comfy.wait(prompt_id, expect="error")
    error = messages_of(entry, "execution_error")[0]
    assert error["node_type"] == "NFY_TextBPE"
    assert "Text BPE" in error["exception_message"] and message in error["exception_message"]


def test_missing_checkpoint_says_what_goes_where(comfy):
    voice = comfy.upload(MEDIA / "videos" / "man.mp4")
    entry = comfy.wait(comfy.queue(speech_prompt("XTTS-v2", voice, "Hi.")), expect="error")
    message = messages_of(entry, "execution_error")[0]["exception_message"]
    assert "Load XTTS-v2" in message and "input 'checkpoint'" in message
    for name in ("config.json", "model.pth", "vocab.json", "python -m narrate_model download xtts-v2",
                 "Coqui Public Model License"):
        assert name in message


def test_bf16_speech_graph_speaks_and_fp16_on_the_cpu_says_what_to_choose(comfy, small_xtts):
    voice = comfy.upload(MEDIA / "videos" / "man.mp4")
    entry = comfy.run(speech_prompt(small_xtts, voice, "Half precision speech.", precision="bf16"))
    assert "(bf16)" in entry["outputs"]["1"]["text"][0]
    chunks = entry["outputs"]["5"]["nfy_chunks"]
    samples, _ = audio_samples(comfy.view(entry["outputs"]["7"]["audio"][0]))
    assert samples == sum(int(4 * c["latents"] * 24000 / 22050) * 256 for c in chunks) > 0
    entry = comfy.wait(comfy.queue(speech_prompt(small_xtts, voice, "Hi.", precision="fp16")), expect="error")
    message = messages_of(entry, "execution_error")[0]["exception_message"]
    assert "Load XTTS-v2" in message and "input 'precision'" in message and "choose bf16" in message

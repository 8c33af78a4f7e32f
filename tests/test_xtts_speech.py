"""The speech stage end to end through our glue (text -> tokens -> GPT per chunk -> HiFi-GAN), against upstream's
own `Xtts.inference` outputs, and the chunk bookkeeping the nodes and the pipeline rely on."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from narrate_model.errors import NarrateInputError
from narrate_model.xtts.checkpoint import load_xtts
from narrate_model.xtts.sampling import SamplingParams
from narrate_model.xtts.speech import synthesize, vocode
from narrate_model.xtts.text import XttsTokenizer, tokenize
from narrate_model.xtts.voice import VoiceProfile

XTTS = FIXTURES / "xtts"
TEXT = "The meeting starts at 10:30 on the 3rd of May."


@pytest.fixture(scope="module")
def small():
    model, _ = load_xtts([XTTS / "small_config.json", XTTS / "small_model.safetensors"])
    return model, XttsTokenizer(XTTS / "bpe_vocab.json"), load_file(XTTS / "io_generate.safetensors")


def _voice(io):
    return VoiceProfile(io["cond_latent"], io["speaker_embedding"], seconds=6.0)


@pytest.mark.parametrize("rep", [10, 1])
def test_greedy_speech_equals_upstream_inference(small, rep):
    model, tok, io = small
    tokens = tokenize(tok, TEXT, "en", split=False)
    assert tokens.ids[0] == io["text_ids"][0].tolist()
    params = SamplingParams(do_sample=False, repetition_penalty=float(rep), max_new_tokens=30)
    with torch.inference_mode():
        speech = synthesize(model, tokens, _voice(io), params)
        audio = vocode(model, speech, _voice(io))
    assert torch.equal(speech.chunks[0].codes, io[f"rep{rep}.codes"])
    assert audio["sample_rate"] == 24000
    torch.testing.assert_close(audio["waveform"].view(-1), io[f"rep{rep}.wav"], atol=1e-4, rtol=0)


def test_chunks_are_spoken_in_order_and_audio_length_follows_the_codes(small):
    model, tok, io = small
    tokens = tokenize(tok, "First sentence here. " * 30, "en")
    assert len(tokens.chunks) > 1
    seen = []
    params = SamplingParams(do_sample=True, seed=7, max_new_tokens=12)
    with torch.inference_mode():
        speech = synthesize(model, tokens, _voice(io), params, progress=lambda d, t: seen.append((d, t)))
        audio = vocode(model, speech, _voice(io))
    assert len(speech.chunks) == len(tokens.chunks)
    assert seen[-1] == (12 * len(tokens.chunks),) * 2 and [d for d, _ in seen] == sorted(d for d, _ in seen)
    # HiFi-GAN: 4x linear upsampling of the latents, then 24000/22050 (floor), then 256 samples per step
    expected = sum(int(4 * c.latents.shape[1] * 24000 / 22050) * 256 for c in speech.chunks)
    assert audio["waveform"].shape == (1, 1, expected)
    assert speech.num_codes == sum(c.codes.shape[1] for c in speech.chunks)


@pytest.mark.parametrize("do_sample", [False, True])
def test_batched_chunks_equal_chunks_one_after_another(small, do_sample):
    model, tok, io = small
    tokens = tokenize(tok, "First sentence here, then more. " * 25 + "A short end.", "en")
    assert len(tokens.chunks) >= 3
    params = SamplingParams(do_sample=do_sample, seed=3, max_new_tokens=15)
    with torch.inference_mode():
        one_by_one = synthesize(model, tokens, _voice(io), params, batch_size=1)
        for batch_size in (2, len(tokens.chunks)):  # uneven groups, and all chunks in one pass
            batched = synthesize(model, tokens, _voice(io), params, batch_size=batch_size)
            for a, b in zip(one_by_one.chunks, batched.chunks, strict=True):
                assert torch.equal(a.codes, b.codes)
                torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=0)


def test_same_seed_same_speech_other_seed_other_speech(small):
    model, tok, io = small
    tokens = tokenize(tok, TEXT, "en")
    run = lambda seed: synthesize(model, tokens, _voice(io), SamplingParams(seed=seed, max_new_tokens=20))
    with torch.inference_mode():
        a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.chunks[0].codes, b.chunks[0].codes)
    assert not torch.equal(a.chunks[0].codes, c.chunks[0].codes)


def test_empty_tokens_are_refused(small):
    model, tok, io = small
    tokens = tokenize(tok, TEXT, "en")
    tokens.ids = []
    with pytest.raises(NarrateInputError, match="tokens"):
        synthesize(model, tokens, _voice(io), SamplingParams())


def test_chunks_join_without_a_click_and_keep_their_length():
    from narrate_model.xtts.speech import join_chunks

    a, b = torch.full((2400,), 0.5), torch.full((2400,), -0.5)  # a worst case: a full step between chunks
    joined = join_chunks([a, b], 24000)
    assert joined.shape == (4800,)
    assert torch.cat([a, b]).diff().abs().max() == 1.0
    assert joined.diff().abs().max() < 0.02  # a 5 ms raised-cosine fade on each side instead of a step
    assert torch.equal(joined[:2000], a[:2000]) and torch.equal(joined[-2000:], b[-2000:])


def test_the_short_text_guard_bounds_the_code_count(small):
    """What the guard does to the code count on the small model (random weights rarely emit the stop code, so, like
    a real XTTS running on after a short text, it fills whatever room it gets)."""
    from dataclasses import replace

    model, tok, io = small
    tokens = tokenize(tok, "Hi there!", "en")
    params = SamplingParams(do_sample=False, max_new_tokens=150)
    with torch.inference_mode():
        guarded = synthesize(model, tokens, _voice(io), params)
        unguarded = synthesize(model, replace(tokens, max_codes=None), _voice(io), params)
    print(f"codes for 'Hi there!': {guarded.num_codes} with the guard, {unguarded.num_codes} without")
    assert guarded.num_codes <= tokens.max_codes == 74 < unguarded.num_codes

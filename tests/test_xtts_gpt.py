"""XTTS GPT (spectrogram-code synthesizer) against coqui-tts 0.28.0's outputs on the reduced fixture model."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import FIXTURES
from narrate_model.errors import NarrateInputError
from narrate_model.xtts.config import XttsConfig
from narrate_model.xtts.gpt import XttsGPT, apply_speed
from narrate_model.xtts.sampling import SamplingParams, process_scores

XTTS = FIXTURES / "xtts"
TOL = dict(atol=1e-4, rtol=1e-4)


def max_err(a, b):
    return (a - b).abs().max().item()


def load_small_gpt() -> XttsGPT:
    state = {k[len("gpt."):]: v for k, v in load_file(XTTS / "small_model.safetensors").items()
             if k.startswith("gpt.")}
    model = XttsGPT(XttsConfig.from_json(XTTS / "small_config.json")).eval()
    model.load_state_dict(state, strict=True)  # exactly the checkpoint's gpt.* keys
    return model


@pytest.fixture(scope="module")
def gpt():
    return load_small_gpt()


@pytest.fixture(scope="module")
def io_gpt():
    return load_file(XTTS / "io_gpt.safetensors")


@pytest.fixture(scope="module")
def io_gen():
    return load_file(XTTS / "io_generate.safetensors")


def greedy(R: float, n: int = 30, **kw) -> SamplingParams:
    return SamplingParams(repetition_penalty=R, do_sample=False, max_new_tokens=n, **kw)


def test_full_size_keys_and_shapes_match_the_v2_checkpoint():
    with torch.device("meta"):
        model = XttsGPT(XttsConfig.v2())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    rows = [line.split("\t") for line in (XTTS / "manifest_full.tsv").read_text().splitlines()[1:]]
    theirs = {key[len("gpt."):]: json.loads(shape) for key, shape, *_ in rows if key.startswith("gpt.")}
    assert ours == theirs


def test_teacher_forced_latents_and_logits(gpt, io_gpt):
    with torch.no_grad():
        latents = gpt.forward_latents(io_gpt["text_ids"], io_gpt["cond_latent"], io_gpt["audio_codes"])
        logits = gpt.mel_logits(latents)
    assert latents.shape == (1, 40, 64)
    torch.testing.assert_close(latents, io_gpt["latents"], **TOL)
    torch.testing.assert_close(logits, io_gpt["mel_logits"], **TOL)


@pytest.mark.parametrize("R", [10, 1])
def test_greedy_generation_matches_upstream(gpt, io_gen, R):
    out = gpt.generate(io_gen["text_ids"], io_gen["cond_latent"], greedy(float(R)), record_scores=True)
    assert torch.equal(out.codes, io_gen[f"rep{R}.codes"])
    assert not out.stopped
    torch.testing.assert_close(out.step_logits, io_gen[f"rep{R}.step_logits_raw"], **TOL)
    torch.testing.assert_close(out.step_scores, io_gen[f"rep{R}.step_scores_processed"], **TOL)
    # latents collected while generating == upstream's second teacher-forced pass
    torch.testing.assert_close(out.latents, io_gen[f"rep{R}.gpt_latents"], **TOL)


def test_repetition_penalty_5_codes(gpt, io_gen):
    out = gpt.generate(io_gen["text_ids"], io_gen["cond_latent"], greedy(5.0))
    assert torch.equal(out.codes, io_gen["rep5.codes"])


def test_fake_prompt_ids_are_penalised_from_the_first_step(gpt, io_gen):
    """Upstream quirk: ids 1 and 1024 are penalised at step 0 although no code was generated yet."""
    out = gpt.generate(io_gen["text_ids"], io_gen["cond_latent"], greedy(10.0, n=1), record_scores=True)
    raw, scores = out.step_logits[0], out.step_scores[0]
    penalised = torch.where(raw < 0, raw * 10, raw / 10)
    torch.testing.assert_close(scores[[1, 1024]], penalised[[1, 1024]])
    others = torch.ones_like(raw, dtype=torch.bool)
    others[[1, 1024]] = False
    assert torch.equal(scores[others], raw[others])


def test_cached_steps_equal_a_full_pass_without_cache(gpt, io_gen):
    text, cond = io_gen["text_ids"], io_gen["cond_latent"]
    out = gpt.generate(text, cond, greedy(1.0), record_scores=True)
    with torch.no_grad():
        latents = gpt.forward_latents(text, cond, out.codes)
        logits = gpt.mel_logits(latents)[0]
    assert max_err(out.latents, latents) < 1e-4
    assert max_err(out.step_logits, logits) < 1e-4


def test_stop_token_ends_generation(io_gen):
    model = load_small_gpt()
    text, cond = io_gen["text_ids"], io_gen["cond_latent"]
    ref = model.generate(text, cond, greedy(10.0), record_scores=True)
    # Raise the stop logit just enough to win first at some step k: the hidden states do not depend on it, so
    # steps before k are unchanged.
    stop = model.cfg.gpt_stop_audio_token
    deficit = ref.step_scores.max(dim=1).values - ref.step_scores[:, stop]
    boost = deficit[5:].min().item() + 1e-3
    k = int((deficit < boost).nonzero()[0])
    with torch.no_grad():
        model.mel_head.bias[stop] += boost
    out = model.generate(text, cond, greedy(10.0))
    assert out.stopped
    assert torch.equal(out.codes, ref.codes[:, :k])
    # one latent per generated token, the one that predicted the stop token included (upstream's second pass
    # runs over the codes with the stop token)
    assert out.latents.shape == (1, k + 1, 64)
    torch.testing.assert_close(out.latents, ref.latents[:, :k + 1], **TOL)
    with torch.no_grad():
        second_pass = model.forward_latents(text, cond, torch.cat([out.codes, torch.tensor([[stop]])], dim=1))
    torch.testing.assert_close(out.latents, second_pass, **TOL)


def _sentences(io_gen):
    """Three sentences of different lengths (so the batch is left-padded) from the fixture's text ids."""
    ids = io_gen["text_ids"][0]
    return [ids, ids[3:], ids.flip(0)[:7]]


def test_batched_greedy_equals_sequential(gpt, io_gen):
    cond = io_gen["cond_latent"]
    texts = _sentences(io_gen)
    batch = gpt.generate_batch(texts, cond, greedy(10.0), record_scores=True)
    assert torch.equal(batch[0].codes, io_gen["rep10.codes"])  # the padded batch still matches upstream
    for text, got in zip(texts, batch):
        alone = gpt.generate(text[None], cond, greedy(10.0), record_scores=True)
        assert torch.equal(got.codes, alone.codes) and got.stopped == alone.stopped
        assert max_err(got.latents, alone.latents) < 1e-4
        assert max_err(got.step_logits, alone.step_logits) < 1e-4


def test_batched_sentences_stop_on_their_own(io_gen):
    model = load_small_gpt()
    cond, texts = io_gen["cond_latent"], _sentences(io_gen)
    ref = model.generate(texts[1][None], cond, greedy(10.0), record_scores=True)
    stop = model.cfg.gpt_stop_audio_token
    deficit = ref.step_scores.max(dim=1).values - ref.step_scores[:, stop]
    with torch.no_grad():  # just enough for sentence 1 to stop after a few codes
        model.mel_head.bias[stop] += deficit[4:].min().item() + 1e-3
    alone = [model.generate(t[None], cond, greedy(10.0)) for t in texts]
    batch = model.generate_batch(texts, cond, greedy(10.0))
    assert alone[1].stopped and alone[1].codes.shape[1] < 30
    for a, b in zip(alone, batch):
        assert torch.equal(a.codes, b.codes) and a.stopped == b.stopped
        assert a.latents.shape == b.latents.shape and max_err(a.latents, b.latents) < 1e-4


def test_batched_sampling_equals_sequential_with_per_sentence_seeds(gpt, io_gen):
    cond, texts = io_gen["cond_latent"], _sentences(io_gen)
    params = SamplingParams(max_new_tokens=20, seed=7)
    batch = gpt.generate_batch(texts, cond, params)  # sentence i seeded 7 + i
    for i, (text, got) in enumerate(zip(texts, batch)):
        alone = gpt.generate(text[None], cond, SamplingParams(max_new_tokens=20, seed=7 + i))
        assert torch.equal(got.codes, alone.codes)
        assert max_err(got.latents, alone.latents) < 1e-4
    swapped = gpt.generate_batch([texts[1], texts[0]], cond, params, seeds=[8, 7])
    assert torch.equal(swapped[0].codes, batch[1].codes) and torch.equal(swapped[1].codes, batch[0].codes)


def test_sampling_is_reproducible_per_seed_and_differs_across_seeds(gpt, io_gen):
    text, cond = io_gen["text_ids"], io_gen["cond_latent"]
    a = gpt.generate(text, cond, SamplingParams(max_new_tokens=20, seed=7))
    b = gpt.generate(text, cond, SamplingParams(max_new_tokens=20, seed=7))
    c = gpt.generate(text, cond, SamplingParams(max_new_tokens=20, seed=8))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.latents, b.latents)
    assert not torch.equal(a.codes, c.codes)


def test_top_k_1_sampling_equals_greedy(gpt, io_gen):
    text, cond = io_gen["text_ids"], io_gen["cond_latent"]
    sampled = gpt.generate(text, cond, SamplingParams(top_k=1, max_new_tokens=30, seed=3))
    assert torch.equal(sampled.codes, io_gen["rep10.codes"])


def test_greedy_ignores_temperature_top_k_top_p(gpt, io_gen):
    params = greedy(10.0, temperature=0.1, top_k=3, top_p=0.2)
    out = gpt.generate(io_gen["text_ids"], io_gen["cond_latent"], params)
    assert torch.equal(out.codes, io_gen["rep10.codes"])


def test_processors_match_transformers():
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1026, generator=g) * 4
    ids = torch.randint(0, 1026, (3, 40), generator=g)
    seen = torch.zeros(3, 1026, dtype=torch.bool).scatter_(1, ids, True)
    for temperature, top_k, top_p in [(0.75, 50, 0.85), (1.3, 0, 0.5), (0.5, 5, 1.0)]:
        hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(7.0), TemperatureLogitsWarper(temperature)]
                                 + ([TopKLogitsWarper(top_k)] if top_k else [])
                                 + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
        ours = process_scores(logits, seen, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                                           repetition_penalty=7.0))
        assert torch.equal(torch.isinf(ours), torch.isinf(hf(ids, logits.clone())))
        torch.testing.assert_close(ours, hf(ids, logits.clone()))


def test_progress_reports_blocks_and_can_cancel(gpt, io_gen):
    calls = []
    gpt.generate(io_gen["text_ids"], io_gen["cond_latent"], greedy(10.0, n=40),
                 progress=lambda done, total: calls.append((done, total)))
    assert calls == [(16, 40), (32, 40), (40, 40)]

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        raise Cancelled

    with pytest.raises(Cancelled):
        gpt.generate(io_gen["text_ids"], io_gen["cond_latent"], greedy(10.0, n=40), progress=cancel)


def test_speed_resamples_latents_like_upstream(gpt, io_gen):
    text, cond = io_gen["text_ids"], io_gen["cond_latent"]
    base = gpt.generate(text, cond, greedy(10.0))
    fast = gpt.generate(text, cond, greedy(10.0, speed=1.5))
    assert torch.equal(fast.codes, base.codes)
    assert fast.latents.shape == (1, 20, 64)
    expected = F.interpolate(base.latents.transpose(1, 2), scale_factor=1 / 1.5, mode="linear").transpose(1, 2)
    torch.testing.assert_close(fast.latents, expected)
    assert torch.equal(apply_speed(base.latents, 1.0), base.latents)


def test_bad_inputs_name_what_to_fix(gpt, io_gen):
    text, cond = io_gen["text_ids"], io_gen["cond_latent"]
    with pytest.raises(NarrateInputError, match="temperature"):
        gpt.generate(text, cond, SamplingParams(temperature=0.0))
    with pytest.raises(NarrateInputError, match="max_new_tokens"):
        gpt.generate(text, cond, SamplingParams(max_new_tokens=603))
    with pytest.raises(NarrateInputError, match="text"):
        gpt.generate(torch.ones(1, 402, dtype=torch.long), cond, greedy(10.0))

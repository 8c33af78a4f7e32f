"""XTTS speed options on the reduced fixture model: generation without a per-token host read (codes identical to the
per-token loop), bf16 (voice encoders untouched, speech close to fp32), and fixed-shape decode steps (the path that
torch.compile and CUDA graphs run) giving the same greedy codes."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from narrate_model.errors import NarrateInputError
from narrate_model.xtts import fast_decode
from narrate_model.xtts.checkpoint import load_xtts
from narrate_model.xtts.gpt import SYNC_EVERY
from narrate_model.xtts.model import check_precision
from narrate_model.xtts.sampling import SamplingParams
from narrate_model.xtts.voice import encode_voice
from test_xtts_gpt import _sentences, greedy

XTTS = FIXTURES / "xtts"
SMALL_FILES = [XTTS / "small_config.json", XTTS / "small_model.safetensors"]
# every way a tensor's value reaches Python (each waits for the device on an accelerator)
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


@pytest.fixture(scope="module")
def io_gen():
    return load_file(XTTS / "io_generate.safetensors")


@pytest.fixture(scope="module")
def model():
    return load_xtts(SMALL_FILES)[0]


def host_reads(monkeypatch, run) -> int:
    """How many times `run()` reads a tensor's value into Python."""
    count = 0

    def counting(original):
        def wrapper(self, *args, **kwargs):
            nonlocal count
            count += 1
            return original(self, *args, **kwargs)
        return wrapper

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
        run()
    return count


def stop_after_a_few_codes(gpt, io_gen, extra: float = 0.0):
    """Raise the stop logit (by `extra` more for sampling) so that sentences stop on their own."""
    cond, texts = io_gen["cond_latent"], _sentences(io_gen)
    ref = gpt.generate(texts[1][None], cond, greedy(10.0), record_scores=True)
    stop = gpt.cfg.gpt_stop_audio_token
    deficit = ref.step_scores.max(dim=1).values - ref.step_scores[:, stop]
    with torch.no_grad():
        gpt.mel_head.bias[stop] += deficit[4:].min().item() + 1e-3 + extra


# ------------------------------------------------------------------------------------------------ no per-token sync
@pytest.mark.parametrize("fixed_shape", [False, True])
def test_generation_reads_the_device_once_per_sync_block_not_per_token(io_gen, monkeypatch, fixed_shape):
    gpt, cond = load_xtts(SMALL_FILES)[0].gpt, io_gen["cond_latent"]
    if fixed_shape:  # the step a CUDA graph captures, run eagerly
        fast_decode.enable(gpt, backend=None)
    texts = _sentences(io_gen)  # padded batch: the masked path too

    def reads(n, sync_every=None):  # None: the accelerator default, SYNC_EVERY
        return host_reads(monkeypatch, lambda: gpt.generate_batch(texts, cond, greedy(10.0, n=n),
                                                                  sync_every=sync_every or SYNC_EVERY))

    # 2 * SYNC_EVERY more tokens cost 2 more reads (the stop flag), whatever else happens per token
    assert reads(3 * SYNC_EVERY) - reads(SYNC_EVERY) == 2
    # the guard catches a per-token read: the per-token loop (sync_every=1) reads once per token
    assert reads(3 * SYNC_EVERY, 1) - reads(SYNC_EVERY, 1) == 2 * SYNC_EVERY


@pytest.mark.parametrize("do_sample", [False, True])
def test_codes_equal_the_per_token_loop_for_several_texts_and_batch_sizes(io_gen, do_sample):
    gpt = load_xtts(SMALL_FILES)[0].gpt
    stop_after_a_few_codes(gpt, io_gen, extra=1.0 if do_sample else 0.0)
    cond, texts = io_gen["cond_latent"], _sentences(io_gen)
    params = SamplingParams(do_sample=do_sample, repetition_penalty=10.0, max_new_tokens=30, seed=5)
    stopped = 0
    for group in ([texts[1]], texts, [texts[2], texts[1], texts[0], texts[1]]):
        per_token = gpt.generate_batch(group, cond, params, sync_every=1)
        blocks = gpt.generate_batch(group, cond, params, sync_every=8)  # stops fall inside a block
        for a, b in zip(per_token, blocks, strict=True):
            assert torch.equal(a.codes, b.codes) and a.stopped == b.stopped
            assert torch.equal(a.latents, b.latents)
            stopped += a.stopped
    assert stopped >= 2  # sentences did stop mid-block, so the trimming was exercised


def test_cpu_checks_every_step_and_the_default_matches_upstream(model, io_gen):
    """On the CPU the flag is on the host already: the default checks every step (no wasted steps)."""
    out = model.gpt.generate(io_gen["text_ids"], io_gen["cond_latent"], greedy(10.0))
    assert torch.equal(out.codes, io_gen["rep10.codes"])
    with pytest.raises(ValueError, match="sync_every"):
        model.gpt.generate_batch([io_gen["text_ids"][0]], io_gen["cond_latent"], greedy(10.0), sync_every=-1)


# ------------------------------------------------------------------------------------------------------- precision
NEAR_TIE = 0.05  # a greedy step whose best two fp32 scores are closer than this is a tie for bf16 (its logit
#                  rounding is ~0.006, the median over the vocabulary, measured)


def bf16_case():
    """fp32's greedy speech of one sentence (30 codes, repetition penalty 10) and its inputs."""
    from narrate_model.xtts.text import XttsTokenizer, tokenize
    clip = load_file(str(XTTS / "io_conditioning.safetensors"))["wav_22050"]
    tokens = tokenize(XttsTokenizer(XTTS / "bpe_vocab.json"), "The meeting starts at 10:30 on the 3rd of May.",
                      "en", split=False)
    return clip, tokens, SamplingParams(do_sample=False, repetition_penalty=10.0, max_new_tokens=30)


def teacher_forced(model, other, text_ids, voices, codes, penalty):
    """`other` run on fp32's own codes: (relative error of its latents, fp32's top-2 score gap at each step, whether
    other's greedy pick there is fp32's code)."""
    from narrate_model.xtts.sampling import penalize_repeats
    latents, scores = [], []
    for m, voice in zip((model, other), voices):
        lat = m.gpt.forward_latents(text_ids, voice.gpt_cond_latent.to(m.dtype), codes)
        latents.append(lat.float())
        scores.append(m.gpt.mel_logits(lat)[0].float())
    seen = torch.zeros(1, scores[0].shape[-1], dtype=torch.bool)
    seen[:, [1, model.gpt.cfg.gpt_start_audio_token]] = True  # as generate_batch starts it
    gaps, agree = [], []
    for step, code in enumerate(codes[0].tolist()):
        s32, s_other = (penalize_repeats(s[step:step + 1], seen, penalty)[0] for s in scores)
        best = s32.topk(2).values
        gaps.append(float(best[0] - best[1]))
        agree.append(int(s_other.argmax()) == code)
        seen[0, code] = True
    rel = float((latents[1] - latents[0]).norm() / latents[0].norm())
    return rel, gaps, agree


def check_close(rel, gaps, agree):
    assert rel < 0.03, rel  # measured 0.87 %
    clear_misses = [i for i, (g, a) in enumerate(zip(gaps, agree)) if g >= NEAR_TIE and not a]
    assert not clear_misses, (clear_misses, gaps)  # measured: bf16 picks fp32's code at all 30 steps


def test_bf16_speaks_close_to_fp32_and_leaves_the_voice_encoders_in_fp32(model):
    """bf16 against fp32 teacher-forced on fp32's own codes, so one near-tie does not decide the rest: latents
    within 3 % and the same greedy pick at every step that is not a near-tie. Free-running, the codes agree at least
    up to the first near-tie (on this CPU: 8 of 30; step 8's best two fp32 scores are 0.012 apart), after which the
    two runs speak different but equally valid continuations. A GPT rounded to fp8 fails the same checks."""
    import copy

    from narrate_model.xtts.speech import synthesize, vocode
    half, _ = load_xtts(SMALL_FILES, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.gpt.gpt.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    clip, tokens, params = bf16_case()
    out = {}
    for name, m in (("fp32", model), ("bf16", half)):
        with torch.inference_mode():
            voice = encode_voice(m, [(clip, 22050)])
            speech = synthesize(m, tokens, voice, params)
            out[name] = voice, speech.chunks[0], vocode(m, speech, voice)["waveform"].flatten()
    (v32, c32, w32), (v16, c16, w16) = out["fp32"], out["bf16"]
    # the voice encoders and mel front ends stay float32: the same voice to the bit
    assert torch.equal(v16.gpt_cond_latent, v32.gpt_cond_latent)
    assert torch.equal(v16.speaker_embedding, v32.speaker_embedding)
    assert torch.isfinite(c16.latents).all() and torch.isfinite(w16).all()
    text_ids = torch.tensor([tokens.ids[0]])
    with torch.inference_mode():
        rel, gaps, agree = teacher_forced(model, half, text_ids, (v32, v16), c32.codes, params.repetition_penalty)
    check_close(rel, gaps, agree)
    same = int((c16.codes == c32.codes).cumprod(dim=1).sum())
    first_tie = next((i for i, g in enumerate(gaps) if g < NEAR_TIE), len(gaps))
    assert same >= first_tie, (same, first_tie, gaps)
    if same == c32.codes.shape[1]:
        snr = 10 * torch.log10(w32.pow(2).sum() / (w16 - w32).pow(2).sum())
        assert snr > 25  # measured 37 dB where all 30 agreed

    coarse = copy.deepcopy(half)  # the control: the GPT's matrices rounded to fp8 (measured 7.2 %, 2 clear misses)
    with torch.no_grad():
        for p in coarse.gpt.gpt.parameters():
            if p.dim() == 2:
                p.copy_(p.to(torch.float8_e4m3fn).to(p.dtype))
    with torch.inference_mode():
        broken = teacher_forced(model, coarse, text_ids, (v32, v16), c32.codes, params.repetition_penalty)
    with pytest.raises(AssertionError):
        check_close(*broken)


def test_rounding_the_voice_encoders_would_change_the_voice(model):
    """The guard above can fail: voice encoders rounded to bf16 (as a plain model.to(bf16) would; here rounded and
    kept float32, since their float32 norms refuse bf16 weights on the CPU) change the voice."""
    rounded, _ = load_xtts(SMALL_FILES)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16))
    clip = load_file(str(XTTS / "io_conditioning.safetensors"))["wav_22050"]
    with torch.inference_mode():
        exact = encode_voice(model, [(clip, 22050)])
        lossy = encode_voice(rounded, [(clip, 22050)])
    assert not torch.equal(lossy.gpt_cond_latent.float(), exact.gpt_cond_latent)


def test_fp16_needs_cuda_and_says_what_to_choose():
    with pytest.raises(NarrateInputError, match="precision.*fp16 needs a CUDA GPU.*choose bf16"):
        check_precision(torch.float16, "cpu")
    check_precision(torch.bfloat16, "cpu")
    check_precision(torch.float32, "cpu")


# ------------------------------------------------------------------------------------ fixed-shape steps / compile
@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_fixed_shape_steps_give_the_same_greedy_codes(io_gen, backend):
    """backend None: the buffers and step a CUDA graph captures, run eagerly; "aot_eager": the same step through
    torch.compile (traced whole, fullgraph), without inductor's C++ code generation to keep the test fast."""
    model = load_xtts(SMALL_FILES, compile=backend is not None, compile_backend=backend or "inductor")[0]
    if backend is None:
        fast_decode.enable(model.gpt, backend=None)
    gpt, cond, texts = model.gpt, io_gen["cond_latent"], _sentences(io_gen)
    eager = load_xtts(SMALL_FILES)[0].gpt
    out = gpt.generate(io_gen["text_ids"], cond, greedy(10.0), record_scores=True)
    assert torch.equal(out.codes, io_gen["rep10.codes"])
    torch.testing.assert_close(out.latents, io_gen["rep10.gpt_latents"], atol=1e-4, rtol=1e-4)
    again = gpt.generate(io_gen["text_ids"], cond, greedy(10.0))  # the kept decoder (graph) reused
    assert torch.equal(again.codes, out.codes)
    if backend is None:  # a padded batch (compiling it too would cost another trace)
        for a, b in zip(gpt.generate_batch(texts, cond, greedy(10.0)),
                        eager.generate_batch(texts, cond, greedy(10.0)), strict=True):
            assert torch.equal(a.codes, b.codes)
            torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=1e-4)
    assert set(gpt.fast_decode.stats) == {"batch 1 first step s"} | ({"batch 3 first step s"} if backend is None
                                                                      else set())
    assert all(s > 0 for s in gpt.fast_decode.stats.values())

"""XTTS side of NFY training: the GPT's teacher-forced training pass against coqui-tts 0.28.0 (GPTTrainer) on the
reduced fixture model, and the audio loss training an entangler in front of a frozen XTTS."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import narrate_model.xtts.gpt as gpt_module
from conftest import FIXTURES
from narrate_model.entangle import Entangler, EntanglerConfig, FaceConditioning, VoiceConditioning
from narrate_model.errors import NarrateInputError
from narrate_model.resample import resample
from narrate_model.train.audio_loss import AudioBatch, audio_loss, code_windows, spectrogram_mse
from narrate_model.xtts.checkpoint import load_xtts
from narrate_model.xtts.gpt_train import (GPT_TRAINER_DROPOUT, cond_latents_from_mels, forward_train, frame_batch,
                                          return_latent_train)

XTTS = FIXTURES / "xtts"
TOL = dict(atol=1e-4, rtol=0)
GRAD_NAMES = ["text_embedding.weight", "mel_head.weight", "text_head.bias", "gpt.h.0.attn.c_attn.weight",
              "conditioning_encoder.init.weight", "conditioning_perceiver.latents"]


@pytest.fixture(scope="module")
def io():
    return load_file(XTTS / "io_training.safetensors")


@pytest.fixture(scope="module")
def xtts():
    model, _ = load_xtts([XTTS / "small_config.json", XTTS / "small_model.safetensors"])
    return model.requires_grad_(False)


def fresh_gpt(xtts):
    """The GPT with gradients on (a deep copy, so the frozen module-scoped model stays untouched)."""
    return copy.deepcopy(xtts.gpt).requires_grad_(True)


def losses_and_grads(gpt, io, **kw):
    gpt.zero_grad()
    out = forward_train(gpt, io["text_ids"], io["text_lengths"], io["audio_codes"], io["wav_lengths"],
                        cond_latents_from_mels(gpt, io["cond_mels"]), **kw)
    (0.01 * out.loss_text + out.loss_mel).backward()  # GPTTrainer's default weights
    params = dict(gpt.named_parameters())
    return out, {name: params[name].grad.clone() for name in GRAD_NAMES}


def grad_errors(grads, io):
    """Max abs error of each gradient relative to the fixture tensor's max."""
    return {n: ((g - io[f"grad.{n}"]).abs().max() / io[f"grad.{n}"].abs().max()).item() for n, g in grads.items()}


# --------------------------------------------------------------------------------------------------------- parity
def test_losses_logits_and_gradients_match_gpt_trainer(xtts, io):
    gpt = fresh_gpt(xtts)
    out, grads = losses_and_grads(gpt, io)
    torch.testing.assert_close(out.loss_text, io["loss_text"], **TOL)
    torch.testing.assert_close(out.loss_mel, io["loss_mel"], **TOL)
    assert out.mel_logits.shape == (2, 1026, 70)
    torch.testing.assert_close(out.mel_logits, io["mel_logits"], **TOL)
    errors = grad_errors(grads, io)
    assert max(errors.values()) < 1e-5, errors
    # the fixture's input is never modified (upstream divides the caller's cond_idxs in place)
    cond_idxs = io["cond_idxs"].clone()
    forward_train(gpt, io["text_ids"], io["text_lengths"], io["audio_codes"], io["wav_lengths"],
                  cond_latents_from_mels(gpt, io["cond_mels"]), cond_idxs=cond_idxs, prompt_masking="last_item")
    assert torch.equal(cond_idxs, io["cond_idxs"])


def test_padding_mask_is_needed_for_parity(xtts, io):
    """Broken variant: the same pass without upstream's padding mask (upstream's return_latent path; item 1's text is
    padded) misses the loss pass's logits."""
    with torch.no_grad():
        latents = return_latent_train(xtts.gpt, io["text_ids"], io["text_lengths"], io["audio_codes"],
                                      io["wav_lengths"], cond_latents_from_mels(xtts.gpt, io["cond_mels"]))
        logits = xtts.gpt.mel_head(latents).transpose(1, 2)
    err = (logits - io["mel_logits"][..., :69]).abs().max().item()
    assert err > 1e-2, err  # measured 1.13


def test_latents_train_match_return_latent_in_train_mode(xtts, io):
    with torch.no_grad():
        cond = cond_latents_from_mels(xtts.gpt, io["cond_mels"])
        latents = return_latent_train(xtts.gpt, io["text_ids"], io["text_lengths"], io["audio_codes"],
                                      io["wav_lengths"], cond)
    assert latents.shape == io["latents_train"].shape == (2, 69, 64)
    torch.testing.assert_close(latents, io["latents_train"], **TOL)
    # broken variant: eval-mode slicing (sub = -5) gives another shape
    with pytest.raises(AssertionError):
        torch.testing.assert_close(torch.cat([latents, latents[:, -1:]], 1)[:, :-5], io["latents_train"])


def test_prompt_masking_quirk_and_per_item_default(xtts, io):
    gpt, args = xtts.gpt, (io["text_ids"], io["text_lengths"], io["audio_codes"], io["wav_lengths"])
    with torch.no_grad():
        cond = cond_latents_from_mels(gpt, io["cond_mels"])
        quirk = forward_train(gpt, *args, cond, cond_idxs=io["cond_idxs"], prompt_masking="last_item")
        ours = forward_train(gpt, *args, cond, cond_idxs=io["cond_idxs"])
    torch.testing.assert_close(quirk.loss_mel, io["loss_mel_cond_idxs"], **TOL)
    torch.testing.assert_close(quirk.loss_text, io["loss_text_cond_idxs"], **TOL)
    # broken variant for the guard above: correct per-item masking misses upstream's number
    assert abs(ours.loss_mel.item() - io["loss_mel_cond_idxs"].item()) > 1e-3  # measured 0.050

    plain = frame_batch(gpt, *args).mel_targets
    last = frame_batch(gpt, *args, cond_idxs=io["cond_idxs"], prompt_masking="last_item").mel_targets
    each = frame_batch(gpt, *args, cond_idxs=io["cond_idxs"]).mel_targets
    assert torch.equal(last[0], plain[0])  # upstream: the first item's prompt segment is trained on
    assert (last[1, 8:24] == -1).all() and torch.equal(last[1, 24:], plain[1, 24:])  # samples // 256
    # ours: samples [0, 8192) -> codes [0, 8) for item 0, [2048, 6144) -> codes [2, 6) for item 1
    for i, (start, end) in enumerate([(0, 8), (2, 6)]):
        assert (each[i, start:end] == -1).all()
        keep = torch.ones_like(plain[i], dtype=torch.bool)
        keep[start:end] = False
        assert torch.equal(each[i][keep], plain[i][keep])


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # the reentrant variant's warning
def test_gradient_checkpointing_gives_the_same_numbers(xtts, io, monkeypatch):
    gpt = fresh_gpt(xtts)
    ref, ref_grads = losses_and_grads(gpt, io)
    calls, block = [], gpt.gpt.h[0]
    forward = block.forward  # counted by wrapping forward: module hooks do not fire when checkpointing recomputes
    monkeypatch.setattr(block, "forward", lambda *a: calls.append(1) or forward(*a))
    gpt.gpt.gradient_checkpointing = True
    out, grads = losses_and_grads(gpt, io)
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing really ran (1 without it)
    assert torch.equal(out.loss_mel, ref.loss_mel) and torch.equal(out.loss_text, ref.loss_text)
    for name in GRAD_NAMES:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-7, rtol=1e-6)

    # Only the blocks train (as with LoRA on a frozen GPT): the input to the blocks needs no grad, and non-reentrant
    # checkpointing still delivers the block gradients; the reentrant variant loses them.
    def block_grad(**kw):
        gpt.requires_grad_(False)
        weight = gpt.gpt.h[0].attn.c_attn.weight.requires_grad_(True)
        weight.grad = None
        forward_train(gpt, io["text_ids"], io["text_lengths"], io["audio_codes"], io["wav_lengths"],
                      cond_latents_from_mels(gpt, io["cond_mels"])).loss_mel.backward(**kw)
        return weight.grad

    assert block_grad() is not None
    real = gpt_module.checkpoint
    monkeypatch.setattr(gpt_module, "checkpoint", lambda fn, *a, use_reentrant: real(fn, *a, use_reentrant=True))
    with pytest.raises(RuntimeError, match="does not require grad"):
        block_grad()  # nothing in the graph needs a gradient at all with the reentrant variant


def test_dropout_in_train_mode_and_replayed_by_checkpointing(xtts, io, monkeypatch):
    gpt = fresh_gpt(xtts)
    gpt.gpt.dropout = GPT_TRAINER_DROPOUT
    plain = losses_and_grads(gpt, io)[0].loss_mel  # eval mode: no dropout, upstream's numbers
    torch.testing.assert_close(plain, io["loss_mel"], **TOL)
    gpt.train()

    def run(seed):
        torch.manual_seed(seed)
        out, grads = losses_and_grads(gpt, io)
        return out.loss_mel, grads

    first, first_grads = run(0)
    assert first != plain and run(1)[0] != first  # masks differ per draw ...
    gpt.gpt.gradient_checkpointing = True
    again, again_grads = run(0)
    assert torch.equal(again, first)  # ... and the recomputation replays the same masks: same gradients
    for name in GRAD_NAMES:
        torch.testing.assert_close(again_grads[name], first_grads[name], atol=1e-7, rtol=1e-6)
    # broken variant: recomputing without the saved RNG state draws other masks, and the gradients are wrong
    real = gpt_module.checkpoint
    monkeypatch.setattr(gpt_module, "checkpoint",
                        lambda fn, *a, use_reentrant: real(fn, *a, use_reentrant=False, preserve_rng_state=False))
    wrong = run(0)[1]
    assert any(not torch.allclose(wrong[n], first_grads[n], atol=1e-6) for n in GRAD_NAMES)


def test_bad_batches_name_the_input(xtts, io):
    gpt = xtts.gpt
    cond = torch.zeros(2, 32, 64)
    with pytest.raises(NarrateInputError, match="text_lengths"):
        forward_train(gpt, io["text_ids"], torch.tensor([31, 5]), io["audio_codes"], io["wav_lengths"], cond)
    with pytest.raises(NarrateInputError, match="batch"):
        forward_train(gpt, io["text_ids"], io["text_lengths"], io["audio_codes"][:1], io["wav_lengths"], cond)
    with pytest.raises(NarrateInputError, match="cut the clips shorter"):
        forward_train(gpt, io["text_ids"], io["text_lengths"], io["audio_codes"], torch.tensor([700 * 1024, 10]),
                      cond)
    with pytest.raises(ValueError, match="prompt_masking"):
        frame_batch(gpt, io["text_ids"], io["text_lengths"], io["audio_codes"], io["wav_lengths"],
                    prompt_masking="first_item")


# ----------------------------------------------------------------------------------------------------- audio loss
def test_spectrogram_mse_counts_each_clips_own_frames():
    g = torch.Generator().manual_seed(0)
    generated, target = torch.randn(2, 24000, generator=g) * 0.1, torch.randn(2, 24000, generator=g) * 0.1
    lengths = torch.tensor([24000, 12000])
    base = spectrogram_mse(generated, target, lengths, 24000)
    beyond = target.clone()
    beyond[1, 12000 + 1024:] = 0.5  # past item 1's end (and past the reach of its last counted frame)
    assert torch.equal(spectrogram_mse(generated, beyond, lengths, 24000), base)
    inside = target.clone()
    inside[1, 4000:5000] = 0.5
    assert spectrogram_mse(generated, inside, lengths, 24000) > base
    # broken variant: counting every frame sees the change past the end
    assert spectrogram_mse(generated, beyond, torch.tensor([24000, 24000]), 24000) != \
        spectrogram_mse(generated, target, torch.tensor([24000, 24000]), 24000)


def test_vocoder_windows_line_latents_up_with_their_target_samples():
    """Latent i voices the target from sample i * 1024 * 24000 / 22050 on: each window's target starts where its
    first latent's audio does, inside the clip's own codes (a clip shorter than the window starts at 0)."""
    spc = 1024 * 24000 / 22050
    code_lengths = torch.tensor([40, 5])
    latents = torch.arange(40.0)[None, :, None].expand(2, 40, 3)  # each latent holds its index
    target = (torch.arange(int(40 * spc)) / spc).floor()[None].expand(2, -1)  # each sample: the code it belongs to
    lengths = torch.floor(code_lengths * spc).long()
    middles = (torch.arange(8) * spc + spc / 2).long()  # the middle of each window latent's audio

    def check(samples_per_code, seed):
        lat, tgt, n = code_windows(latents, code_lengths, target, lengths, 8, samples_per_code,
                                   torch.Generator().manual_seed(seed))
        starts = lat[:, 0, 0].long()
        assert 0 <= starts[0] <= 32 and starts[1] == 0
        for b in range(2):
            assert torch.equal(lat[b, :, 0], torch.arange(8.0) + starts[b])
            assert n[b] == min(int(lengths[b] - math.floor(starts[b] * samples_per_code)), tgt.shape[1])
            inside = middles[middles < n[b]]
            assert torch.equal(tgt[b, inside], lat[b, :len(inside), 0]), (samples_per_code, seed)
        return int(starts[0])

    assert len({check(spc, seed) for seed in range(6)}) > 1  # the window moves with the generator
    with pytest.raises(AssertionError):  # broken variant: 1024 samples per code (the 22.05 kHz stride at 24 kHz)
        for seed in range(6):
            check(1024.0, seed)


def short_batch(io, voice: VoiceConditioning) -> AudioBatch:
    """The fixture's batch cut to 6 and 4 codes (about 0.28 s), so the vocoder pass stays cheap."""
    wav_lengths = torch.tensor([6 * 1024, 4 * 1024 - 300])
    wav24 = resample(io["wav_22050"][:, :6 * 1024], 22050, 24000)[0]
    end1 = int(wav_lengths[1] * 24000 / 22050)
    target = torch.stack([wav24, F.pad(wav24[:end1], (0, wav24.shape[0] - end1))])
    return AudioBatch(io["text_ids"], io["text_lengths"], io["audio_codes"][:, :6], wav_lengths,
                      voice.speaker_embedding, target, cond_latents=voice.cond_latents)


def test_audio_loss_trains_the_entangler_and_leaves_xtts_frozen(xtts, io):
    torch.manual_seed(0)
    with torch.no_grad():
        cond = cond_latents_from_mels(xtts.gpt, io["cond_mels"])
    speaker = F.normalize(torch.randn(2, 512, 1), dim=1)
    face = FaceConditioning(torch.randn(2, 4, 8, 8), torch.rand(2, 2, 8, 8), torch.randn(2, 512))
    ent = Entangler(EntanglerConfig(gpt_dim=64, vocab_size=5413, width=32, heads=4))
    frozen = {k: v.clone() for k, v in xtts.state_dict().items()}
    opt = torch.optim.AdamW(ent.parameters(), lr=1e-3, weight_decay=1e-2)
    video_path = {n for n, _ in ent.named_parameters()
                  if n.startswith("video.") or n in ("patches_out.weight", "identity_out.weight")}
    write_backs = {"latents_out.weight", "speaker_out.weight"}

    def step(cut_latents=False):
        voice, _ = ent(VoiceConditioning(cond, speaker), face, io["text_ids"])
        if cut_latents:  # broken variant: GPT conditioning computed without grad (as the inference encoders do)
            voice = VoiceConditioning(voice.cond_latents.detach(), voice.speaker_embedding)
        losses = audio_loss(xtts, short_batch(io, voice))
        opt.zero_grad()
        losses["total"].backward()
        return losses, {n for n, p in ent.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    losses, moved = step()
    assert set(losses) == {"loss_text", "loss_mel", "spectrogram_mse", "total"}
    # identity init: only the write-backs are non-zero, so only they get a gradient at the first step (the speaker
    # write-back's can only come through HiFi-GAN: the GPT never sees the speaker embedding) ...
    assert moved == write_backs
    opt.step()
    losses, moved = step()
    # ... and from the second step on every parameter of the audio path does (through the GPT and through HiFi-GAN);
    # the video path gets none from the audio loss
    audio_path = {n for n, _ in ent.named_parameters()} - video_path
    assert moved == audio_path
    for _ in range(3):
        opt.step()
        step()
    opt.step()  # the 5th optimiser step on the entangler
    state = xtts.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # every XTTS tensor bit-identical

    # broken variants: the gradient guard misses the latents' path when they are cut off the graph ...
    assert audio_path - step(cut_latents=True)[1] == {"latents_in.weight", "latents_in.bias", "latents_out.weight"}
    # ... and the frozen guard catches one XTTS tensor left trainable and handed to the optimiser
    extra = xtts.hifigan_decoder.waveform_decoder.conv_post.weight
    extra.requires_grad_(True)
    opt.add_param_group({"params": [extra]})
    try:
        step()
        opt.step()
        assert not torch.equal(extra, frozen["hifigan_decoder.waveform_decoder.conv_post.weight"])
    finally:
        extra.requires_grad_(False)
        with torch.no_grad():
            extra.copy_(frozen["hifigan_decoder.waveform_decoder.conv_post.weight"])


def test_audio_loss_windows_and_bad_inputs(xtts, io):
    voice = VoiceConditioning(torch.zeros(2, 32, 64), F.normalize(torch.ones(2, 512, 1), dim=1))
    batch = short_batch(io, voice)
    with torch.no_grad():
        whole = audio_loss(xtts, batch)
        windowed = audio_loss(xtts, batch, vocoder_window=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(windowed["loss_mel"], whole["loss_mel"])  # the window only concerns the vocoder term
    assert windowed["spectrogram_mse"] != whole["spectrogram_mse"]
    with pytest.raises(NarrateInputError, match="vocoder_window"):
        audio_loss(xtts, batch, vocoder_window=0)
    batch.cond_mels = io["cond_mels"]
    with pytest.raises(NarrateInputError, match="exactly one of cond_latents"):
        audio_loss(xtts, batch)

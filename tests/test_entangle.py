"""The dual entanglement transformer: NFY block parity, identity-at-init, trainability, modes, checkpoints."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from narrate_model.entangle import (Entangler, EntanglerConfig, FaceConditioning, TransformerEncoderSA,
                                    VoiceConditioning, load_entangler, save_entangler)
from narrate_model.errors import CheckpointError, NarrateInputError

NFY = FIXTURES / "nfy"
SMALL = EntanglerConfig(gpt_dim=64, vocab_size=5413)  # the small XTTS fixture's GPT width and vocabulary
BLOCK_PARAMS = 1_575_936  # NFY Supplementary Table 1, per block


def make_inputs(config: EntanglerConfig, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    speaker = torch.randn(1, config.speaker_dim, 1, generator=g)
    voice = VoiceConditioning(torch.randn(1, 32, config.gpt_dim, generator=g), speaker / speaker.norm())
    face = FaceConditioning(torch.randn(1, config.latent_channels, size, size, generator=g),
                            (torch.rand(1, config.mask_channels, size, size, generator=g) > 0.5).float(),
                            20 * torch.randn(config.identity_dim, generator=g))
    return voice, face, torch.randint(0, config.vocab_size, (1, 12), generator=g)


def flat(voice: VoiceConditioning, face: FaceConditioning):
    return [voice.cond_latents, voice.speaker_embedding, face.reference_latent, face.masks, face.identity]


def test_nfy_block_reproduces_fixture():
    block = TransformerEncoderSA()
    block.load_state_dict(load_file(NFY / "transformer_encoder_sa.safetensors"))
    io = load_file(NFY / "io_transformer_encoder_sa.safetensors")
    with torch.no_grad():
        out = block(io["x"], io["y"])
    torch.testing.assert_close(out, io["out"], atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in block.parameters()) == BLOCK_PARAMS


@pytest.mark.parametrize("mode", ["ETE", "STE"])
@pytest.mark.parametrize("config,size", [(SMALL, 16), (EntanglerConfig(), 64)])  # full size: [1,32,1024], 64x64
def test_identity_at_init(mode, config, size):
    config = EntanglerConfig(**{**config.__dict__, "mode": mode})
    model = Entangler(config)
    voice, face, ids = make_inputs(config, size)
    with torch.no_grad():
        new_voice, new_face = model(voice, face, ids)
    for new, old in zip(flat(new_voice, new_face), flat(voice, face)):
        assert new.shape == old.shape and torch.equal(new, old)


@pytest.mark.parametrize("mode", ["ETE", "STE"])
def test_trains_from_identity(mode):
    torch.manual_seed(0)
    model = Entangler(EntanglerConfig(**{**SMALL.__dict__, "mode": mode}))
    voice, face, ids = make_inputs(model.config)
    targets = [torch.randn_like(t) for t in flat(voice, face)]
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    def backward():  # toy loss: MSE of every entangled output to a random target
        optimiser.zero_grad()
        outputs = flat(*model(voice, face, ids))
        sum(torch.nn.functional.mse_loss(o, t) for o, t in zip(outputs, targets)).backward()
        return [o.detach() for o in outputs]

    def has_grad(param):
        return param.grad is not None and bool(param.grad.abs().sum() > 0)

    before = backward()
    # Step 1: only the zero-initialised write-backs get a gradient (everything upstream is multiplied by them) ...
    assert {name for name, param in model.named_parameters() if has_grad(param)} == {
        "latents_out.weight", "speaker_out.weight", "patches_out.weight", "identity_out.weight"}
    optimiser.step()
    after = backward()
    for i in (0, 1, 2, 4):
        assert not torch.equal(after[i], before[i])
    torch.testing.assert_close(after[1].norm(dim=1), before[1].norm(dim=1))  # speaker stays on its sphere
    assert torch.equal(after[3], before[3])  # masks pass through
    # ... and from the second step every parameter (both encoders, every projection, the text table) gets one.
    assert [name for name, param in model.named_parameters() if not has_grad(param)] == []


def test_ete_has_two_encoders_ste_shares_one():
    ete, ste = Entangler(SMALL), Entangler(EntanglerConfig(**{**SMALL.__dict__, "mode": "STE"}))
    assert sum(p.numel() for p in ete.parameters()) - sum(p.numel() for p in ste.parameters()) == BLOCK_PARAMS
    assert ete.encoders()[0] is not ete.encoders()[1] and ste.encoders()[0] is ste.encoders()[1]
    encoder_keys = {"audio", "video", "shared"}
    assert {k.split(".")[0] for k in ete.state_dict()} & encoder_keys == {"audio", "video"}
    assert {k.split(".")[0] for k in ste.state_dict()} & encoder_keys == {"shared"}


@pytest.mark.parametrize("mode", ["ETE", "STE"])
def test_safetensors_round_trip(tmp_path, mode):
    torch.manual_seed(1)
    model = Entangler(EntanglerConfig(**{**SMALL.__dict__, "mode": mode}))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))  # non-zero write-backs, so the output is a real test
    path = tmp_path / "entangler.safetensors"
    save_entangler(model, str(path))
    loaded = load_entangler(str(path))
    assert loaded.config == model.config
    voice, face, ids = make_inputs(model.config)
    with torch.no_grad():
        expected, got = flat(*model(voice, face, ids)), flat(*loaded(voice, face, ids))
    assert not torch.equal(expected[0], voice.cond_latents)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_from_nfy_blocks_and_key_mismatches(tmp_path):
    nfy = load_file(NFY / "transformer_encoder_sa.safetensors")
    model = Entangler.from_nfy_blocks(nfy, nfy, SMALL)
    assert torch.equal(model.video.mha.in_proj_weight, nfy["mha.in_proj_weight"])
    with pytest.raises(CheckpointError, match=r"missing: ff_self\.3\.weight.*unexpected: ff\.3\.weight"):
        Entangler.from_nfy_blocks(nfy, {("ff.3.weight" if k == "ff_self.3.weight" else k): v for k, v in nfy.items()})
    with pytest.raises(CheckpointError, match=r"mis-shaped: ln\.weight \(256,\)"):
        Entangler.from_nfy_blocks({**nfy, "ln.weight": torch.zeros(256)}, nfy)
    # a whole-entangler file with the other mode's encoder keys
    path = tmp_path / "ete.safetensors"
    save_entangler(Entangler(SMALL), str(path))
    state = load_file(path)
    save_file({k.replace("audio.", "shared.", 1): v for k, v in state.items() if not k.startswith("video.")},
              str(path), metadata={"nfy_entangler": '{"mode": "ETE", "gpt_dim": 64, "vocab_size": 5413}'})
    with pytest.raises(CheckpointError, match=r"missing: audio\..*unexpected: shared\."):
        load_entangler(str(path))
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="not an NFY entangler file"):
        load_entangler(str(path))


def test_bad_inputs_name_the_input():
    model = Entangler(SMALL)
    voice, face, ids = make_inputs(SMALL)
    with pytest.raises(NarrateInputError, match="'voice'"):
        model(VoiceConditioning(torch.zeros(1, 32, 1024), voice.speaker_embedding), face, ids)
    with pytest.raises(NarrateInputError, match="'face'"):
        model(voice, FaceConditioning(face.reference_latent[..., :15, :15], face.masks, face.identity), ids)
    with pytest.raises(NarrateInputError, match="'tokens'"):
        model(voice, face, ids + SMALL.vocab_size)
    new_voice, _ = model(voice, face, ids[0])  # 1-D ids are accepted as one sequence
    assert new_voice.cond_latents.shape == (1, 32, 64)

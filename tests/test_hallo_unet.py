"""Hallo denoising core: one UNet call against upstream's io_unet fixture, the full-size key layout, strict loading."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from narrate_model.errors import CheckpointError
from narrate_model.hallo.checkpoint import load_net
from narrate_model.hallo.net import HalloConfig, build_net, tiny_config
from narrate_model.hallo.reference import write_banks

HALLO = FIXTURES / "hallo"
LEVELS = (16, 8, 4, 2)


@pytest.fixture(scope="module")
def net():
    with torch.no_grad():
        return load_net(build_net(tiny_config(HALLO / "tiny_config.json")), HALLO / "tiny_net.safetensors")


@pytest.fixture(scope="module")
def io():
    data = load_file(str(HALLO / "io_unet.safetensors"))
    inputs = {k[3:]: v for k, v in data.items() if k.startswith("in.")}
    outputs = {k[4:]: v for k, v in data.items() if k.startswith("out.")}
    return inputs, outputs


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def region_masks(inputs, frames: int, halves: int):
    return [[inputs[f"{region}_mask_{level}"].repeat(frames * halves, 1) for level in LEVELS]
            for region in ("full", "face", "lip")]


@torch.no_grad()
def denoise(net, inputs, cfg: bool, motion_scale=(1.0, 1.0, 1.0)):
    """The body of one FaceAnimatePipeline step, as the fixture generator did it."""
    frames = inputs["noisy_latents"].shape[2]
    cond = net.imageproj(inputs["face_emb"])
    uncond = net.imageproj(torch.zeros_like(inputs["face_emb"]))
    located = net.face_locator(inputs["face_mask_pixels"])[:, :, None].expand(-1, -1, frames, -1, -1)
    halves = 2 if cfg else 1
    tokens = torch.cat([uncond, cond]) if cfg else cond
    audio = inputs["audio_tokens"]
    if cfg:
        audio = torch.cat([torch.zeros_like(audio), audio])
        located = torch.cat([torch.zeros_like(located), located])
    banks = write_banks(net.reference_unet, inputs["ref_latents"], tokens)
    pred = net.denoising_unet(torch.cat([inputs["noisy_latents"]] * halves), inputs["timestep"], tokens, audio,
                              region_masks(inputs, frames, halves), located, banks, motion_scale, uncond_plain=cfg)
    return pred, banks, cond, uncond, located


@pytest.fixture(scope="module")
def cfg_run(net, io):
    return denoise(net, io[0], cfg=True)


def test_projections_and_banks_match_upstream(cfg_run, io):
    _, outputs = io
    _, banks, cond, uncond, located = cfg_run
    assert max_err(cond, outputs["cfg.face_tokens"]) < 1e-5
    assert max_err(uncond, outputs["cfg.face_tokens_uncond"]) < 1e-5
    assert max_err(located[1:], outputs["cfg.face_locator_out"]) < 1e-5
    for name in ("down_blocks.0.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.0"):
        assert banks[name].dtype == torch.float16  # Hallo rounds reference features to fp16
        assert fp16_equal(banks[name], outputs[f"cfg.bank_fp16.{name}"])


def fp16_equal(ours: torch.Tensor, theirs: torch.Tensor, atol: float = 1e-5) -> bool:
    """Two fp16 roundings of float32 values that agree to `atol` (the fixture's float32 noise): each element at
    most one fp16 step apart (a 1e-7 difference before rounding can flip one step: 0.002 for values in [2, 4)) or
    within atol (near zero, where a step is smaller than the float32 noise). A fixed atol cannot say both."""
    ours, theirs = ours.float(), theirs.float()
    step = torch.ldexp(torch.ones_like(theirs), torch.frexp(theirs.abs().clamp(min=2.0 ** -14)).exponent - 11)
    return bool(((ours - theirs).abs() <= step + atol).all())


def test_the_fp16_comparison_tells_a_rounding_flip_from_a_real_error():
    theirs = torch.tensor([2.4805, -0.0199, -6.5e-05, 300.0]).half()
    flipped = theirs.float() + torch.tensor([2.0 ** -9, -(2.0 ** -16), 5e-7, 0.25])  # one step / float noise each
    assert fp16_equal(flipped.half(), theirs) and fp16_equal(theirs, theirs)
    assert not fp16_equal((theirs.float() + torch.tensor([0.0, 0.0, 0.0, 0.5])).half(), theirs)  # two steps at 300
    assert not fp16_equal((theirs.float() + torch.tensor([2.0 ** -8, 0.0, 0.0, 0.0])).half(), theirs)
    # broken variant: the fixed 1e-3 atol this replaces rejects a one-step flip at 2.48
    assert max_err(flipped.half().float(), theirs.float()) > 1e-3


def test_cfg_step_matches_upstream(cfg_run, io):
    _, outputs = io
    pred = cfg_run[0]
    assert max_err(pred, outputs["cfg.noise_pred"]) < 1e-4
    uncond, cond = pred.chunk(2)
    assert max_err(uncond + 3.5 * (cond - uncond), outputs["cfg.noise_pred_guided_3p5"]) < 3e-4


def test_nocfg_steps_match_upstream(net, io):
    inputs, outputs = io
    pred, *_ = denoise(net, inputs, cfg=False)
    assert max_err(pred, outputs["nocfg.noise_pred"]) < 1e-4
    # full / face / lip branch weights in that order
    alt, *_ = denoise(net, inputs, cfg=False, motion_scale=(0.5, 1.5, 2.0))
    assert max_err(alt, outputs["nocfg_motion_scale_alt.noise_pred"]) < 1e-4
    assert max_err(alt, pred) > 1e-3


def test_full_size_net_on_meta_has_exactly_the_manifest_layout():
    net = build_net(HalloConfig(), device="meta")
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    manifest = {}
    for line in (HALLO / "manifest_net.tsv").read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        manifest[key] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    assert len(manifest) == 2656
    assert sorted(set(manifest) - set(ours)) == [] and sorted(set(ours) - set(manifest)) == []
    assert {k: s for k, s in manifest.items() if ours[k] != s} == {}


def test_strict_loading_names_the_bad_keys(tmp_path: Path):
    state = load_file(str(HALLO / "tiny_net.safetensors"))
    missing = "denoising_unet.mid_block.audio_modules.0.transformer_blocks.0.zero_conv_lip.weight"
    shaped = "imageproj.norm.weight"
    state.pop(missing)
    state[shaped] = torch.zeros(7)
    state["denoising_unet.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    net = build_net(tiny_config(HALLO / "tiny_config.json"))
    with pytest.raises(CheckpointError) as err:
        load_net(net, bad)
    text = str(err.value)
    assert missing in text and shaped in text and "denoising_unet.extra.weight" in text
    assert "1 missing" in text and "1 unexpected" in text and "1 mis-shaped" in text


def test_loading_a_pth_with_weights_only_and_onto_meta(tmp_path: Path):
    state = load_file(str(HALLO / "tiny_net.safetensors"))
    pth = tmp_path / "net.pth"
    torch.save(state, pth)
    net = load_net(build_net(tiny_config(HALLO / "tiny_config.json"), device="meta"), pth, dtype=torch.float16)
    assert not any(t.is_meta for t in [*net.parameters(), *net.buffers()])
    assert net.dtype == torch.float16
    key = "denoising_unet.conv_in.weight"
    assert torch.equal(net.state_dict()[key], state[key].half())


def test_separate_motion_module_file_fills_missing_motion_keys(tmp_path: Path):
    state = load_file(str(HALLO / "tiny_net.safetensors"))
    motion = {k[len("denoising_unet."):]: v for k, v in state.items() if ".motion_modules." in k}
    stripped = {k: v for k, v in state.items() if ".motion_modules." not in k}
    save_file(motion, str(tmp_path / "mm.safetensors"))
    save_file(stripped, str(tmp_path / "net.safetensors"))
    net = build_net(tiny_config(HALLO / "tiny_config.json"))
    with pytest.raises(CheckpointError, match="missing"):
        load_net(net, tmp_path / "net.safetensors")
    load_net(net, tmp_path / "net.safetensors", motion_module_path=tmp_path / "mm.safetensors")
    key = "denoising_unet.mid_block.motion_modules.0.temporal_transformer.proj_in.weight"
    assert torch.equal(net.state_dict()[key], state[key])


def test_full_size_forward_shapes_on_meta():
    """The real layout wired end to end (channel changes, audio widths, odd latent sizes) without any memory."""
    with torch.no_grad():
        net = build_net(HalloConfig(), device="meta")
        frames, size = 3, 60  # 480 px: 60 -> 30 -> 15 -> 8 latents and back
        tokens = net.imageproj(torch.zeros(2, 512, device="meta"))
        banks = write_banks(net.reference_unet, torch.zeros(3, 4, size, size, device="meta"), tokens)
        assert sorted(banks) == sorted(net.denoising_unet.reference_block_names()) and len(banks) == 16
        audio = net.audioproj(torch.zeros(2, frames, 5, 12, 768, device="meta"))
        sides = [size, 30, 15, 8]
        masks = [[torch.zeros(2 * frames, s * s, device="meta") for s in sides] for _ in range(3)]
        located = net.face_locator(torch.zeros(1, 3, 8 * size, 8 * size, device="meta"))
        assert located.shape == (1, 320, size, size)
        located = located[:, :, None].expand(2, -1, frames, -1, -1)
        out = net.denoising_unet(torch.zeros(2, 4, frames, size, size, device="meta"), torch.tensor(999), tokens,
                                 audio, masks, located, banks, uncond_plain=True)
    assert out.shape == (2, 4, frames, size, size)


def test_dropping_the_skipped_motion_modules_changes_nothing(net, io):
    inputs, outputs = io
    slim = load_net(build_net(tiny_config(HALLO / "tiny_config.json")), HALLO / "tiny_net.safetensors")
    before = sum(p.numel() for p in slim.parameters())
    slim.denoising_unet.drop_skipped_motion_modules()
    assert sum(p.numel() for p in slim.parameters()) < before
    pred, *_ = denoise(slim, inputs, cfg=True)
    assert max_err(pred, outputs["cfg.noise_pred"]) < 1e-4

"""Hallo's GPU-path savings keep the results: unused motion modules are not loaded, the reference K/V cache gives
the uncached video, and the optional torch.compile of the UNet gives the eager output."""

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from conftest import FIXTURES
from test_hallo_sampler import vae  # noqa: F401 (the fixture VAE)
from narrate_model.hallo import attention, sampler
from narrate_model.hallo.checkpoint import load_hallo
from narrate_model.hallo.sampler import FaceInputs, SamplerSettings, sample_video

HALLO = FIXTURES / "hallo"
LEVELS = (16, 8, 4, 2)


@pytest.fixture(scope="module")
def net_path(tmp_path_factory):
    """The fixture Net where the Load Hallo node finds a reduced layout: `<weights>.json` beside the weights."""
    folder = tmp_path_factory.mktemp("hallo")
    (folder / "tiny.safetensors").symlink_to(HALLO / "tiny_net.safetensors")
    (folder / "tiny.json").symlink_to(HALLO / "tiny_config.json")
    return folder / "tiny.safetensors"


@pytest.fixture(scope="module")
def face():
    data = load_file(str(HALLO / "io_unet.safetensors"))
    inputs = {k[3:]: v for k, v in data.items() if k.startswith("in.")}
    return FaceInputs(inputs["face_emb"][0], inputs["face_mask_pixels"][0],
                      *[[inputs[f"{region}_mask_{level}"] for level in LEVELS]
                        for region in ("full", "face", "lip")])


def windows(net, frames: int, seed: int = 0) -> torch.Tensor:
    """Random wav2vec windows: the sampler then runs audioproj too, as it does on real speech."""
    ap = net.config.audioproj
    return torch.randn(frames, ap.seq_len, ap.blocks, ap.channels, generator=torch.Generator().manual_seed(seed))


def run(net, face, vae, frames: int, portrait: int = 1, **settings) -> torch.Tensor:
    """The video latents for random reference latents (`portrait` seeds them) and random speech."""
    encode, decode = vae
    ref_latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(portrait))
    return sample_video(net, face, windows(net, frames), ref_latents,
                        SamplerSettings(cfg=3.5, seed=3, clip_length=2, **settings),
                        vae_encode=encode, vae_decode=decode)


class ParameterUse(TorchFunctionMode):
    """Records every parameter that enters a torch operation (modules' forwards and functional uses alike, e.g. a
    conv weight read through F.linear) while active."""

    def __init__(self, params):
        super().__init__()
        self.by_id = {id(p): name for name, p in params}
        self.used = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for value in (*args, *(kwargs or {}).values()):
            for item in (value if isinstance(value, (list, tuple)) else (value,)):
                if isinstance(item, torch.nn.Parameter) and id(item) in self.by_id:
                    self.used.add(self.by_id[id(item)])
        return func(*args, **(kwargs or {}))


def used_parameters(net, face, vae) -> set[str]:
    """Names of the parameters one sampler run touches (one clip with motion frames, CFG, audioproj, face locator)."""
    with ParameterUse(net.named_parameters()) as use:
        run(net, face, vae, frames=2, steps=1)
    return use.used


def check_loaded_equals_used(net, used: set[str]) -> int:
    params = dict(net.named_parameters())
    unused = sorted(set(params) - used)
    loaded, in_use = (sum(p.numel() for name, p in params.items() if name in names) for names in (params, used))
    assert loaded == in_use and not unused, f"{loaded - in_use} loaded parameters never used, e.g. {unused[:3]}"
    return loaded


def test_loaded_parameters_are_the_ones_inference_uses(net_path, face, vae):
    full = load_hallo(net_path, inference_only=False)
    used = used_parameters(full, face, vae)  # measured on the complete Net: what inference runs of everything
    loaded = check_loaded_equals_used(load_hallo(net_path), used)
    assert loaded < sum(p.numel() for p in full.parameters())
    with pytest.raises(AssertionError, match="never used, e.g. .*motion_modules"):
        check_loaded_equals_used(full, used)  # the broken variant: keeping the skipped motion modules


def test_the_eval_branch_refuses_a_net_without_its_motion_modules(net_path):
    net = load_hallo(net_path)
    with pytest.raises(ValueError, match="inference_only=False"):
        net.denoising_unet(torch.zeros(1, 4, 2, 16, 16), 1, None, None, None, motion_frames_branch=False)


class StaleCache(attention.ReferenceKVCache):
    """A broken cache: keeps the keys and values it projected first, whatever banks come later."""

    def is_current(self, entry, bank):
        return True


def test_reference_kv_cache_gives_the_uncached_video_and_a_stale_cache_fails(net_path, face, vae, monkeypatch):
    net = load_hallo(net_path)
    uncached = run(net, face, vae, frames=2, steps=2, reference_kv_cache=False)
    assert torch.equal(run(net, face, vae, frames=2, steps=2), uncached)
    shared = StaleCache()  # the broken variant: one cache that is never invalidated, shared by two portraits
    monkeypatch.setattr(sampler, "ReferenceKVCache", lambda: shared)
    run(net, face, vae, frames=2, steps=1, portrait=2)
    assert not torch.allclose(run(net, face, vae, frames=2, steps=2), uncached, atol=1e-3)

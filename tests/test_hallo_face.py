"""Hallo image side: face locator / identity projection vs io_unet, masks vs io_masks, landmarks on real portraits."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FIXTURES
from narrate_model.hallo.projections import FaceLocator, ImageProjModel

HALLO = FIXTURES / "hallo"


def tiny_part(prefix: str) -> dict:
    with safe_open(HALLO / "tiny_net.safetensors", "pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def manifest_part(prefix: str) -> dict:
    rows = (line.split("\t") for line in (HALLO / "manifest_net.tsv").read_text().splitlines())
    return {r[0][len(prefix):]: list(json.loads(r[1])) for r in rows if r[0].startswith(prefix)}


@pytest.fixture(scope="module")
def io_unet():
    return load_file(HALLO / "io_unet.safetensors")


def test_full_size_keys_and_shapes_match_net_pth():
    tiny = json.loads((HALLO / "tiny_config.json").read_text())["full_size_values"]
    with torch.device("meta"):
        locator = FaceLocator(tiny["face_locator"]["conditioning_embedding_channels"],
                              block_out_channels=tiny["face_locator"]["block_out_channels"])
        imageproj = ImageProjModel(**tiny["imageproj"])
    for module, prefix in ((locator, "face_locator."), (imageproj, "imageproj.")):
        ours = {k: list(v.shape) for k, v in module.state_dict().items()}
        assert ours == manifest_part(prefix)


def test_face_tokens_and_face_locator_match_io_unet(io_unet):
    cfg = json.loads((HALLO / "tiny_config.json").read_text())
    imageproj = ImageProjModel(**cfg["imageproj"]).eval()
    imageproj.load_state_dict(tiny_part("imageproj."), strict=True)
    locator = FaceLocator(cfg["face_locator"]["conditioning_embedding_channels"],
                          block_out_channels=cfg["face_locator"]["block_out_channels"]).eval()
    locator.load_state_dict(tiny_part("face_locator."), strict=True)
    with torch.no_grad():
        face = io_unet["in.face_emb"]
        tokens, uncond = imageproj(face), imageproj(torch.zeros_like(face))
        frames = io_unet["in.noisy_latents"].shape[2]
        video_mask = io_unet["in.face_mask_pixels"].unsqueeze(2).repeat(1, 1, frames, 1, 1)
        located = locator(video_mask)
    for run in ("cfg", "nocfg"):
        torch.testing.assert_close(tokens, io_unet[f"out.{run}.face_tokens"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(uncond, io_unet[f"out.{run}.face_tokens_uncond"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(located, io_unet[f"out.{run}.face_locator_out"], atol=1e-5, rtol=1e-5)

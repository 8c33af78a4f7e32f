"""Hallo's `Net` (scripts/inference.py): reference_unet, denoising_unet, face_locator, imageproj, audioproj.

The full-size configuration is embedded here (SD1.5's UNet config + `configs/inference/default.yaml`), so building
the model needs no download; `tiny_config` reads the reduced configuration of the test fixtures.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .motion import MotionModuleConfig
from .projections import AudioProjModel, FaceLocator, ImageProjModel
from .reference import build_reference_unet
from .unet import DenoisingUNet, UNet3DConfig


@dataclass(frozen=True)
class FaceLocatorConfig:
    conditioning_embedding_channels: int = 320
    block_out_channels: tuple[int, ...] = (16, 32, 64, 128)


@dataclass(frozen=True)
class ImageProjConfig:
    cross_attention_dim: int = 768
    clip_embeddings_dim: int = 512
    clip_extra_context_tokens: int = 4


@dataclass(frozen=True)
class AudioProjConfig:
    seq_len: int = 5
    blocks: int = 12
    channels: int = 768
    intermediate_dim: int = 512
    output_dim: int = 768
    context_tokens: int = 32


@dataclass(frozen=True)
class HalloConfig:
    """Defaults = the released Hallo `net.pth` (SD1.5 UNets, wav2vec2-base audio, 512-d face embedding)."""
    unet: UNet3DConfig = field(default_factory=UNet3DConfig)
    face_locator: FaceLocatorConfig = field(default_factory=FaceLocatorConfig)
    imageproj: ImageProjConfig = field(default_factory=ImageProjConfig)
    audioproj: AudioProjConfig = field(default_factory=AudioProjConfig)
    latent_scale: float = 0.18215  # SD1.5 VAE scaling factor


class HalloNet(nn.Module):
    def __init__(self, config: HalloConfig = HalloConfig()):
        super().__init__()
        self.config = config
        self.reference_unet = build_reference_unet(config.unet)
        self.denoising_unet = DenoisingUNet(config.unet)
        fl = config.face_locator
        self.face_locator = FaceLocator(fl.conditioning_embedding_channels,
                                        block_out_channels=fl.block_out_channels)
        self.imageproj = ImageProjModel(**vars(config.imageproj))
        self.audioproj = AudioProjModel(**vars(config.audioproj))

    @property
    def dtype(self) -> torch.dtype:
        return self.denoising_unet.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.denoising_unet.conv_in.weight.device


def build_net(config: HalloConfig = HalloConfig(), device: Optional[Union[str, torch.device]] = None) -> HalloNet:
    """Build the Net; `device="meta"` gives the full-size layout without allocating memory."""
    if device is None:
        return HalloNet(config).eval()
    with torch.device(device):
        return HalloNet(config).eval()


def compile_unet(net: HalloNet, backend: str = "inductor", mode: Optional[str] = None) -> HalloNet:
    """`torch.compile` the denoising UNet in place (its state-dict keys stay as they are). Nothing is compiled here:
    the first denoising step compiles (minutes at full size), later steps and clips of the same shape reuse it."""
    net.denoising_unet.compile(backend=backend, mode=mode, dynamic=False)
    return net


def tiny_config(path: Union[str, Path]) -> HalloConfig:
    """Read the reduced Net description of the fixtures (`tiny_config.json`: diffusers-style UNet config +
    unet_additional_kwargs + projection sizes)."""
    data = json.loads(Path(path).read_text())
    unet = data["denoising_unet"]["config"]
    extra = data["denoising_unet"]["unet_additional_kwargs"]
    mm = extra["motion_module_kwargs"]
    unet_config = UNet3DConfig(
        in_channels=unet["in_channels"], out_channels=unet["out_channels"],
        block_out_channels=tuple(unet["block_out_channels"]), layers_per_block=unet["layers_per_block"],
        attention_heads=unet["attention_head_dim"], cross_attention_dim=unet["cross_attention_dim"],
        audio_attention_dim=extra["audio_attention_dim"], norm_num_groups=unet["norm_num_groups"],
        norm_eps=unet["norm_eps"], flip_sin_to_cos=unet["flip_sin_to_cos"], freq_shift=unet["freq_shift"],
        motion=MotionModuleConfig(num_attention_heads=mm["num_attention_heads"],
                                  num_transformer_block=mm["num_transformer_block"],
                                  num_attention_blocks=len(mm["attention_block_types"]),
                                  max_len=mm["temporal_position_encoding_max_len"]),
        motion_module_resolutions=tuple(extra["motion_module_resolutions"]),
        motion_module_mid_block=extra["motion_module_mid_block"])
    fl = data["face_locator"]
    return HalloConfig(
        unet=unet_config,
        face_locator=FaceLocatorConfig(fl["conditioning_embedding_channels"], tuple(fl["block_out_channels"])),
        imageproj=ImageProjConfig(**data["imageproj"]),
        audioproj=AudioProjConfig(**data["audioproj"]))

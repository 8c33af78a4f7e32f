"""Hallo's ReferenceNet and its "reference attention" banks.

The ReferenceNet is an SD1.5 `UNet2DConditionModel` (diffusers' class; Hallo's copy has the same keys and maths)
without its output head. Once per clip it runs at timestep 0 on the latents of [reference, motion frame 1, motion
frame 2]; every transformer block's `norm1` output is kept as that block's *bank*. The denoising UNet's image
transformer of the same name reads it: image 0 becomes extra self-attention keys/values, images 1.. become the
motion-frame features in front of the motion modules.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from .unet import UNet3DConfig


def reference_unet_kwargs(config: UNet3DConfig) -> dict:
    """diffusers `UNet2DConditionModel` arguments of the SD1.5-layout ReferenceNet matching a denoising UNet."""
    return dict(
        in_channels=config.in_channels, out_channels=config.out_channels,
        block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_heads, cross_attention_dim=config.cross_attention_dim,
        norm_num_groups=config.norm_num_groups, norm_eps=config.norm_eps,
        flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift,
        down_block_types=("CrossAttnDownBlock2D",) * (len(config.block_out_channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(config.block_out_channels) - 1),
    )


def build_reference_unet(config: UNet3DConfig) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(**reference_unet_kwargs(config))
    # Hallo's ReferenceNet has no output head (net.pth has no `reference_unet.conv_norm_out/conv_out.*`): only the
    # banks written on the way are used
    unet.conv_norm_out = None
    unet.conv_out = nn.Identity()
    return unet


def fp16_rounded(x: torch.Tensor) -> torch.Tensor:
    """Hallo's `ReferenceAttentionControl.update` stores the banks in float16, even in an fp32 model. Without autograd
    the bank is an fp16 tensor; with it, the same rounded values stay in x's dtype (x + (round(x) - x) is exact), so
    the gradient into the ReferenceNet's inputs is not itself rounded to fp16."""
    if not x.requires_grad:
        return x.to(torch.float16)
    return x + (x.to(torch.float16).to(x.dtype) - x).detach()


def reference_banks(reference_unet: UNet2DConditionModel, ref_latents: torch.Tensor,
                    face_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the ReferenceNet once and return each transformer block's `norm1` output, by block name (with autograd
    when it is recording: training sends gradients through the banks into the reference latents and face tokens).

    ref_latents [(B S), 4, h, w]: per batch item the scaled latents of the reference image, then its motion frames.
    face_tokens [B, T, D]: one set per batch item (with CFG: B = 2, [uncond, cond]).
    Returns {name: [(B S), h*w, C]}, rounded to float16 as Hallo's reader stores them (see `fp16_rounded`).
    """
    dtype = reference_unet.conv_in.weight.dtype
    latents = ref_latents.to(dtype)
    # quirk: Hallo's writer repeats the tokens image-wise (`tokens.repeat(S)`), so with B = 2 the batch
    # [r,m1,m2,r,m1,m2] is paired with [u,c,u,c,u,c] (e.g. m1 of the first half sees the cond tokens); reproduced
    tokens = face_tokens.to(dtype).repeat(latents.shape[0] // face_tokens.shape[0], 1, 1)
    banks: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in reference_unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            def keep(_module, _inputs, output, name=name):
                banks[name] = fp16_rounded(output)
            hooks.append(module.norm1.register_forward_hook(keep))
    try:
        timestep = torch.zeros((), device=latents.device)
        reference_unet(latents, timestep, encoder_hidden_states=tokens, return_dict=False)
    finally:
        for hook in hooks:
            hook.remove()
    return banks


@torch.no_grad()
def write_banks(reference_unet: UNet2DConditionModel, ref_latents: torch.Tensor,
                face_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sampler's banks: the same reference and motion frames for every CFG half.

    ref_latents [S, 4, h, w]: scaled latents of the reference image followed by the motion frames.
    face_tokens [B, T, D]: B = 2 ([uncond, cond]) with CFG, else 1.
    Returns {name: [(B S), h*w, C]} in float16, the precision Hallo's `ReferenceAttentionControl.update` stores.
    """
    return reference_banks(reference_unet, ref_latents.repeat(face_tokens.shape[0], 1, 1, 1), face_tokens)

"""Hallo's denoising UNet (`UNet3DConditionModel` with audio and motion modules), as `scripts/inference.py` runs it.

Layout: SD1.5 (320/640/1280/1280, 8 heads, face-token cross-attention) with, in every cross-attention layer,
resnet -> image transformer (reads the ReferenceNet bank) -> audio transformer -> AnimateDiff motion module.

Hallo's inference leaves this UNet in training mode with gradient checkpointing on, so its blocks take their
"training" branch, our default (`motion_frames_branch=True`; the eval branch gives different videos):
  * the two motion-frame features from the reference bank are put in front of the frames before each motion module
    of the cross-attention blocks and the mid block (four zero frames when there is no bank: Hallo's hard-coded 4);
  * `DownBlock3D` (down 3) and `UpBlock3D` (up 0) skip their motion modules (the weights are in net.pth, unused).
The eval branch (`motion_frames_branch=False`: no motion frames except in the mid block, every motion module runs) is
what Hallo's training script runs when gradient checkpointing is off.

Gradient checkpointing (`checkpointing="reentrant"` or `"non_reentrant"`, only while autograd records) wraps each
resnet, image transformer, audio transformer and motion module of the down and up blocks separately, as Hallo does;
the mid block is never checkpointed. Every tensor a segment reads is passed to it explicitly (the reference bank
too), so reentrant checkpointing sees the same inputs Hallo's does and gradients reach the bank's producers.
Hidden states are kept per frame, `[(b f), C, H, W]`; only motion modules look across frames.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AudioTransformer, GroupNorm, ImageTransformer, ReferenceKVCache
from .motion import MotionModule, MotionModuleConfig

CHECKPOINTING_MODES = (None, "reentrant", "non_reentrant")
EMPTY_BANK_MOTION_FRAMES = 4  # Hallo's zero motion frames when the reader bank is empty (hard-coded, not n_motion)


@dataclass(frozen=True)
class UNet3DConfig:
    """SD1.5's UNet config plus `default.yaml`'s unet_additional_kwargs (defaults = the real Hallo net)."""
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_heads: int = 8  # SD1.5's `attention_head_dim: 8` is used as the head count
    cross_attention_dim: int = 768
    audio_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    motion: MotionModuleConfig = field(default_factory=MotionModuleConfig)
    motion_module_resolutions: tuple[int, ...] = (1, 2, 4, 8)
    motion_module_mid_block: bool = True


@dataclass
class StepContext:
    """Per-call conditioning shared by all blocks (batch b = CFG halves, f = frames)."""
    temb: torch.Tensor  # [b, temb]
    frames: int
    face_tokens: torch.Tensor  # [(b f), T, D]
    audio: torch.Tensor  # [(b f), N, Da]
    masks: Sequence[Sequence[torch.Tensor]]  # (full, face, lip) x level -> [(b f), H*W]
    motion_scale: Sequence[float]
    banks: Optional[Mapping[str, torch.Tensor]]
    uncond_plain: bool
    motion_frames_branch: bool = True
    checkpointing: Optional[str] = None
    reference_kv: Optional[ReferenceKVCache] = None

    def bank(self, key: str) -> Optional[torch.Tensor]:
        return None if self.banks is None else self.banks[key]

    def run(self, segment: Callable, *args):
        """segment(*args), through gradient checkpointing when it is on and autograd is recording."""
        if self.checkpointing is None or not torch.is_grad_enabled():
            return segment(*args)
        return checkpoint(segment, *args, use_reentrant=self.checkpointing == "reentrant")

    def motion_prefix(self, features: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Motion-frame features [b, M, H*W, C] from the bank -> [b, M, C, H, W] for the motion module; Hallo's four
        zero frames when the reference was dropped (no bank)."""
        height, width = x.shape[-2:]
        if features is None:
            return x.new_zeros(x.shape[0] // self.frames, EMPTY_BANK_MOTION_FRAMES, x.shape[1], height, width)
        return features.transpose(2, 3).unflatten(3, (height, width))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, cout)
        self.norm2 = GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, frames: int) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        t = self.time_emb_proj(F.silu(temb)).repeat_interleave(frames, dim=0)
        h = self.conv2(F.silu(self.norm2(h + t[:, :, None, None])))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class CrossAttnLayers(nn.Module):
    """The resnet -> attentions -> audio_modules -> motion_modules stack shared by the cross-attention blocks."""

    def __init__(self, resnet_in: Sequence[int], cout: int, audio_inner: Sequence[int], level: int,
                 temb_channels: int, config: UNet3DConfig, use_motion: bool):
        super().__init__()
        groups, eps, heads = config.norm_num_groups, config.norm_eps, config.attention_heads
        self.resnets = nn.ModuleList([ResnetBlock(cin, cout, temb_channels, groups, eps) for cin in resnet_in])
        self.attentions = nn.ModuleList(
            [ImageTransformer(cout, heads, config.cross_attention_dim, groups) for _ in resnet_in])
        self.audio_modules = nn.ModuleList(
            [AudioTransformer(cout, inner, heads, config.audio_attention_dim, level, groups) for inner in audio_inner])
        self.motion_modules = nn.ModuleList(
            [MotionModule(cout, config.motion) for _ in resnet_in] if use_motion else [])

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = ctx.run(self.resnets[i], x, ctx.temb, ctx.frames)
        attention = self.attentions[i]
        x, motion = ctx.run(attention, x, ctx.face_tokens, ctx.bank(attention.bank_key), ctx.frames, ctx.uncond_plain,
                            ctx.reference_kv)
        x = ctx.run(self.audio_modules[i], x, ctx.audio, ctx.masks, ctx.motion_scale)
        if len(self.motion_modules):
            prefix = ctx.motion_prefix(motion, x) if ctx.motion_frames_branch else None
            x = ctx.run(self.motion_modules[i], x, ctx.frames, prefix)
        return x


class CrossAttnDownBlock(CrossAttnLayers):
    def __init__(self, cin: int, cout: int, level: int, temb_channels: int, config: UNet3DConfig,
                 use_motion: bool, add_downsample: bool):
        resnet_in = [cin] + [cout] * (config.layers_per_block - 1)
        # audio inner width = the layer's input channels (Hallo: `in_channels // heads` head size)
        super().__init__(resnet_in, cout, resnet_in, level, temb_channels, config, use_motion)
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if add_downsample else None

    def forward(self, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i in range(len(self.resnets)):
            x = self.layer(i, x, ctx)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


def plain_layers(resnets: nn.ModuleList, motion_modules: nn.ModuleList, x: torch.Tensor, ctx: StepContext,
                 skips: Optional[list[torch.Tensor]] = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The resnet (-> motion module) layers of `DownBlock3D` / `UpBlock3D`; an up block pops `skips`. The motion
    modules run in the eval branch only. Returns the output and every layer's output."""
    outputs = []
    for i, resnet in enumerate(resnets):
        if skips is not None:
            x = torch.cat([x, skips.pop()], dim=1)
        x = ctx.run(resnet, x, ctx.temb, ctx.frames)
        if len(motion_modules) and not ctx.motion_frames_branch:
            x = ctx.run(motion_modules[i], x, ctx.frames, None)
        outputs.append(x)
    return x, outputs


class DownBlock(nn.Module):
    """`DownBlock3D`: resnets only at inference (training branch); its motion modules are loaded but skipped."""

    def __init__(self, cin: int, cout: int, temb_channels: int, config: UNet3DConfig, use_motion: bool,
                 add_downsample: bool):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        resnet_in = [cin] + [cout] * (config.layers_per_block - 1)
        self.resnets = nn.ModuleList([ResnetBlock(c, cout, temb_channels, groups, eps) for c in resnet_in])
        self.motion_modules = nn.ModuleList(
            [MotionModule(cout, config.motion) for _ in resnet_in] if use_motion else [])
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if add_downsample else None

    def forward(self, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, skips = plain_layers(self.resnets, self.motion_modules, x, ctx)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """`UNetMidBlock3DCrossAttn`: resnet, then attention -> audio -> motion (with motion frames) -> resnet."""

    def __init__(self, channels: int, temb_channels: int, config: UNet3DConfig):
        super().__init__()
        groups, eps, heads = config.norm_num_groups, config.norm_eps, config.attention_heads
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, temb_channels, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([ImageTransformer(channels, heads, config.cross_attention_dim, groups)])
        self.audio_modules = nn.ModuleList(
            [AudioTransformer(channels, channels, heads, config.audio_attention_dim, 3, groups)])
        self.motion_modules = nn.ModuleList(
            [MotionModule(channels, config.motion)] if config.motion_module_mid_block else [])

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        # never checkpointed, and the motion frames are used in both branches (as Hallo's mid block)
        x = self.resnets[0](x, ctx.temb, ctx.frames)
        attention = self.attentions[0]
        x, motion = attention(x, ctx.face_tokens, ctx.bank(attention.bank_key), ctx.frames, ctx.uncond_plain,
                              ctx.reference_kv)
        x = self.audio_modules[0](x, ctx.audio, ctx.masks, ctx.motion_scale)
        if len(self.motion_modules):
            x = self.motion_modules[0](x, ctx.frames, ctx.motion_prefix(motion, x))
        return self.resnets[1](x, ctx.temb, ctx.frames)


def up_resnet_inputs(cin: int, cout: int, prev: int, layers: int) -> list[int]:
    """Input channels of each up-block resnet: previous output (or own output) + the popped skip's channels."""
    return [(prev if i == 0 else cout) + (cin if i == layers - 1 else cout) for i in range(layers)]


class CrossAttnUpBlock(CrossAttnLayers):
    def __init__(self, cin: int, cout: int, prev: int, level: int, temb_channels: int, config: UNet3DConfig,
                 use_motion: bool, add_upsample: bool):
        layers = config.layers_per_block + 1
        # audio inner width = the block's `in_channels` for every layer (Hallo's constructor argument)
        super().__init__(up_resnet_inputs(cin, cout, prev, layers), cout, [cin] * layers, level, temb_channels,
                         config, use_motion)
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if add_upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        for i in range(len(self.resnets)):
            x = self.layer(i, torch.cat([x, skips.pop()], dim=1), ctx)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, skips[-1].shape[-2:])
        return x


class UpBlock(nn.Module):
    """`UpBlock3D`: resnets only at inference (training branch); its motion modules are loaded but skipped."""

    def __init__(self, cin: int, cout: int, prev: int, temb_channels: int, config: UNet3DConfig, use_motion: bool,
                 add_upsample: bool):
        super().__init__()
        layers = config.layers_per_block + 1
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock(c, cout, temb_channels, groups, eps)
                                      for c in up_resnet_inputs(cin, cout, prev, layers)])
        self.motion_modules = nn.ModuleList(
            [MotionModule(cout, config.motion) for _ in range(layers)] if use_motion else [])
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if add_upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        x, _ = plain_layers(self.resnets, self.motion_modules, x, ctx, skips)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, skips[-1].shape[-2:])
        return x


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear_1 = nn.Linear(cin, cout)
        self.linear_2 = nn.Linear(cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class DenoisingUNet(nn.Module):
    """Hallo's `denoising_unet`; state-dict keys as in net.pth after `denoising_unet.`."""

    def __init__(self, config: UNet3DConfig = UNet3DConfig()):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        last = len(channels) - 1
        temb = channels[0] * 4
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb)

        def motion_at(resolution: int) -> bool:
            return resolution in config.motion_module_resolutions

        self.down_blocks = nn.ModuleList()
        for i, cout in enumerate(channels):
            cin = channels[max(i - 1, 0)]
            if i < last:
                block = CrossAttnDownBlock(cin, cout, i, temb, config, motion_at(2 ** i), add_downsample=True)
            else:
                block = DownBlock(cin, cout, temb, config, motion_at(2 ** i), add_downsample=False)
            self.down_blocks.append(block)

        reversed_channels = list(reversed(channels))
        self.up_blocks = nn.ModuleList()
        for i, cout in enumerate(reversed_channels):
            prev = reversed_channels[max(i - 1, 0)]
            cin = reversed_channels[min(i + 1, last)]
            use_motion, add_upsample = motion_at(2 ** (last - i)), i < last
            if i == 0:
                block = UpBlock(cin, cout, prev, temb, config, use_motion, add_upsample)
            else:
                block = CrossAttnUpBlock(cin, cout, prev, last - i, temb, config, use_motion, add_upsample)
            self.up_blocks.append(block)
        self.mid_block = MidBlock(channels[-1], temb, config)

        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

        # each image transformer reads the bank of the ReferenceNet block with the same name (Hallo pairs the
        # width-sorted block lists, which is this identity pairing for two SD1.5-layout UNets)
        for name, module in self.named_modules():
            if isinstance(module, ImageTransformer):
                module.bank_key = f"{name}.transformer_blocks.0"
        self.skipped_motion_modules_dropped = False

    def drop_skipped_motion_modules(self) -> None:
        """Free the motion modules of `DownBlock3D` / `UpBlock3D`, which Hallo's inference never runs (~180 M numbers
        at full size). Outputs are unchanged; the state dict then lacks their net.pth keys."""
        for block in (*self.down_blocks, *self.up_blocks):
            if isinstance(block, (DownBlock, UpBlock)) and len(block.motion_modules):
                block.motion_modules = nn.ModuleList()
                self.skipped_motion_modules_dropped = True

    def project_reference(self, banks: Mapping[str, torch.Tensor], halves: int, cache: ReferenceKVCache) -> None:
        """Fill `cache` with every reader block's reference keys / values for these banks (`halves` batch items),
        ahead of the steps: the steps then only read it (and a compiled UNet sees one cache state, one graph)."""
        dtype = self.conv_in.weight.dtype
        for module in self.modules():
            if isinstance(module, ImageTransformer):
                block, bank = module.transformer_blocks[0], banks[module.bank_key]
                cache.projected(module.bank_key, bank,
                                lambda: block.reference_keys_values(bank, halves, dtype))

    def reference_block_names(self) -> list[str]:
        return [m.bank_key for m in self.modules() if isinstance(m, ImageTransformer)]

    def forward(self, sample: torch.Tensor, timestep, face_tokens: torch.Tensor, audio_tokens: torch.Tensor,
                masks: Sequence[Sequence[torch.Tensor]], mask_cond_fea: Optional[torch.Tensor] = None,
                banks: Optional[Mapping[str, torch.Tensor]] = None, motion_scale: Sequence[float] = (1.0, 1.0, 1.0),
                uncond_plain: bool = False, motion_frames_branch: bool = True,
                checkpointing: Optional[str] = None, reference_kv: Optional[ReferenceKVCache] = None) -> torch.Tensor:
        """One denoising call.

        sample [b, 4, f, h, w] (scaled latents); timestep scalar; face_tokens [b, T, D]; audio_tokens [b, f, N, Da];
        masks (full, face, lip), each a list of 4 levels [(b f), h*w / 4**level] (largest first);
        mask_cond_fea [b, C0, f, h, w] (FaceLocator output, zeros for CFG's uncond half);
        banks: ReferenceNet `norm1` outputs by block name (see `reference.write_banks`);
        uncond_plain: the first half of the batch is CFG's unconditional half (plain self-attention there).
        motion_frames_branch: Hallo's training branch (inference's); False = its eval branch (see the module doc).
        checkpointing: None, "reentrant" (Hallo's: a segment whose explicit inputs need no gradient passes none on)
          or "non_reentrant" (every trainable weight used gets its gradient); applies only while autograd records.
        reference_kv: keeps the banks' reference keys / values from step to step (see `ReferenceKVCache`).
        Returns the model output [b, 4, f, h, w] (v-prediction for Hallo).
        """
        if checkpointing not in CHECKPOINTING_MODES:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING_MODES}, got {checkpointing!r}")
        if not motion_frames_branch and self.skipped_motion_modules_dropped:
            # the eval branch runs the motion modules of DownBlock3D / UpBlock3D: without them it would silently
            # compute something else
            raise ValueError("motion_frames_branch=False needs the motion modules that drop_skipped_motion_modules "
                             "freed; load the Net with load_hallo(..., inference_only=False)")
        b, _, frames, height, width = sample.shape
        dtype = self.conv_in.weight.dtype
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        t_emb = get_timestep_embedding(timesteps, self.config.block_out_channels[0],
                                       flip_sin_to_cos=self.config.flip_sin_to_cos,
                                       downscale_freq_shift=self.config.freq_shift)
        ctx = StepContext(
            temb=self.time_embedding(t_emb.to(dtype)), frames=frames,
            face_tokens=face_tokens.to(dtype).repeat_interleave(frames, dim=0),
            audio=audio_tokens.to(dtype).flatten(0, 1),
            masks=[[m.to(dtype) for m in region] for region in masks],
            motion_scale=motion_scale, banks=banks, uncond_plain=uncond_plain,
            motion_frames_branch=motion_frames_branch, checkpointing=checkpointing, reference_kv=reference_kv)

        x = self.conv_in(sample.to(dtype).transpose(1, 2).flatten(0, 1))
        if mask_cond_fea is not None:
            x = x + mask_cond_fea.to(dtype).transpose(1, 2).flatten(0, 1)

        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, ctx)
            skips += block_skips
        x = self.mid_block(x, ctx)
        for block in self.up_blocks:
            x = block(x, skips, ctx)

        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return x.unflatten(0, (b, frames)).transpose(1, 2)

"""The whole XTTS-v2 model in the checkpoint's module layout: `gpt`, `hifigan_decoder` and the `mel_stats` buffer."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import NarrateInputError
from .config import XttsConfig
from .gpt import XttsGPT
from .hifigan import HifiDecoder

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Kept in float32 at every precision. They run once per voice, so they cost nothing per code, and everything after
# them depends on what they compute: the log-mel front ends (log of small band energies divided by `mel_stats`,
# torchaudio's window and filterbank buffers), the speaker encoder (instance norm over log-mels, its embedding colours
# every vocoded sample) and the conditioning encoder + perceiver (GroupNorm and attention over the whole reference).
# What runs per code, the GPT and the HiFi-GAN waveform decoder, takes the requested precision.
FLOAT32_PARTS = ("gpt.conditioning_encoder", "gpt.conditioning_perceiver", "hifigan_decoder.speaker_encoder")
FLOAT32_BUFFERS = ("mel_stats",)


def check_precision(dtype: torch.dtype, device, input_name: str = "precision") -> None:
    """Refuse a precision the compute device cannot run well: fp16 needs CUDA (half kernels on the CPU are slow or
    missing; bf16 is the CPU's half precision), bf16 on CUDA needs a GPU that supports it (Ampere or newer)."""
    device = torch.device(device)
    if dtype == torch.float16 and device.type != "cuda":
        raise NarrateInputError(input_name, f"fp16 needs a CUDA GPU and the model computes on {device}; choose bf16 "
                                            "(half precision that CPUs run) or fp32 (exact)")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise NarrateInputError(input_name, f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support; "
                                            "choose fp16 or fp32")


class XttsModel(nn.Module):
    def __init__(self, cfg: XttsConfig):
        super().__init__()
        self.config = cfg
        self.gpt = XttsGPT(cfg)
        self.hifigan_decoder = HifiDecoder(cfg)
        # per-band divisor of the cloning mels (log domain); a buffer of the checkpoint, no separate file in v2
        self.register_buffer("mel_stats", torch.ones(cfg.cond_spec_dim))

    @classmethod
    def from_config(cls, cfg: XttsConfig, device="meta") -> "XttsModel":
        """Build the model; on the default meta device it takes no memory and waits for `load_state_dict(assign=True)`."""
        with torch.device(device):
            return cls(cfg)

    @property
    def dtype(self) -> torch.dtype:
        """The compute precision: the GPT's and the waveform decoder's (FLOAT32_PARTS stay float32)."""
        return self.hifigan_decoder.waveform_decoder.conv_pre.weight.dtype

    @torch.no_grad()
    def set_precision(self, dtype: torch.dtype) -> "XttsModel":
        """Cast the per-code parts to `dtype`, keeping FLOAT32_PARTS and FLOAT32_BUFFERS in float32 (never rounded:
        only the other tensors are cast). Integer buffers (BatchNorm counters) keep their type."""
        for name, module in self.named_modules():
            if name.startswith(FLOAT32_PARTS):
                continue
            for key, param in module.named_parameters(recurse=False):
                if param.is_floating_point():
                    param.data = param.data.to(dtype)
            for key, buf in module.named_buffers(recurse=False):
                if buf.is_floating_point() and (f"{name}.{key}" if name else key) not in FLOAT32_BUFFERS:
                    module._buffers[key] = buf.to(dtype)
        return self

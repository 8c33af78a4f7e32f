"""The whole XTTS-v2 model in the checkpoint's module layout: `gpt`, `hifigan_decoder` and the `mel_stats` buffer."""
from __future__ import annotations

import torch
from torch import nn

from .config import XttsConfig
from .gpt import XttsGPT
from .hifigan import HifiDecoder


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
        return self.hifigan_decoder.waveform_decoder.conv_pre.weight.dtype

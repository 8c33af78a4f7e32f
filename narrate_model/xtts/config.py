"""XTTS-v2 model configuration.

Field names follow upstream's `XttsArgs` (the `model_args` section of a coqui `config.json`) so a real config reads
straight in. Sizes that upstream hard-codes in its constructors (HiFi-GAN, speaker encoder, perceiver, conditioning
encoder) are fields too, with the v2 values as defaults, so reduced test models can be described as well; a JSON file
may give them in `model_args` or in the `hifigan_decoder` / `speaker_encoder` sections our fixtures use.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

LANGUAGES = ["en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn", "hu", "ko", "ja", "hi"]


def _speaker_audio_config() -> dict:
    return {"fft_size": 512, "win_length": 400, "hop_length": 160, "sample_rate": 16000, "preemphasis": 0.97,
            "num_mels": 64}


@dataclass
class XttsConfig:
    # --- GPT (upstream XttsArgs names) ---
    gpt_layers: int = 30
    gpt_n_model_channels: int = 1024
    gpt_n_heads: int = 16
    gpt_max_audio_tokens: int = 605
    gpt_max_text_tokens: int = 402
    gpt_max_prompt_tokens: int = 70
    gpt_number_text_tokens: int = 6681
    gpt_start_text_token: int = 261
    gpt_stop_text_token: int = 0
    gpt_num_audio_tokens: int = 1026
    gpt_start_audio_token: int = 1024
    gpt_stop_audio_token: int = 1025
    gpt_code_stride_len: int = 1024
    gpt_use_perceiver_resampler: bool = True
    gpt_use_masking_gt_prompt_approach: bool = True
    gpt_batch_size: int = 1
    kv_cache: bool = True
    # --- HiFi-GAN decoder (XttsArgs names, then HifiDecoder constructor names) ---
    input_sample_rate: int = 22050
    output_sample_rate: int = 24000
    output_hop_length: int = 256
    decoder_input_dim: int = 1024
    d_vector_dim: int = 512
    cond_d_vector_in_each_upsampling_layer: bool = True
    resblock_type_decoder: str = "1"
    resblock_dilation_sizes_decoder: list = field(default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]])
    resblock_kernel_sizes_decoder: list = field(default_factory=lambda: [3, 7, 11])
    upsample_rates_decoder: list = field(default_factory=lambda: [8, 8, 2, 2])
    upsample_initial_channel_decoder: int = 512
    upsample_kernel_sizes_decoder: list = field(default_factory=lambda: [16, 16, 4, 4])
    # --- speaker encoder (ResNetSpeakerEncoder constructor names, prefixed) ---
    speaker_encoder_input_dim: int = 64
    speaker_encoder_proj_dim: int = 512
    speaker_encoder_layers: list = field(default_factory=lambda: [3, 4, 6, 3])
    speaker_encoder_num_filters: list = field(default_factory=lambda: [32, 64, 128, 256])
    speaker_encoder_audio_config: dict = field(default_factory=_speaker_audio_config)
    # --- conditioning encoder + perceiver (fixed in upstream's GPT constructor) ---
    cond_spec_dim: int = 80
    cond_attn_blocks: int = 6
    perceiver_depth: int = 2
    perceiver_num_latents: int = 32
    perceiver_dim_head: int = 64
    perceiver_heads: int = 8
    perceiver_ff_mult: int = 4
    # --- top-level inference presets of config.json (used by `synthesize()` upstream) ---
    languages: list = field(default_factory=lambda: list(LANGUAGES))
    temperature: float = 0.75
    length_penalty: float = 1.0
    repetition_penalty: float = 5.0
    top_k: int = 50
    top_p: float = 0.85
    gpt_cond_len: int = 30
    gpt_cond_chunk_len: int = 4
    max_ref_len: int = 30
    sound_norm_refs: bool = False

    # --- derived sizes (as upstream's GPT computes them) ---
    @property
    def max_mel_tokens(self) -> int:
        """Rows of `mel_pos_embedding`: max audio tokens + start + stop + one conditioning input."""
        return self.gpt_max_audio_tokens + 3

    @property
    def max_text_tokens(self) -> int:
        """Rows of `text_pos_embedding`: max text tokens + start + stop."""
        return self.gpt_max_text_tokens + 2

    @property
    def max_gen_mel_tokens(self) -> int:
        return self.gpt_max_audio_tokens - 3

    @property
    def gpt_n_positions(self) -> int:
        return self.max_mel_tokens + self.max_text_tokens + self.gpt_max_prompt_tokens

    @property
    def cond_num_attn_heads(self) -> int:
        """Upstream builds the conditioning encoder with the GPT's head count."""
        return self.gpt_n_heads

    @property
    def perceiver_ff_inner(self) -> int:
        return int(self.gpt_n_model_channels * self.perceiver_ff_mult * 2 / 3)

    # --- constructors ---
    @classmethod
    def v2(cls) -> "XttsConfig":
        """The public coqui/XTTS-v2 configuration."""
        return cls()

    @classmethod
    def from_dict(cls, data: dict) -> "XttsConfig":
        """Read a coqui config dict (`model_args` + top-level presets) or our fixture layout; extra keys are ignored,
        `null` values keep the default (upstream fills e.g. the text start/stop ids from the vocabulary)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}

        def take(section: Optional[dict], prefix: str = "") -> None:
            for key, value in (section or {}).items():
                name = prefix + key
                if name in names and value is not None:
                    values[name] = value

        take({k: v for k, v in data.items() if not isinstance(v, dict)})
        take(data.get("model_args"))
        take(data.get("hifigan_decoder"))
        speaker = data.get("speaker_encoder")
        if isinstance(speaker, dict):
            take(speaker, "speaker_encoder_")
        return cls(**values)

    @classmethod
    def from_json(cls, path) -> "XttsConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

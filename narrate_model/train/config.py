"""The fine-tuning recipe: one dataclass whose defaults are NFY's (AdamW 1e-4, weight decay 1e-2, StepLR 1000 / 0.5,
batch 8, 10 epochs, ``L = L_video + 0.1 L_audio``), stored with every checkpoint so a resume can prove it continues the
same run. The command line builds its options from the fields (their ``help`` metadata), so a new field is one edit.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

MIXED_PRECISION = ("no", "bf16", "fp16")
# Fields a resume may change: they set how long the run goes on, not what one step does.
LENGTH_FIELDS = frozenset({"epochs", "max_steps"})


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    lr: float = _help("AdamW learning rate (NFY: 1e-4)", default=1e-4)
    weight_decay: float = _help("AdamW weight decay (NFY: 1e-2)", default=1e-2)
    lr_step: int = _help("StepLR step size, in optimiser steps (NFY: 1000)", default=1000)
    lr_gamma: float = _help("StepLR decay factor (NFY: 0.5)", default=0.5)
    batch_size: int = _help("samples per optimiser step over all processes (NFY: 8); reached by gradient "
                            "accumulation over micro-batches", default=8)
    micro_batch: int = _help("samples per forward pass on one process (lower it when memory is short)", default=1)
    epochs: int = _help("passes over the training samples (NFY: 10); ignored when max_steps is set", default=10)
    max_steps: int | None = _help("optimiser steps to run (overrides epochs)", default=None)
    loss_weights: dict = _help("weight of each loss term in the total, NAME=W (NFY: video 1.0, audio 0.1)",
                               default_factory=lambda: {"video": 1.0, "audio": 0.1})
    max_grad_norm: float | None = _help("clip the gradient norm to this (Hallo's stage 2: 1.0); none: no clipping",
                                        default=1.0)
    val_every: int = _help("validate on the held-out samples every N steps (0: only at the end)", default=500)
    save_every: int = _help("save a resumable checkpoint every N steps (0: only at the end)", default=500)
    keep_checkpoints: int = _help("how many of the newest checkpoints to keep", default=2)
    mixed_precision: str = _help("'no', 'bf16' or 'fp16' (autocast through accelerate; weights stay float32)",
                                 default="no")
    seed: int = _help("seed of the data order and of every random number generator", default=0)
    max_nan_steps: int = _help("stop after this many steps in a row with a non-finite loss or gradient", default=5)
    train_modules: tuple = _help("module name patterns (fnmatch, e.g. 'hallo.*audio_modules*') trained fully, "
                                 "besides the entangler", default=())
    lora_modules: tuple = _help("Linear / GPT-2 Conv1D layer name patterns trained as LoRA adapters", default=())
    lora_rank: int = _help("LoRA rank", default=8)
    lora_alpha: float = _help("LoRA alpha (the adapter's output is scaled by alpha / rank)", default=8.0)

    def __post_init__(self):
        self.train_modules, self.lora_modules = tuple(self.train_modules), tuple(self.lora_modules)
        self.loss_weights = {str(k): float(v) for k, v in self.loss_weights.items()}
        problems = [f"{name} must be >= {low}" for name, low in
                    (("lr_step", 1), ("batch_size", 1), ("micro_batch", 1), ("epochs", 1), ("max_nan_steps", 1),
                     ("val_every", 0), ("save_every", 0), ("keep_checkpoints", 1), ("lora_rank", 1))
                    if getattr(self, name) < low]
        if self.lr <= 0 or self.weight_decay < 0:
            problems.append("lr must be > 0 and weight_decay >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be >= 1")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if not self.loss_weights:
            problems.append("loss_weights needs at least one NAME=W")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown training config fields {unknown}; this run was made by another version")
        return cls(**data)

    def differences(self, other: "TrainConfig", ignore=LENGTH_FIELDS) -> list[str]:
        """Names (with both values) of the fields that differ, as 'lr: 0.0001 != 0.001'."""
        a, b = json.loads(json.dumps(self.to_dict())), json.loads(json.dumps(other.to_dict()))
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if k not in ignore and a[k] != b[k]]

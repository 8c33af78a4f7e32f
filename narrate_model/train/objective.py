"""The one place the training command finds NFY's objective: ``L = L_video + 0.1 L_audio`` over a prepared dataset.

The loop (loop.py) is generic: it needs ``objective(batch) -> {"total", "video", "audio", ...}``, the module holding
what trains, and the training / validation samples. NFY's objective is made of parts built separately: XTTS's audio
loss (``audio_loss.py``), Hallo's stage-2 video loss (``video_loss.py``) and the prepared-dataset reader
(``data.py``). Until all of them are in this build the training command refuses with ``ObjectiveUnavailable``
instead of training something else.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from torch import nn
from torch.utils.data import default_collate

from .config import TrainConfig

PARTS = {"audio_loss": "XTTS's audio loss (GPT cross-entropy + spectrogram MSE)",
         "video_loss": "Hallo's stage-2 video loss (v-prediction, min-SNR)",
         "data": "the prepared-dataset reader (python -m narrate_model prepare)"}


class ObjectiveUnavailable(RuntimeError):
    """This build cannot compute NFY's training objective."""


@dataclass
class TrainingSetup:
    """Everything ``loop.train`` needs besides the config and the run folder."""
    objective: Callable
    trainable: nn.Module               # the root module of every model; select_trainable chose what trains
    train_items: Sequence
    val_items: Sequence
    manifest_sha256: Optional[str] = None
    base_checkpoints: Mapping[str, str] = field(default_factory=dict)   # name -> SHA-256 of each base file
    collate: Callable = default_collate


def missing_parts() -> list[str]:
    return [name for name in PARTS if importlib.util.find_spec(f"{__package__}.{name}") is None]


def _require_parts() -> None:
    missing = missing_parts()
    if missing:
        raise ObjectiveUnavailable(
            "the NFY objective is not available in this build: it needs "
            + ", ".join(f"narrate_model/train/{m}.py ({PARTS[m]})" for m in missing)
            + ". Update the pack to a version that ships them.")


def build_objective(models: Mapping[str, nn.Module], config: TrainConfig) -> Callable:
    """NFY's objective over the loaded models: each batch's video and audio losses, weighted by
    ``config.loss_weights`` into ``total`` (``loop.weighted_total``)."""
    _require_parts()
    raise ObjectiveUnavailable("the loss modules are present but build_objective does not combine them in this "
                               "build yet")


def build_run(data_dir: Path, models_dir: Path, config: TrainConfig) -> TrainingSetup:
    """Load the prepared dataset and the base models, choose what trains (``trainable.select_trainable`` with
    ``config.train_modules`` / ``config.lora_modules``) and build the objective."""
    _require_parts()
    raise ObjectiveUnavailable("the loss modules are present but build_run does not load the dataset and models in "
                               "this build yet")

"""Personalise: fine-tune the entangler on one person's clip (frames + speech + transcript), the Personalize node's
library side. The clip becomes one sample through the same code as the dataset (``data.prepare_clip``), the run is
the ordinary loop (checkpoints, loss log, Cancel) with NFY's objective, and the result is an entangler file that Load
Entangler reads, written under a new name next to its model card.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..progress import ProgressFn
from .config import TrainConfig
from .data import PrepareModels, PrepareSettings, Skip, Transcript, prepare_clip
from .loop import CARD_FILE, ENTANGLER_FILE, TrainResult, train
from .objective import build_objective, make_entangler

PAPER_WEIGHTS = {"video": 1.0, "audio": 0.1}


def loss_weights() -> dict[str, float]:
    """NFY's weights: L = L_video + 0.1 L_audio."""
    return dict(PAPER_WEIGHTS)


def autograd_ready(*modules: Optional[nn.Module]) -> None:
    """Swap parameters and buffers made under ``torch.inference_mode`` (as ComfyUI loads models) for ordinary
    copies: autograd cannot save inference tensors for the backward pass even when they are frozen."""
    with torch.inference_mode(False):
        for root in filter(None, modules):
            for module in root.modules():
                for name, p in list(module._parameters.items()):
                    if p is not None and p.is_inference():
                        module._parameters[name] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                for name, b in list(module._buffers.items()):
                    if b is not None and b.is_inference():
                        module._buffers[name] = b.clone()


def next_free(folder: Union[str, Path], name: str, suffix: str = ".safetensors") -> Path:
    """``folder/name.safetensors``, or ``name_2``, ``name_3``... when taken: a personalisation never overwrites."""
    folder = Path(folder)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "personal"
    candidate, n = folder / f"{stem}{suffix}", 1
    while candidate.exists() or candidate.with_suffix(".card.json").exists():
        n += 1
        candidate = folder / f"{stem}_{n}{suffix}"
    return candidate


@dataclass
class Personalised:
    result: TrainResult
    entangler: Path       # the entangler file written (Load Entangler's format)
    card: Path            # its model card (JSON)
    sample_meta: dict


def personalize(models: PrepareModels, hallo: Optional[nn.Module], video: Union[str, Path], text: str,
                out_dir: Union[str, Path], name: str, run_dir: Union[str, Path],
                settings: PrepareSettings = PrepareSettings(), config: TrainConfig = TrainConfig(),
                entangler: Union[str, Path, nn.Module, None] = "ETE", progress: ProgressFn = None,
                should_stop: Optional[Callable[[], bool]] = None, video_config=None) -> Personalised:
    """Prepare `video` (its speech + frames, `text` its transcript) as one sample, train the entangler on it and write
    ``out_dir/<name>.safetensors`` (the next free name) and its card. Raises ``Skip`` when the clip cannot be a
    sample (no face, too short, ...)."""
    settings.check()
    tensors, meta = prepare_clip(Path(video), Transcript(" ".join(text.split()), None, "personalize"), models,
                                 settings)
    sample = {**tensors, "meta": {**meta, "id": name}}
    weights = dict(config.loss_weights)
    if "video" in weights and hallo is None:
        raise ValueError("the video term needs the Hallo Net")
    autograd_ready(models.xtts, hallo)
    parts = {"entangler": make_entangler(entangler, sample, config.seed), "xtts": models.xtts}
    if "video" in weights:
        parts["hallo"] = hallo
    kw = {"video_config": video_config} if "video" in weights else {}
    objective = build_objective(parts, config, **kw)
    result = train(config, objective, objective, [sample], [sample], run_dir, progress=progress,
                   should_stop=should_stop, collate=list,
                   base_checkpoints={k: v["sha256"] for k, v in models.checkpoints.items()})
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    target = next_free(out_dir, name)
    card = target.with_suffix(".card.json")
    shutil.copyfile(Path(run_dir) / CARD_FILE, card)
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(Path(run_dir) / ENTANGLER_FILE, tmp)
    os.replace(tmp, target)
    return Personalised(result, target, card, meta)


def frames_to_clip(frames: torch.Tensor, fps: float, waveform: torch.Tensor, rate: int) -> str:
    """IMAGE frames [N,H,W,3] + audio [C,T] -> a temporary .mp4 (lossless-quality crf 1) for ``prepare_clip``,
    which reads clips through PyAV; the caller deletes it."""
    from ..av import write_mp4

    handle, path = tempfile.mkstemp(suffix=".mp4", prefix="nfy-personalize-")
    os.close(handle)
    os.unlink(path)  # a unique name; the writer itself never replaces an existing file
    even = frames[:, :frames.shape[1] // 2 * 2, :frames.shape[2] // 2 * 2]  # yuv420p needs even sides
    write_mp4(path, even, fps, waveform, rate, crf=1)
    return path


__all__ = ["personalize", "Personalised", "next_free", "autograd_ready", "frames_to_clip", "loss_weights", "Skip"]

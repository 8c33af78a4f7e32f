"""Resumable checkpoints of a training run, written atomically.

A checkpoint is a folder ``RUN/checkpoints/step-NNNNNNN`` holding everything a resume needs to continue the run as if
it had never stopped: the trained parameters (safetensors, only what trains: never a base model), the optimiser, the
LR scheduler and grad scaler (``optimizer.pt``, read with ``weights_only=True``), the random number generators of
every process (``rng.pt``) and the run's position (``state.json``: config, step, samples consumed from the seeded data
stream). It is written into a hidden staging folder and renamed into place only when every file is on disk, so a
crash or a full disk never leaves a half-written checkpoint where a resume would find it.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import TrainConfig

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the previous one is intact."""


@dataclass
class RunState:
    """Where the run stands after ``step`` optimiser steps (skipped non-finite steps included)."""
    step: int = 0
    position: int = 0        # samples consumed from the data stream (epoch = position // samples)
    nan_streak: int = 0      # consecutive skipped steps so far
    elapsed_s: float = 0.0   # training wall time over all sessions of the run
    num_processes: int = 1
    num_samples: int = 0     # training samples (the data stream is built over them)
    manifest_sha256: str | None = None


@dataclass
class Checkpoint:
    path: Path
    config: TrainConfig
    state: RunState
    params: dict             # name -> tensor (the trained parameters)
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: list                # one generator state per process, in process order


def capture_rng() -> dict:
    """Every generator a training step may draw from: Python's, NumPy's global one, torch's CPU and CUDA ones."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_file(path: Path, write: Callable[[Path], Any]) -> None:
    """Write one file and flush it to disk (the single place file contents are written, so tests can fail it)."""
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _staging_dir(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}-{os.getpid()}"


def _commit(staging: Path, final: Path) -> None:
    """Put a complete staging folder in place (one rename; a re-save of the same step replaces the old one)."""
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (staging folders are hidden and never listed)."""
    root = Path(run_dir) / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))] if root.is_dir() else []
    return [p for _, p in sorted(found)]


def latest(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save(run_dir: Path, config: TrainConfig, state: RunState, params: dict, optimizer: dict, scheduler: dict,
         scaler: dict | None, rng: list, keep: int) -> Path:
    """Write a checkpoint atomically and drop the oldest beyond ``keep``; on failure the run folder is unchanged."""
    final = Path(run_dir) / CHECKPOINTS / f"step-{state.step:07d}"
    staging = _staging_dir(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(".tmp-step-*"):  # left by a run that was killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir()
        tensors = {k: v.detach().contiguous().cpu() for k, v in params.items()}
        _write_file(staging / "trainable.safetensors", lambda p: save_file(tensors, str(p)))
        _write_file(staging / "optimizer.pt", lambda p: torch.save(
            {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}, p))
        _write_file(staging / "rng.pt", lambda p: torch.save(rng, p))
        meta = {"config": config.to_dict(), "state": state.__dict__}
        _write_file(staging / "state.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
        _commit(staging, final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        previous = latest(run_dir)
        hint = " (the disk is full: free space)" if exc.errno == errno.ENOSPC else ""
        raise CheckpointSaveError(
            exc.errno, f"could not save the checkpoint of step {state.step} in {final.parent}: {exc}{hint}; "
            + (f"the previous checkpoint {previous.name} is intact and `train --resume {run_dir}` continues from it"
               if previous else "no earlier checkpoint exists")) from exc
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(path: Path) -> tuple[TrainConfig, RunState]:
    meta = json.loads((Path(path) / "state.json").read_text())
    return TrainConfig.from_dict(meta["config"]), RunState(**meta["state"])


def load(path: Path) -> Checkpoint:
    path = Path(path)
    config, state = read_meta(path)
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    return Checkpoint(path, config, state, load_file(str(path / "trainable.safetensors")), opt["optimizer"],
                      opt["scheduler"], opt["scaler"], torch.load(path / "rng.pt", weights_only=True))

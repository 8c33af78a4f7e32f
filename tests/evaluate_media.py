"""Shared helpers of the evaluation tests: the shared media's audio and frames decoded with PyAV (cached), white
noise at a given SNR, and a missing test package fails the run (tests/install.sh installs them)."""
from __future__ import annotations

import functools
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"


def need(module: str):
    """Import an optional package the tests need; its absence is a failure, not a skip."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is missing: tests/requirements-test.txt installs it (run tests/install.sh)")


@functools.lru_cache(maxsize=8)
def media_audio(name: str) -> tuple[np.ndarray, int]:
    """Mono float64 audio of videos/<name>.mp4 at its own rate (44.1 kHz AAC)."""
    import av

    with av.open(str(MEDIA / "videos" / f"{name}.mp4")) as container:
        stream = container.streams.audio[0]
        chunks = [frame.to_ndarray() for frame in container.decode(stream)]
        rate = stream.rate
    wav = np.concatenate(chunks, axis=1).astype(np.float64)
    return wav.mean(0), rate


@functools.lru_cache(maxsize=8)
def media_frames(name: str, size: int = 160) -> tuple[torch.Tensor, float]:
    """IMAGE frames [N, size, size, 3] 0..1 of videos/<name>.mp4 and its fps."""
    import av

    with av.open(str(MEDIA / "videos" / f"{name}.mp4")) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24", width=size, height=size))
                  for f in container.decode(stream)]
    return torch.stack(frames).float().div(255), fps


def with_noise(wav: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """`wav` plus white Gaussian noise `snr_db` below its power."""
    noise = np.random.default_rng(seed).standard_normal(len(wav))
    scale = np.sqrt(np.mean(wav ** 2) / np.mean(noise ** 2) / 10 ** (snr_db / 10))
    return wav + scale * noise

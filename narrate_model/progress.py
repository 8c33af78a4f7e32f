"""The progress protocol between the library and its callers.

Long loops in the library take an optional ``progress(done, total)`` callable and call it after each unit of work
(a diffusion step, a block of GPT tokens, a clip, a chunk of frames). The node layer passes one that advances
ComfyUI's progress bar and raises when the user pressed Cancel, so cancelling needs nothing else from the library.

A single forward pass of a big network can itself take seconds (a vocoder over a long chunk, wav2vec2 over minutes
of speech, a denoising step at 512x512). `checked` makes such a pass call back before each of its submodules with
the same (done, total) again: that moves nothing on the bar, but gives Cancel a chance every few milliseconds.
Callers may therefore call `progress` often; the node layer only redraws the bar when the numbers change.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional

import torch

ProgressFn = Optional[Callable[[int, int], None]]


def report(progress: ProgressFn, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


@contextlib.contextmanager
def checked(models: torch.nn.Module | Iterable[torch.nn.Module], progress: ProgressFn, done: int = 0,
            total: int = 1) -> Iterator[ProgressFn]:
    """While the block runs, every submodule of `models` re-reports the last position before it runs, so Cancel is
    checked all through one long forward pass. Yields the callback to hand to the code inside, whose own reports
    move that position (it starts at `done` of `total`). Nothing is hooked without a progress callback."""
    if progress is None:
        yield None
        return
    position = [done, total]

    def tracked(done_now: int, total_now: int) -> None:
        position[:] = done_now, total_now
        progress(done_now, total_now)

    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    hooks = [m.register_forward_pre_hook(lambda *_: progress(*position)) for model in models
             for m in model.modules()]
    try:
        yield tracked
    finally:
        for hook in hooks:
            hook.remove()

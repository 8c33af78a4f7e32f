"""The progress protocol between the library and its callers.

Long loops in the library take an optional ``progress(done, total)`` callable and call it after each unit of work
(a diffusion step, a block of GPT tokens, a clip, a chunk of frames). The node layer passes one that advances
ComfyUI's progress bar and raises when the user pressed Cancel, so cancelling needs nothing else from the library.
"""
from typing import Callable, Optional

ProgressFn = Optional[Callable[[int, int], None]]


def report(progress: ProgressFn, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)

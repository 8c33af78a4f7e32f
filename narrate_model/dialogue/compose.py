"""How the speakers share the picture.

cut: the active speaker full frame, cutting where the next turn starts (only that speaker is generated).
side_by_side: one square panel per speaker in a row; grid: the panels in rows of ceil(sqrt(n)). In both every
face is always visible, each in its own fixed panel, and a thin border marks the speaker whose words are heard."""
from __future__ import annotations

import math

import torch

from ..errors import NarrateInputError

LAYOUTS = ("cut", "side_by_side", "grid")
HIGHLIGHT = (1.0, 0.78, 0.15)  # amber: visible on skin, hair and dark backgrounds alike


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise NarrateInputError("layout", f"{layout!r} is not one of {', '.join(LAYOUTS)}")


def columns(layout: str, speakers: int) -> int:
    return {"cut": 1, "side_by_side": speakers, "grid": math.ceil(math.sqrt(speakers))}[layout]


def panel_origins(layout: str, speakers: int, size: int) -> list[tuple[int, int]]:
    """(top, left) pixel of each speaker's panel (cut: everyone at the origin, one at a time)."""
    if layout == "cut":
        return [(0, 0)] * speakers
    cols = columns(layout, speakers)
    return [(i // cols * size, i % cols * size) for i in range(speakers)]


def canvas_size(layout: str, speakers: int, size: int) -> tuple[int, int]:
    """(height, width) of the video."""
    if layout == "cut":
        return size, size
    cols = columns(layout, speakers)
    return math.ceil(speakers / cols) * size, cols * size


def border_width(size: int) -> int:
    return max(2, size // 64)


def compose(layout: str, panels: list[torch.Tensor], size: int, active: list[int | None]) -> torch.Tensor:
    """The panels' frames (IMAGE [f, size, size, 3] per speaker, same f) on one canvas [f, H, W, 3], the panel of
    the speaker active in each frame framed by the highlight."""
    height, width = canvas_size(layout, len(panels), size)
    frames = panels[0].shape[0]
    canvas = torch.zeros(frames, height, width, 3, dtype=panels[0].dtype)
    origins = panel_origins(layout, len(panels), size)
    for (top, left), panel in zip(origins, panels):
        canvas[:, top:top + size, left:left + size] = panel
    b, colour = border_width(size), torch.tensor(HIGHLIGHT, dtype=canvas.dtype)
    for f, speaker in enumerate(active):
        if speaker is None:
            continue
        top, left = origins[speaker]
        box = canvas[f, top:top + size, left:left + size]
        box[:b], box[-b:], box[:, :b], box[:, -b:] = colour, colour, colour, colour
    return canvas

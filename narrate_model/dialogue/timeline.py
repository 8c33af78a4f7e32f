"""The dialogue's sound track: spoken turns placed one after another with the gap between them (and the script's
pauses), the per-speaker stems, the SRT cues and the frame ranges each turn owns on screen.

The cue times come from the audio itself: a turn's cue runs from its first to its last audible sample (XTTS may
leave a little silence at either end of a turn), so the subtitles appear when the voice does."""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from .. import av
from .script import Item, Pause, Turn

AUDIBLE = 0.02  # a sample counts as speech above this share of the turn's peak


@dataclass(frozen=True)
class Placed:
    """One spoken turn on the track."""
    speaker: int  # index into the cast
    text: str
    start: int  # first sample of the turn's audio on the track
    length: int  # samples
    cue_start: Fraction  # seconds, exactly: the first audible sample
    cue_end: Fraction  # seconds, exactly: one past the last audible sample


@dataclass(frozen=True)
class Timeline:
    turns: list[Placed]
    samples: int  # length of the track
    sample_rate: int

    def frames(self, fps) -> int:
        return av.frame_count(self.samples, self.sample_rate, fps)

    def segments(self, fps) -> list[tuple[int, int, int]]:
        """(turn index, first frame, end frame) of the picture each turn owns: from the frame its audio starts in
        to the next turn's; the first turn also owns any pause before it, the last one the end of the video."""
        fps = av.exact_fps(fps)
        starts = [0] + [math.floor(Fraction(t.start, self.sample_rate) * fps) for t in self.turns[1:]]
        ends = starts[1:] + [self.frames(fps)]
        return [(i, a, b) for i, (a, b) in enumerate(zip(starts, ends)) if b > a]

    def active_at(self, frame: int, fps) -> int | None:
        """The speaker whose cue covers this frame's start (None between cues: nobody is highlighted)."""
        t = frame / Fraction(fps)
        for turn in self.turns:
            if turn.cue_start <= t < turn.cue_end:
                return turn.speaker
        return None


def audible_span(speech: torch.Tensor) -> tuple[int, int]:
    """(first, one past the last) sample above AUDIBLE x peak of a 1-D waveform; the whole of it if silent."""
    loud = (speech.abs() > AUDIBLE * speech.abs().max()).nonzero()
    if loud.numel() == 0:
        return 0, speech.numel()
    return int(loud[0]), int(loud[-1]) + 1


def place(items: list[Item], speakers: list[int], lengths: list[int], spans: list[tuple[int, int]],
          sample_rate: int, gap: float) -> Timeline:
    """Turns (in script order; `speakers`, `lengths` and audible `spans` per turn) one after another, `gap`
    seconds apart, each pause adding its silence."""
    gap_samples, at, placed, turn_index = round(gap * sample_rate), 0, [], 0
    for item in items:
        if isinstance(item, Pause):
            at += round(item.seconds * sample_rate)
            continue
        assert isinstance(item, Turn)
        if turn_index:
            at += gap_samples
        first, last = spans[turn_index]
        placed.append(Placed(speakers[turn_index], item.text, at, lengths[turn_index],
                             Fraction(at + first, sample_rate), Fraction(at + last, sample_rate)))
        at += lengths[turn_index]
        turn_index += 1
    return Timeline(placed, at, sample_rate)


def mix(timeline: Timeline, speeches: list[torch.Tensor], speakers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The track [1, T] and the stems [speakers, T]: each turn's speech at its place, silence elsewhere."""
    stems = torch.zeros(speakers, timeline.samples)
    for turn, speech in zip(timeline.turns, speeches):
        stems[turn.speaker, turn.start:turn.start + turn.length] = speech
    return stems.sum(0, keepdim=True), stems


def _stamp(seconds: Fraction) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02}:{ms // 60_000 % 60:02}:{ms // 1000 % 60:02},{ms % 1000:03}"


def srt(timeline: Timeline, names: list[str]) -> str:
    """SubRip subtitles: one cue per turn, '<name>: <text>', timed by the turn's audible speech."""
    cues = [f"{i}\n{_stamp(t.cue_start)} --> {_stamp(t.cue_end)}\n{names[t.speaker]}: {t.text}\n"
            for i, t in enumerate(timeline.turns, start=1)]
    return "\n".join(cues)

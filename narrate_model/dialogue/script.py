"""The dialogue script: one turn per line, `NAME: text`.

Blank lines are ignored, `[pause 1.5]` on a line of its own inserts 1.5 s of silence, and a line without a name
continues the previous speaker (it joins the turn above; after a pause it starts a new turn of the same speaker).
Errors name the line, counted from 1 as editors do."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from ..errors import NarrateInputError

MAX_PAUSE_S = 60.0
MAX_SPEAKERS = 6
# A name is what precedes the first colon, when it starts with a letter and is at most 40 characters without
# brackets: "ALICE: hi", "Dr. Lee: hi". "10:30 is late" has no name (it does not start with a letter).
NAMED = re.compile(r"^\s*([^\W\d_][^:\[\]]{0,39}?)\s*:(.*)$")
PAUSE = re.compile(r"^\s*\[\s*pause\b(.*)\]\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Turn:
    speaker: str  # as written in the script
    text: str
    line: int  # the script line the turn starts on


@dataclass(frozen=True)
class Pause:
    seconds: float
    line: int


Item = Union[Turn, Pause]


def _error(line: int, message: str) -> NarrateInputError:
    return NarrateInputError("script", f"line {line}: {message}")


def _pause(match: re.Match, line: int) -> Pause:
    value = match.group(1).strip().removesuffix("s").strip()
    try:
        seconds = float(value)
    except ValueError:
        raise _error(line, f"[pause {match.group(1).strip()}] needs a number of seconds, e.g. [pause 1.5]") from None
    if not 0 < seconds <= MAX_PAUSE_S:
        raise _error(line, f"a pause of {seconds:g} s is outside 0 < seconds <= {MAX_PAUSE_S:g}")
    return Pause(seconds, line)


def parse_script(text: str) -> list[Item]:
    """The script's turns and pauses in order. Raises NarrateInputError naming the line of the first problem."""
    items: list[Item] = []
    speaker = None
    for number, raw in enumerate((text or "").splitlines(), start=1):
        if not raw.strip():
            continue
        pause = PAUSE.match(raw)
        if pause:
            items.append(_pause(pause, number))
            continue
        if raw.lstrip().startswith("["):
            raise _error(number, f"unknown direction {raw.strip()!r}; the only one is [pause SECONDS]")
        named = NAMED.match(raw)
        if named:
            speaker, words = named.group(1).strip(), named.group(2).strip()
            if not words:
                raise _error(number, f"{speaker} has nothing to say; write 'NAME: text'")
            items.append(Turn(speaker, words, number))
        elif speaker is None:
            raise _error(number, "no speaker named yet; start the script with 'NAME: text'")
        elif items and isinstance(items[-1], Turn):  # continues the turn above
            last = items[-1]
            items[-1] = Turn(last.speaker, f"{last.text} {raw.strip()}", last.line)
        else:  # after a pause: the same speaker again
            items.append(Turn(speaker, raw.strip(), number))
    if not any(isinstance(item, Turn) for item in items):
        raise NarrateInputError("script", "the script has no lines to speak; write one turn per line, e.g. "
                                          "'ALICE: Hello!' then 'BOB: Hi, Alice.'")
    return items

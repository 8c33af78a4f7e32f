"""The dialogue's script, timeline, subtitles and layouts, without models: what a user types and what comes out."""
from fractions import Fraction

import pytest
import srt
import torch

from narrate_model.dialogue import compose
from narrate_model.dialogue.run import Speaker, cast_of
from narrate_model.dialogue.script import Pause, Turn, parse_script
from narrate_model.dialogue.timeline import audible_span, mix, place
from narrate_model.dialogue import timeline as timeline_module
from narrate_model.errors import NarrateInputError


def test_script_turns_pauses_blank_lines_and_continuations():
    items = parse_script("ALICE: Hello there.\n\n   \nthis continues Alice.\nDr. Bob Lee: Hi: fine.\n[pause 1.5]\n"
                         "and Bob again after the pause\n[ Pause 2s ]\nalice: Bye.")
    assert items == [Turn("ALICE", "Hello there. this continues Alice.", 1), Turn("Dr. Bob Lee", "Hi: fine.", 5),
                     Pause(1.5, 6), Turn("Dr. Bob Lee", "and Bob again after the pause", 7), Pause(2.0, 8),
                     Turn("alice", "Bye.", 9)]


@pytest.mark.parametrize("script, line, words", [
    ("", None, "no lines to speak"), ("\n\n[pause 1]\n", None, "no lines to speak"),
    ("no name here", 1, "no speaker named yet"), ("\nA: hi\n[pause x]", 3, "needs a number of seconds"),
    ("A: hi\n[pause 0]", 2, "outside"), ("A: hi\n\nB:   ", 3, "nothing to say"),
    ("A: hi\n[laugh]", 2, "unknown direction")])
def test_script_errors_name_the_line(script, line, words):
    with pytest.raises(NarrateInputError) as error:
        parse_script(script)
    assert error.value.input_name == "script" and words in str(error.value)
    if line is not None:
        assert f"line {line}:" in str(error.value)


def speaker(name: str) -> Speaker:
    return Speaker(name, face=None, voice=None)


def test_cast_binds_names_case_blind_and_rejects_bad_casts():
    turns = [t for t in parse_script("ann: a\nBOB: b\nAnn: c") if isinstance(t, Turn)]
    assert cast_of([speaker("Ann"), speaker("Bob")], turns) == [0, 1, 0]
    with pytest.raises(NarrateInputError, match=r"line 2: no speaker named 'BOB'; the speakers are Ann, Cy"):
        cast_of([speaker("Ann"), speaker("Cy")], turns)
    with pytest.raises(NarrateInputError, match="two speakers are named 'ann'"):
        cast_of([speaker("Ann"), speaker("Bob"), speaker("ann")], turns)
    with pytest.raises(NarrateInputError, match="7 speakers given; a dialogue has at most 6"):
        cast_of([speaker(f"S{i}") for i in range(7)], turns)
    with pytest.raises(NarrateInputError, match="no speaker is connected"):
        cast_of([], turns)


def test_timeline_places_turns_with_gaps_and_pauses_and_times_cues_by_the_audio():
    rate = 1000
    items = parse_script("A: one\nB: two\n[pause 0.5]\nA: three")
    speeches = [torch.cat([torch.zeros(100), torch.ones(300), torch.zeros(50)]), torch.ones(200),
                torch.ones(100)]
    spans = [audible_span(s) for s in speeches]
    assert spans[0] == (100, 400)
    line = place(items, [0, 1, 0], [s.numel() for s in speeches], spans, rate, gap=0.25)
    assert [t.start for t in line.turns] == [0, 700, 1650] and line.samples == 1750
    assert [(float(t.cue_start), float(t.cue_end)) for t in line.turns] == [(0.1, 0.4), (0.7, 0.9), (1.65, 1.75)]
    track, stems = mix(line, speeches, 2)
    assert track.shape == (1, 1750) and torch.equal(stems.sum(0), track[0])
    assert stems[1, 700:900].eq(1).all() and stems[1, :700].eq(0).all() and stems[0, 700:900].eq(0).all()
    fps = Fraction(10)
    assert line.frames(fps) == 18
    assert line.segments(fps) == [(0, 0, 7), (1, 7, 16), (2, 16, 18)]  # each turn owns its frames up to the next
    assert [line.active_at(f, fps) for f in (0, 1, 3, 4, 7, 9, 12, 17)] == [None, 0, 0, None, 1, None, None, 0]
    subtitles = list(srt.parse(timeline_module.srt(line, ["Ann", "Bob"])))  # a standard parser reads it
    assert [(s.start.total_seconds(), s.end.total_seconds(), s.content) for s in subtitles] == [
        (0.1, 0.4, "Ann: one"), (0.7, 0.9, "Bob: two"), (1.65, 1.75, "Ann: three")]


def test_layouts_place_every_panel_and_frame_the_active_speaker():
    size = 64
    assert compose.canvas_size("side_by_side", 3, size) == (64, 192)
    assert compose.canvas_size("grid", 3, size) == (128, 128) and compose.canvas_size("grid", 5, size) == (128, 192)
    assert compose.canvas_size("cut", 3, size) == (64, 64)
    panels = [torch.full((2, size, size, 3), v / 10) for v in (1, 2, 3)]
    canvas = compose.compose("grid", panels, size, [1, None])
    b = compose.border_width(size)
    for (top, left), value in zip(compose.panel_origins("grid", 3, size), (0.1, 0.2, 0.3)):
        inner = canvas[:, top + b:top + size - b, left + b:left + size - b]
        assert torch.allclose(inner, torch.tensor(value)), (top, left)
    assert canvas[:, 64:, 64:].eq(0).all()  # the grid's empty cell stays black
    highlight = torch.tensor(compose.HIGHLIGHT)
    assert torch.allclose(canvas[0, 0, 64:128], highlight) and torch.allclose(canvas[0, 0, 0:64], torch.tensor(0.1))
    assert torch.allclose(canvas[1, 0, 64:128], torch.tensor(0.2))  # nobody speaks in frame 1: no border
    with pytest.raises(NarrateInputError, match="'mosaic' is not one of cut, side_by_side, grid"):
        compose.check_layout("mosaic")

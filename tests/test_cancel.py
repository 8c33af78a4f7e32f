"""Cancel stops the whole narration within a second: every long loop and every long forward pass of the library calls
its progress callback often, and the node layer's callback is where ComfyUI's Cancel is checked.

Here the library alone: the CPU time between two consecutive progress calls (and before the first, after the
last) bounds how long a Cancel can wait. CPU time, not wall time, so the measure does not depend on how busy the
machine is; torch runs on one thread so that CPU time is the work itself. The end-to-end bound (interrupt -> idle on
a real server, at several points of every shipped workflow) is in test_server_cancel.py.
"""
import contextlib
import time
from fractions import Fraction

import pytest
import torch

from narrate_model import pipeline
from narrate_model.hallo.face import encode_face
from narrate_model.hallo.sampler import SamplerSettings
from narrate_model.xtts import speech
from narrate_model.xtts.sampling import SamplingParams
from narrate_model.xtts.text import tokenize
from narrate_model.xtts.voice import encode_voice
from conftest import heap_frozen
from small_checkpoints import small_narration_models
from test_pipeline import portrait, voice_clip

# On the small models a check comes every few milliseconds of CPU; 0.25 s leaves room for the few steps that are one
# call (the landmarker, one wav2vec2 or UNet op) and is 4x under the 1 s promise.
MAX_CPU_GAP_S = 0.25

SETTINGS = pipeline.NarrationSettings(fps=Fraction(25), size=64, speech=SamplingParams(seed=3, max_new_tokens=40),
                                      video=SamplerSettings(steps=1, cfg=3.5, seed=3))


@pytest.fixture(scope="module")
def models():
    models = small_narration_models()
    # MediaPipe builds its graph on the first detection in a process (about 1 s of CPU in one native call, which
    # nothing can interrupt): that happens once per ComfyUI session, not per narration, so it is left out here.
    encode_face(portrait(), models.landmarker)
    return models


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def longest_gap(run) -> tuple[float, str]:
    """The longest CPU time without a progress call while `run(progress)` runs, and between which calls."""
    marks = [(time.process_time(), "start")]

    def progress(done, total):
        marks.append((time.process_time(), f"{done}/{total}"))

    with torch.inference_mode(), heap_frozen():
        marks[0] = (time.process_time(), "start")  # after the collection heap_frozen makes
        run(progress)
    marks.append((time.process_time(), "end"))
    return max((b[0] - a[0], f"{a[1]} -> {b[1]}") for a, b in zip(marks, marks[1:]))


def test_the_whole_narration_calls_progress_at_least_every_quarter_second_of_cpu(models, tmp_path, one_thread):
    gap, where = longest_gap(lambda progress: pipeline.narrate_to_mp4(
        models, portrait(), [voice_clip()], "Hello there. How are you today?", str(tmp_path / "n.mp4"), SETTINGS,
        progress))
    print(f"narration: longest CPU gap {gap:.3f} s ({where})")
    assert gap <= MAX_CPU_GAP_S, f"{gap:.2f} s of CPU without a progress call ({where})"


def costlier(forward, cpu_seconds: float):
    """`forward` plus a busy wait of `cpu_seconds` of CPU time."""
    def slow(*args, **kwargs):
        end = time.process_time() + cpu_seconds
        while time.process_time() < end:
            pass
        return forward(*args, **kwargs)
    return slow


def test_a_long_vocoder_pass_is_checked_inside_and_fails_the_bound_without(models, one_thread, monkeypatch):
    """The control: the speech stage with a long chunk (100 codes) passes the bound only with the checks inside the
    vocoder's forward pass; the library as it was (one report per chunk) fails it. On the small models a whole
    vocoder pass is itself short on a fast CPU (0.12 s here), so every vocoder layer is made to cost 5 ms more CPU in
    both runs: a real-size HiFi-GAN pass, without depending on the machine's speed."""
    with torch.inference_mode():
        voice = encode_voice(models.xtts, [voice_clip()])
        tokens = tokenize(models.tokenizer, "Hello there, how are you today?", "en")
    params = SamplingParams(seed=3, max_new_tokens=100)
    for layer in models.xtts.hifigan_decoder.modules():
        if not list(layer.children()):
            monkeypatch.setattr(layer, "forward", costlier(layer.forward, 0.005))
    gap, where = longest_gap(lambda progress: pipeline.speak(models.xtts, tokens, voice, params, progress))

    @contextlib.contextmanager
    def no_hooks(_models, progress, done=0, total=1):
        yield progress

    monkeypatch.setattr(speech, "checked", no_hooks)
    old_gap, old_where = longest_gap(lambda progress: pipeline.speak(models.xtts, tokens, voice, params, progress))
    print(f"speech: longest CPU gap {gap:.3f} s ({where}); unchecked {old_gap:.3f} s ({old_where})")
    assert gap <= MAX_CPU_GAP_S, f"{gap:.2f} s of CPU without a progress call ({where})"
    assert old_gap > MAX_CPU_GAP_S, f"the unchecked variant passed too ({old_gap:.2f} s, {old_where})"

"""The shipped workflows on the real server, with small checkpoints: every UI workflow converts (comfy-cli's
converter against the live /object_info) to exactly its API twin, and runs; each .mp4 has one h264 and one aac
stream with frames = ceil(audio seconds x fps); changing only the text or the seed re-uses the cached encodings."""
import copy
import io
import json
import math

import av
import pytest

from comfy_server import messages_of
from workflow_tools import WORKFLOWS, api_workflows

FPS = 25
NAMES = ["narrate", "narrate_simple", "speech_only", "animate_from_audio"]


SMALL_SETTINGS = {"size": 64, "steps": 1, "max_codes": 20}


def shrink(prompt: dict, small: dict) -> dict:
    """The same graph on the small checkpoints and uploaded media, at a size and length a CPU test affords."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        for key, value in inputs.items():
            if isinstance(value, str) and value in small:
                inputs[key] = small[value]
        inputs.update({k: v for k, v in SMALL_SETTINGS.items() if k in inputs})
    return prompt


def converted(comfy, name: str) -> dict:
    from comfy_cli.workflow_to_api import convert_ui_to_api

    return convert_ui_to_api(json.loads((WORKFLOWS / f"{name}_ui.json").read_text()), comfy.object_info())


def strip_meta(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def check_mp4(data: bytes) -> None:
    with av.open(io.BytesIO(data)) as c:
        assert [s.codec_context.name for s in c.streams.video] == ["h264"]
        assert [s.codec_context.name for s in c.streams.audio] == ["aac"]
        video, audio = c.streams.video[0], c.streams.audio[0]
        frames = sum(1 for _ in c.decode(video=0))
        audio_s = float(audio.duration * audio.time_base)
    assert frames == math.ceil(round(audio_s * FPS, 6))
    assert abs(float(video.duration * video.time_base) - audio_s) <= 1 / FPS


def test_the_four_workflows_are_shipped_in_both_formats():
    assert sorted(api_workflows()) == sorted(NAMES)
    assert sorted(p.name for p in WORKFLOWS.glob("*_ui.json")) == sorted(f"{n}_ui.json" for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_converts_to_its_api_twin_and_runs(comfy, small_models, name):
    prompt = converted(comfy, name)
    assert strip_meta(prompt) == strip_meta(api_workflows()[name])
    entry = comfy.run(shrink(prompt, small_models), timeout=900)
    mp4s = [item for out in entry["outputs"].values() for item in out.get("images", [])
            if item["filename"].endswith(".mp4")]
    audios = [item for out in entry["outputs"].values() for item in out.get("audio", [])]
    if name == "speech_only":
        assert audios and not mp4s
    else:
        assert len(mp4s) == 1
        check_mp4(comfy.view(mp4s[0]))


def test_changing_only_the_text_or_the_seed_reuses_the_cached_voice_and_face(comfy, small_models):
    prompt = shrink(api_workflows()["narrate"], small_models)
    comfy.run(prompt, timeout=900)
    for change in ({"text": "A completely different sentence to say."}, {"seed": 7}):
        for node in prompt.values():
            node["inputs"].update({k: v for k, v in change.items() if k in node["inputs"]})
        entry = comfy.run(prompt, timeout=900)
        cached = {n for m in messages_of(entry, "execution_cached") for n in m["nodes"]}
        assert {"9", "10"} <= cached, change  # Voice Profile Encode, Face Encode
        assert "16" not in cached, change  # the video was made again

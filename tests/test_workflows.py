"""The shipped workflows on the real server, with small checkpoints: every UI template converts (comfy-cli's
converter against the live /object_info) to exactly its API twin, and runs; each .mp4 has one h264 and one aac
stream, as many frames as the speech the graph made needs (ceil(seconds x fps)), and that speech whole in its sound
track; changing only the text or the seed re-uses the cached encodings. The templates as ComfyUI lists them: one
per UI workflow, each with its thumbnail, only shipped example inputs, and the frontend's model metadata."""
import copy
import io
import json
import math
import urllib.parse

import av
import numpy as np
import pytest

from comfy_server import PACK_NAME, messages_of
from workflow_tools import EXAMPLE_INPUTS, MODEL_DIRECTORIES, TEMPLATES, WORKFLOWS, api_workflows, ui_path

FPS = 25
RUN_NAMES = ["narrate", "narrate_simple", "speech_only", "animate_from_audio"]
NAMES = [*RUN_NAMES, "personalize_narrate", "dialogue"]  # run in test_server_train.py (training is slow here)
# and test_dialogue_server.py


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

    return convert_ui_to_api(json.loads(ui_path(name).read_text()), comfy.object_info())


def strip_meta(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


VIDEO_MAKERS = {"NFY_AVMux", "NFY_StreamToMP4", "NFY_Narrate"}
MEDIA = {"LoadImage": "image", "LoadAudio": "audio", "LoadVideo": "file"}  # the core loaders of input files and their file input


def with_speech_probe(prompt: dict) -> dict:
    """The prompt plus a core SaveAudio on the speech that goes into the video, so the test gets what the graph made."""
    maker_id, maker = next((k, v) for k, v in prompt.items() if v["class_type"] in VIDEO_MAKERS)
    source = maker["inputs"]["audio"] if "audio" in maker["inputs"] else [maker_id, 1]  # Narrate: its speech output
    return {**prompt, "nfy_probe": {"class_type": "SaveAudio",
                                    "inputs": {"audio": source, "filename_prefix": "nfy_test/speech"}}}


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float samples and the rate of a file's first audio stream."""
    with av.open(io.BytesIO(data)) as c:
        rate = c.streams.audio[0].rate
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        pieces = [p.to_ndarray().reshape(-1) for f in c.decode(audio=0) for p in resampler.resample(f)]
    return np.concatenate(pieces), rate


def check_speech_kept(speech: np.ndarray, track: np.ndarray) -> None:
    """The sound track holds the whole speech: after aligning (the aac encoder's delay), every tenth of the speech
    that is not silent correlates with the track (aac is lossy, so not sample-exact), and none of it is missing."""
    probe = slice(0, min(len(speech), 8192))
    lag = max(range(0, 4097), key=lambda d: float(np.dot(speech[probe], track[d:d + probe.stop])))
    track = track[lag:]
    assert len(track) >= len(speech) - 64, f"the track ends {len(speech) - len(track)} samples before the speech"
    loudness = float(np.sqrt(np.mean(speech ** 2)))
    for piece_s, piece_t in zip(np.array_split(speech, 10), np.array_split(track[:len(speech)], 10)):
        if np.sqrt(np.mean(piece_s ** 2)) > 0.1 * loudness:  # aac's noise dominates near-silent stretches
            assert np.corrcoef(piece_s, piece_t)[0, 1] > 0.7  # measured 0.89 at worst on a kept track; ~0 replaced


def check_mp4(data: bytes, speech: np.ndarray, speech_rate: int) -> None:
    with av.open(io.BytesIO(data)) as c:
        assert [s.codec_context.name for s in c.streams.video] == ["h264"]
        assert [s.codec_context.name for s in c.streams.audio] == ["aac"]
        frames = sum(1 for _ in c.decode(video=0))
    assert frames == math.ceil(round(len(speech) / speech_rate * FPS, 6))  # from the graph's speech, not the mux's
    track, rate = decode_audio(data)
    assert rate == speech_rate
    check_speech_kept(speech, track)


def test_the_speech_check_fails_on_a_cut_or_replaced_track():
    rng = np.random.default_rng(0)
    speech = (rng.standard_normal(24000) * 0.3).astype(np.float32)
    track = np.concatenate([np.zeros(1024), speech + 0.01 * rng.standard_normal(24000), np.zeros(500)])
    check_speech_kept(speech, track)  # delayed, slightly changed, padded: kept
    with pytest.raises(AssertionError):
        check_speech_kept(speech, track[:1024 + 18000])  # cut
    broken = track.copy()
    broken[1024 + 12000:1024 + 14400] = rng.standard_normal(2400) * 0.3  # a tenth of it replaced
    with pytest.raises(AssertionError):
        check_speech_kept(speech, broken)


def test_every_workflow_is_shipped_in_both_formats():
    assert sorted(api_workflows()) == sorted(NAMES) == sorted(TEMPLATES)
    assert sorted(p.name for p in WORKFLOWS.glob("*.json")) == sorted(f"{t}.json" for t in TEMPLATES.values())


def test_templates_list_titles_thumbnails_and_shipped_inputs_only(comfy, comfy_server):
    listed = comfy.get_json("/workflow_templates")
    assert sorted(listed[PACK_NAME]) == sorted(TEMPLATES.values())  # not the API prompts in workflows/api/
    for title in TEMPLATES.values():
        thumbnail = comfy._request(f"/api/workflow_templates/{PACK_NAME}/{urllib.parse.quote(title)}.jpg")
        assert thumbnail[:3] == b"\xff\xd8\xff" and len(thumbnail) > 5000, title  # a real JPEG
    shipped = {p.name for p in EXAMPLE_INPUTS.iterdir()}
    inputs = comfy_server.base / "input"
    for name, prompt in api_workflows().items():
        named = {v["inputs"][MEDIA[v["class_type"]]] for v in prompt.values() if v["class_type"] in MEDIA}
        assert named and named <= shipped, (name, named)
        assert all((inputs / f).read_bytes() == (EXAMPLE_INPUTS / f).read_bytes() for f in named)  # copied at start


def test_templates_carry_the_frontends_model_metadata_from_our_registry(comfy):
    from narrate_model.weights import REGISTRY

    folders = set(comfy.get_json("/models"))
    by_name = {e.dest.rpartition("/")[2]: e for e in REGISTRY}
    for name in NAMES:
        graph = json.loads(ui_path(name).read_text())
        values = {v for n in graph["nodes"] for v in n["widgets_values"] if isinstance(v, str)}
        wanted = {v for v in values if v in by_name and by_name[v].published
                  and by_name[v].dest.rpartition("/")[0] in MODEL_DIRECTORIES}
        assert {m["name"] for m in graph.get("models", [])} == wanted, name
        assert name == "speech_only" or "net.pth" in wanted
        for node in graph["nodes"]:
            for meta in node["properties"].get("models", []):
                entry = by_name[meta["name"]]
                assert meta["name"] in node["widgets_values"]  # the frontend matches metadata to widget values
                assert meta["url"] == entry.public_url() and meta.get("hash") == entry.sha256
                assert meta["directory"] in folders  # a model folder this server knows


@pytest.mark.parametrize("name", RUN_NAMES)
def test_ui_workflow_converts_to_its_api_twin_and_runs(comfy, small_models, name):
    prompt = converted(comfy, name)
    assert strip_meta(prompt) == strip_meta(api_workflows()[name])
    if name == "speech_only":
        entry = comfy.run(shrink(prompt, small_models), timeout=900)
        assert [item for out in entry["outputs"].values() for item in out.get("audio", [])]
        assert not [item for out in entry["outputs"].values() for item in out.get("images", [])]
        return
    entry = comfy.run(with_speech_probe(shrink(prompt, small_models)), timeout=900)
    mp4s = [item for out in entry["outputs"].values() for item in out.get("images", [])
            if item["filename"].endswith(".mp4")]
    assert len(mp4s) == 1
    speech, rate = decode_audio(comfy.view(entry["outputs"]["nfy_probe"]["audio"][0]))
    check_mp4(comfy.view(mp4s[0]), speech, rate)


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

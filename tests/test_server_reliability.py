"""Issue 12 on a real server, the way a user meets it over the HTTP API: Cancel at several points of the shipped
workflows stops within a second and leaves no half-written video; files are never overwritten; the one-box Narrate
shows the stage nodes' notes; bad inputs name the node and the input."""
from __future__ import annotations

import copy
import os
import time

import pytest

from comfy_server import messages_of
from conftest import MEDIA
from test_server_video import clip_wav
from test_workflows import shrink
from workflow_tools import api_workflows

CANCEL_BOUND_S = 1.0  # the README's promise: interrupt -> idle within a second, on a machine whose cores are free


def cancel_bound() -> float:
    """The promise, stretched by how busy the machine is: when other processes hold the cores (a shared test
    machine), the server gets a share of them and every step takes that much longer in wall time."""
    return CANCEL_BOUND_S * max(1.0, os.getloadavg()[0] / os.cpu_count())


def error_of(comfy, prompt) -> dict:
    return messages_of(comfy.wait(comfy.queue(prompt), expect="error"), "execution_error")[0]


def interrupt_after(comfy, prompt, node: str, events: int) -> float:
    """Queues the prompt, presses Cancel once `node` has sent `events` progress messages (0: once it starts),
    and returns the seconds from Cancel to the server's execution_interrupted message."""
    with comfy.listen() as ws:
        prompt_id = comfy.queue(prompt)
        deadline = time.time() + 600

        def reached():
            if events == 0:
                return any(m["node"] == node for m in ws.of("executing"))
            return len([m for m in ws.of("progress") if m["node"] == node]) >= events

        while not reached():
            assert not ws.of("execution_success") and not ws.of("execution_error"), \
                f"the prompt ended before node {node} sent {events} progress messages"
            assert time.time() < deadline
            time.sleep(0.01)
        asked = time.time()
        comfy.interrupt()
        while not ws.of("execution_interrupted"):
            assert time.time() - asked < 60, "no execution_interrupted message"
            time.sleep(0.01)
        index = next(i for i, m in enumerate(ws.messages) if m.get("type") == "execution_interrupted")
        stopped = ws.times[index] - asked
    comfy.wait(prompt_id, expect="error")
    return stopped


# (workflow, node, progress messages before Cancel): every long node of ours, early and late in the one box.
CANCEL_POINTS = [("narrate_simple", "7", 1), ("narrate_simple", "7", 10),
                 ("narrate", "13", 0), ("narrate", "15", 1), ("narrate", "16", 2)]


def test_cancel_at_several_points_of_the_shipped_workflows_stops_within_a_second(comfy_server, comfy, small_models):
    latencies = {}
    for name, node, events in CANCEL_POINTS:
        prompt = shrink(api_workflows()[name], small_models)
        for inputs in (n["inputs"] for n in prompt.values()):
            inputs.update({k: v for k, v in {"max_codes": 60, "steps": 2}.items() if k in inputs})
        latencies[f"{name} node {node} after {events}"] = interrupt_after(comfy, prompt, node, events)
        print(name, node, events, round(latencies[f"{name} node {node} after {events}"], 2), flush=True)
    bound = cancel_bound()
    print("interrupt -> idle:", {k: round(v, 2) for k, v in latencies.items()}, f"bound {bound:.2f} s")
    assert max(latencies.values()) <= bound, (latencies, bound)
    leftovers = [p.name for p in (comfy_server.base / "output").rglob("*.partial.mp4")]
    assert leftovers == [], "a cancelled video was left behind"


def test_a_prefix_ending_in_a_slash_never_overwrites(comfy_server, comfy):
    name = comfy.upload(MEDIA / "videos" / "kid_1.mp4")
    prompt = {"1": {"class_type": "LoadVideo", "inputs": {"file": name}},
              "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
              "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear",
                                                           "width": 64, "height": 64, "crop": "disabled"}},
              "4": {"class_type": "NFY_AVMux", "inputs": {"images": ["3", 0], "audio": ["2", 1], "fps": ["2", 2],
                                                         "filename_prefix": "myvids/", "crf": 30}}}
    output = comfy_server.base / "output"
    output.mkdir(exist_ok=True)  # a fresh server creates it only when something is saved
    (output / "myvids_00002_.mp4").write_bytes(b"someone's video")  # a name the counter would reach next
    names = []
    for crf in (30, 31, 32):  # a changed input, so the node runs again
        prompt["4"]["inputs"]["crf"] = crf
        names.append(comfy.run(prompt)["outputs"]["4"]["images"][0]["filename"])
    assert len(set(names)) == 3 and "myvids_00002_.mp4" not in names, names
    assert (output / "myvids_00002_.mp4").read_bytes() == b"someone's video"


def test_the_one_box_narrate_shows_the_stage_notes(comfy, small_models, tmp_path):
    prompt = shrink(api_workflows()["narrate_simple"], small_models)
    prompt["2"]["inputs"]["audio"] = comfy.upload(clip_wav(tmp_path, 1.5))  # a short voice: a warning
    prompt["8"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 2}}
    prompt["7"]["inputs"].update(image=["8", 0], text="Hi there!", max_codes=20)
    entry = comfy.run(prompt, timeout=900)
    notes = entry["outputs"]["7"]["text"]
    for expected in ("voice reference is only 1.5 s long", "face(s) found", "a batch of 2 images", "short text",
                     "sentence chunk(s)"):
        assert any(expected in line for line in notes), (expected, notes)


def test_missing_files_name_their_own_input(comfy, small_models):
    base = shrink(api_workflows()["narrate"], small_models)
    cases = [("10", "landmarker", "missing.task", "Face Encode"), ("6", "model", "no-such-wav2vec", "Load wav2vec2")]
    for node, input_name, value, node_name in cases:
        prompt = copy.deepcopy(base)
        prompt[node]["inputs"][input_name] = value
        message = error_of(comfy, prompt)["exception_message"]
        assert f"{node_name}: input '{input_name}'" in message, message


def test_bad_numbers_over_the_api_are_clear_errors_naming_the_input(comfy, small_models):
    prompt = shrink(api_workflows()["animate_from_audio"], small_models)
    prompt["3"]["inputs"]["size"] = 100  # the widget steps by 64; the API takes any number
    message = error_of(comfy, prompt)["exception_message"]
    assert "Face Encode: input 'size'" in message and "multiple of 64" in message, message
    prompt = shrink(api_workflows()["animate_from_audio"], small_models)
    prompt["7"]["inputs"]["dtype"] = "fp8"  # 0.3.75 does not check a V3 combo's value at queue time
    error = error_of(comfy, prompt)
    assert error["exception_type"] != "KeyError", error  # what it was before the fix
    assert "Load Hallo: input 'dtype': 'fp8' is not one of auto, fp32, fp16, bf16" in error["exception_message"]


def test_load_entangler_shows_a_licence_line(comfy):
    # STE: no shipped workflow uses it, so the node runs here rather than coming from the server's cache (a cached
    # node sends no UI output)
    prompt = {"1": {"class_type": "NFY_LoadEntangler", "inputs": {"entangler": "untrained identity (STE)"}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}  # an output, so the graph runs
    entry = comfy.run(prompt)
    assert "licence" in entry["outputs"]["1"]["text"][0]


@pytest.mark.parametrize("text", ["\U0001F600\U0001F389", "?!... !!!"])
def test_nothing_speakable_names_text_bpe_and_its_input(comfy, small_models, text):
    prompt = shrink(api_workflows()["speech_only"], small_models)
    prompt["4"]["inputs"]["text"] = text
    error = error_of(comfy, prompt)
    assert error["node_type"] == "NFY_TextBPE"
    assert "Text BPE: input 'text'" in error["exception_message"] and "nothing speakable" in error["exception_message"]

"""The pack inside a real ComfyUI server: it imports cleanly and offline, lists its nodes, runs graphs queued over
the HTTP API, reports progress, and stops when the user presses Cancel."""
from __future__ import annotations

import io
import time

import av

from comfy_server import PACK_NAME, messages_of
from conftest import MEDIA

PACK_NODES = {"NFY_AVMux", "NFY_LoadXTTS", "NFY_TextBPE", "NFY_VoiceProfileEncode", "NFY_SpectrogramSynthesizer",
              "NFY_Vocoder", "NFY_DownloadWeights", "NFY_LoadHallo", "NFY_LoadWav2Vec", "NFY_FaceEncode",
              "NFY_SpeechFeatures", "NFY_VideoDiffusionSampler", "NFY_BatchedVAEDecode", "NFY_LoadEntangler",
              "NFY_Entangle", "NFY_StreamToMP4", "NFY_Narrate", "NFY_SpeechMetrics", "NFY_VideoMetrics",
              "NFY_LipSync", "NFY_Personalize", "NFY_Speaker", "NFY_Dialogue"}


def test_server_imports_the_pack_without_failure_or_network(comfy_server, comfy):
    comfy.object_info()  # the import log is complete once the server answers
    log = comfy_server.log()
    assert "Import times for custom nodes" in log
    assert PACK_NAME in log.split("Import times for custom nodes")[1]
    assert "IMPORT FAILED" not in log, log
    assert comfy_server.network_attempts() == [], "the server or the pack tried to reach the network"
    hf_home = comfy_server.base / "hf_home"
    assert not hf_home.exists() or not any(hf_home.rglob("*")), "something was downloaded into the HF cache"


def test_every_pack_node_is_listed_with_category_and_tooltips(comfy):
    info = comfy.object_info()
    ours = {name: node for name, node in info.items() if PACK_NAME in node.get("python_module", "")}
    assert set(ours) == PACK_NODES
    for name, node in ours.items():
        assert node["category"].startswith("Narrate/"), name
        assert node["description"], name
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"


def _remux_prompt(video_name: str, prefix: str, repeat: int = 1) -> dict:
    """LoadVideo -> GetVideoComponents -> (RepeatImageBatch) -> NFY_AVMux -> core SaveVideo."""
    frames = ["2", 0]
    prompt = {
        "1": {"class_type": "LoadVideo", "inputs": {"file": video_name}},
        "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
        "4": {"class_type": "NFY_AVMux", "inputs": {"images": frames, "audio": ["2", 1], "fps": ["2", 2],
                                                   "filename_prefix": prefix, "crf": 19}},
    }
    if repeat > 1:
        prompt["3"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": repeat}}
        prompt["4"]["inputs"]["images"] = ["3", 0]
    return prompt


def _streams(data: bytes) -> dict:
    with av.open(io.BytesIO(data)) as container:
        video, audio = container.streams.video, container.streams.audio
        return {
            "video": [s.codec_context.name for s in video], "audio": [s.codec_context.name for s in audio],
            "frames": sum(1 for _ in container.decode(video=0)),
            "video_s": float(video[0].duration * video[0].time_base),
            "audio_s": float(audio[0].duration * audio[0].time_base) if audio else 0.0,
            "fps": video[0].average_rate,
        }


def test_graph_with_a_pack_node_runs_over_the_api_and_its_video_comes_back(comfy):
    name = comfy.upload(MEDIA / "videos" / "kid_1.mp4")
    prompt = _remux_prompt(name, "nfy_test/remux")
    prompt["5"] = {"class_type": "SaveVideo", "inputs": {"video": ["4", 0], "filename_prefix": "nfy_test/core",
                                                         "format": "auto", "codec": "auto"}}
    with comfy.listen() as ws:
        entry = comfy.run(prompt)
    saved = entry["outputs"]["4"]["images"][0]
    assert saved["filename"].endswith(".mp4") and entry["outputs"]["4"]["animated"] == [True]
    ours = _streams(comfy.view(saved))
    assert ours["video"] == ["h264"] and ours["audio"] == ["aac"]
    assert ours["frames"] == 80 and ours["fps"] == 25  # kid_1.mp4: 80 frames at 25 fps
    assert abs(ours["video_s"] - ours["audio_s"]) <= 1 / 25
    core = _streams(comfy.view(entry["outputs"]["5"]["images"][0]))  # our VIDEO output into core SaveVideo
    assert core["frames"] == 80 and core["video"] == ["h264"]
    progress = [m for m in ws.of("progress") if m["node"] == "4"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 80


def test_interrupt_stops_a_long_pack_node_within_a_second_and_the_server_keeps_serving(comfy_server, comfy):
    name = comfy.upload(MEDIA / "videos" / "man.mp4")
    with comfy.listen() as ws:
        prompt = _remux_prompt(name, "nfy_test/long", repeat=3)  # 720 frames: several seconds of encoding
        prompt["5"] = {"class_type": "ImageScale", "inputs": {"image": ["3", 0], "upscale_method": "bilinear",
                                                              "width": 256, "height": 256, "crop": "disabled"}}
        prompt["4"]["inputs"]["images"] = ["5", 0]  # smaller frames: Cancel is checked after each one
        prompt_id = comfy.queue(prompt)
        deadline = time.time() + 120
        while not [m for m in ws.of("progress") if m["node"] == "4" and m["value"] >= 32]:
            assert time.time() < deadline, "the mux node never reported progress"
            time.sleep(0.05)
        asked = time.time()
        comfy.interrupt()
        while not ws.of("execution_interrupted"):
            assert time.time() - asked < 5, "no execution_interrupted message"
            time.sleep(0.02)
        stopped = time.time() - asked
    entry = comfy.wait(prompt_id, expect="error")
    assert messages_of(entry, "execution_interrupted")
    assert stopped < 1.0, f"the node took {stopped:.2f} s to stop"
    last = max(m["value"] for m in ws.of("progress") if m["node"] == "4")
    assert last < 720, "the node ran to the end instead of stopping"
    # No half-written video is left (it would hold the whole soundtrack over a few frames), and the node says so.
    assert list((comfy_server.base / "output" / "nfy_test").glob("long_*")) == []
    assert any(node == "4" and "unfinished video long_" in text and "was removed" in text for node, text in ws.texts), \
        ws.texts
    # The server keeps serving: the next graph runs to completion.
    short = comfy.upload(MEDIA / "videos" / "kid_1.mp4")
    comfy.run(_remux_prompt(short, "nfy_test/after_interrupt"))


def test_the_network_guard_really_blocks_and_records(tmp_path):
    """The control for the offline checks above: the same guard refuses a real outbound connection."""
    import os
    import subprocess
    import sys

    from comfy_server import NETGUARD

    log = tmp_path / "attempts.log"
    env = dict(os.environ, PYTHONPATH=str(NETGUARD), NFY_NETGUARD_LOG=str(log))
    code = "import urllib.request\ntry:\n urllib.request.urlopen('http://example.com', timeout=5)\nexcept OSError as e:\n print('blocked', e)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout
    assert "blocked" in out and "example.com" in log.read_text()

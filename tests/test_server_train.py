"""Personalize on the real server with small checkpoints: Load Video -> Personalize -> Narrate runs, the trained
entangler changes the narration's audio and video against the identity one, and Cancel at a random moment of the
training stops within a second (the checks inside a step; their control, a step without them, is in
test_train_nfy.py) and leaves complete files only."""
from __future__ import annotations

import io
import json
import random
import time

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from comfy_server import messages_of
from conftest import FIXTURES, MEDIA
from small_checkpoints import write_hallo, write_landmarker, write_sd_vae, write_wav2vec, write_xtts


@pytest.fixture(scope="module")
def models(comfy_server):
    base = comfy_server.base / "models"
    xtts = write_xtts(base, "small-train")
    # training reads XTTS-v2's dvae.pth from the same folder
    torch.save(load_file(str(FIXTURES / "xtts" / "small_dvae.safetensors")),
               base / "narrate" / "xtts" / xtts / "dvae.pth")
    return {"xtts": xtts, "hallo": write_hallo(base), "wav2vec": write_wav2vec(base),
            "landmarker": write_landmarker(base), "vae": write_sd_vae(base), "base": base}


def _prompt(m: dict, video: str, steps: int, name: str) -> dict:
    narrate = {"xtts": ["4", 0], "hallo": ["5", 0], "wav2vec": ["6", 0], "vae": ["7", 0], "image": ["9", 0],
               "voice": ["2", 1], "text": "Hello there.", "language": "en", "fps": 25.0, "size": 64, "steps": 2,
               "cfg": 3.5, "scheduler": "ddim", "temperature": 0.75, "speed": 1.0, "seed": 3, "max_codes": 20,
               "landmarker": m["landmarker"]}
    return {
        "1": {"class_type": "LoadVideo", "inputs": {"file": video}},
        "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
        # 4 s of frames at 128x128: the clip is 4 s (2 s target + 2 s voice), whatever the soundtrack's length
        "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear", "width": 128,
                                                     "height": 128, "crop": "center"}},
        "10": {"class_type": "ImageFromBatch", "inputs": {"image": ["3", 0], "batch_index": 0, "length": 100}},
        "9": {"class_type": "ImageFromBatch", "inputs": {"image": ["3", 0], "batch_index": 0, "length": 1}},
        "4": {"class_type": "NFY_LoadXTTS", "inputs": {"checkpoint": m["xtts"]}},
        "5": {"class_type": "NFY_LoadHallo", "inputs": {"checkpoint": m["hallo"], "motion_module": "none",
                                                       "dtype": "auto"}},
        "6": {"class_type": "NFY_LoadWav2Vec", "inputs": {"model": m["wav2vec"]}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": m["vae"]}},
        "8": {"class_type": "NFY_Personalize", "inputs": {
            "images": ["10", 0], "audio": ["2", 1], "fps": ["2", 2], "text": "IN THE DISTRICT COURT LITIGATION",
            "xtts": ["4", 0], "hallo": ["5", 0], "wav2vec": ["6", 0], "vae": ["7", 0], "language": "en",
            "steps": steps, "lr": 1e-3, "seed": 0, "name": name, "size": 64, "voice_seconds": 2.0,
            "landmarker": m["landmarker"]}},
        "11": {"class_type": "NFY_Narrate", "inputs": {**narrate, "entangler": ["8", 0],
                                                       "filename_prefix": "nfy_test/personal"}},
        "12": {"class_type": "NFY_LoadEntangler", "inputs": {"entangler": "untrained identity (ETE)"}},
        "13": {"class_type": "NFY_Narrate", "inputs": {**narrate, "entangler": ["12", 0],
                                                       "filename_prefix": "nfy_test/identity"}},
    }


def _media(comfy, saved: dict):
    with av.open(io.BytesIO(comfy.view(saved))) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(io.BytesIO(comfy.view(saved))) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return frames, audio


def _differ(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape != b.shape or not np.array_equal(a, b)


def test_personalize_then_narrate_changes_audio_and_video(comfy, models):
    video = comfy.upload(MEDIA / "videos" / "man.mp4")
    entry = comfy.run(_prompt(models, video, steps=3, name="server_person"))
    written = models["base"] / "narrate" / "entangle" / "server_person.safetensors"
    card = json.loads(written.with_suffix(".card.json").read_text())
    assert card["steps"] == 3 and not card["cancelled"]
    personal = _media(comfy, entry["outputs"]["11"]["images"][0])
    identity = _media(comfy, entry["outputs"]["13"]["images"][0])
    assert _differ(personal[1], identity[1]), "the trained entangler did not change the speech"
    assert _differ(personal[0], identity[0]), "the trained entangler did not change the video"
    assert not _differ(identity[0], identity[0].copy())  # the comparison can fail: equal media are not "changed"


def test_cancel_at_a_random_moment_of_personalize_stops_within_a_second(comfy, models, comfy_server):
    from narrate_model.entangle import load_entangler
    from test_server_reliability import cancel_bound

    video = comfy.upload(MEDIA / "videos" / "man.mp4")
    prompt = {k: v for k, v in _prompt(models, video, steps=500, name="cancelled").items()
              if k not in ("11", "12", "13")}
    delay = random.uniform(0.0, 3.0)  # a step of these models takes 2-3 s here: anywhere in forward or backward
    with comfy.listen() as ws:
        prompt_id = comfy.queue(prompt)
        deadline = time.time() + 300
        while not [m for m in ws.of("progress") if m["node"] == "8"]:  # the bar at 0: training has started
            assert not ws.of("execution_error"), ws.of("execution_error")
            assert time.time() < deadline, "Personalize never started training"
            time.sleep(0.01)
        time.sleep(delay)
        asked = time.time()
        comfy.interrupt()
        while not ws.of("execution_interrupted"):
            assert time.time() - asked < 120, "no execution_interrupted message"
            time.sleep(0.01)
        index = next(i for i, m in enumerate(ws.messages) if m.get("type") == "execution_interrupted")
        stopped = ws.times[index] - asked
    entry = comfy.wait(prompt_id, expect="error")
    assert messages_of(entry, "execution_interrupted")
    entangle = models["base"] / "narrate" / "entangle"
    card = json.loads((entangle / "cancelled.card.json").read_text())
    bound = cancel_bound()
    print(f"Personalize: Cancel {delay:.2f} s into training, at step {card['steps']}: stopped {stopped:.2f} s later "
          f"(bound {bound:.2f} s)")
    assert stopped <= bound
    assert card["cancelled"] and card["steps"] < 500
    load_entangler(str(entangle / "cancelled.safetensors"))  # complete: it loads
    runs = comfy_server.base / "output" / "narrate" / "personalize"
    leftovers = [p for folder in (entangle, runs) for p in folder.rglob("*") if "tmp" in p.name]
    assert leftovers == [], leftovers

"""Shared test set-up: paths to the project's shared fixtures and media, and the real ComfyUI server fixture."""
from __future__ import annotations

import contextlib
import gc
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
MEDIA = SHARED / "media"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers: comfy_server, ...


@contextlib.contextmanager
def heap_frozen():
    """For the CPU-gap measurements of Cancel: the objects this pytest process has piled up over hundreds of tests
    are put out of the garbage collector's reach while a measurement runs, so a full collection of them is not
    charged to the code under test (measured: a 0.36 s gap in the whole suite; with 3 M live objects 0.82 s inside a
    training step, 0.08 s with them frozen). What that code allocates is still collected. The wall-clock Cancel
    bound on a real server is measured without this."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def media_dir() -> Path:
    return MEDIA


@pytest.fixture(scope="session")
def samples() -> dict:
    return json.loads((MEDIA / "samples.json").read_text())


def recorded_path(name: str) -> str | None:
    """A path the installer recorded in .venv/nfy-test.env (COMFYUI_DIR, NFY_FACE_LANDMARKER); the environment wins."""
    import os
    if os.environ.get(name):
        return os.environ[name]
    env_file = REPO / ".venv" / "nfy-test.env"
    if env_file.exists():
        for line in env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            if key == name:
                return value
    return None


@pytest.fixture(scope="session")
def face_landmarker_task() -> Path:
    path = recorded_path("NFY_FACE_LANDMARKER")
    assert path and Path(path).exists(), "run tests/install.sh: it fetches MediaPipe's face_landmarker.task"
    return Path(path)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """The real ComfyUI server with this pack installed, for the whole test session."""
    from comfy_server import ComfyServer

    comfyui_dir = recorded_path("COMFYUI_DIR")
    assert comfyui_dir and (Path(comfyui_dir) / "main.py").exists(), \
        "no ComfyUI found: run tests/install.sh (or set COMFYUI_DIR to a ComfyUI checkout)"
    server = ComfyServer(Path(comfyui_dir), REPO, tmp_path_factory.mktemp("comfy_base")).start()
    yield server
    server.stop()


@pytest.fixture()
def comfy(comfy_server):
    """A client of the real server; fails the test if the server died during it."""
    from comfy_server import ComfyClient

    client = ComfyClient(comfy_server.url)
    yield client
    assert comfy_server.alive(), f"the server died:\n{comfy_server.log()[-4000:]}"


@pytest.fixture(scope="session")
def small_models(comfy_server, tmp_path_factory) -> dict:
    """Small checkpoints written into the server's models folder and media uploaded to it, keyed by the names the
    shipped workflows use for the real ones."""
    from comfy_server import ComfyClient
    from small_checkpoints import write_hallo, write_landmarker, write_sd_vae, write_wav2vec, write_xtts
    from test_server_video import clip_wav

    comfy = ComfyClient(comfy_server.url)
    models = comfy_server.base / "models"
    tmp = tmp_path_factory.mktemp("media")
    return {"XTTS-v2": write_xtts(models), "net.pth": write_hallo(models), "wav2vec2-base-960h": write_wav2vec(models),
            "sd-vae-ft-mse.safetensors": write_sd_vae(models), "landmarker": write_landmarker(models),
            "nfy_example_portrait.jpg": comfy.upload(MEDIA / "images" / "man.jpg"),
            "nfy_example_voice.flac": comfy.upload(clip_wav(tmp, 4.0)),
            "nfy_example_speech.flac": comfy.upload(clip_wav(tmp, 0.9))}

"""Shared test set-up: paths to the project's shared fixtures and media, and the real ComfyUI server fixture."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
MEDIA = SHARED / "media"


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

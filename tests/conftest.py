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

"""The pack as the Comfy Registry and a user's shared venv see it: `comfy node validate`, what a published archive
holds (LICENSE, icon, no tests), an honest requires-comfyui, `pip check` on a fresh venv of ComfyUI's requirements
plus ours, the mediapipe range tested at both ends, and no OpenCV / MediaPipe loaded when ComfyUI starts the pack.

The second environments (fresh pip-check venv, oldest-mediapipe venv) are built by tests/install.sh; missing, these
tests fail when it is missing.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO, recorded_path

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMFY = Path(sys.executable).with_name("comfy")  # comfy-cli, from tests/requirements-test.txt


def mediapipe_range() -> tuple[str, str]:
    line = next(l for l in (REPO / "requirements.txt").read_text().splitlines() if l.startswith("mediapipe"))
    low, high = re.fullmatch(r"mediapipe>=([\d.]+),<=([\d.]+)", line).groups()
    return low, high


def installed_environment(name: str) -> str:
    """The interpreter of a second environment tests/install.sh recorded; missing fails the run."""
    path = recorded_path(name)
    if path and Path(path).exists():
        return path
    message = f"{name} not found: run tests/install.sh"
    pytest.fail(message)


def validate(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(COMFY), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=folder,
                          capture_output=True, text=True, timeout=300)


def test_comfy_node_validate_passes_and_can_fail(tmp_path):
    result = validate(REPO)
    assert result.returncode == 0 and "validation checks passed" in result.stdout + result.stderr, result.stdout + result.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pyproject.toml").write_text(re.sub(r'(?m)^version = ".*"$', 'version = ""',
                                                  (REPO / "pyproject.toml").read_text()))
    assert validate(broken).returncode != 0  # the same check on a pyproject without a version


def test_registry_metadata_and_published_files():
    from comfy_cli.file_utils import _load_comfyignore_spec

    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()
    assert PYPROJECT["project"]["license"] == {"file": "LICENSE"}
    assert PYPROJECT["project"]["urls"]["Issues"].endswith("/issues")
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    assert icon.endswith("/main/js/icon.svg") and (REPO / "js" / "icon.svg").read_text().lstrip().startswith("<svg")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    cwd = os.getcwd()
    os.chdir(REPO)  # comfy-cli reads .comfyignore from the working directory, as `comfy node pack` does
    try:
        spec = _load_comfyignore_spec()
    finally:
        os.chdir(cwd)
    published = [f for f in tracked if not spec.match_file(f)]
    assert not [f for f in published if f.split("/")[0] in ("tests", "benchmarks", ".ci")]
    for needed in ("LICENSE", "js/icon.svg", "js/narrate_aids.js", "requirements.txt", "__init__.py"):
        assert needed in published
    assert [f for f in published if f.startswith("workflows/inputs/")]


def test_requires_comfyui_claims_only_the_tested_version():
    tested = re.search(r'__version__ = "([\d.]+)"',
                       (Path(recorded_path("COMFYUI_DIR")) / "comfyui_version.py").read_text()).group(1)
    assert PYPROJECT["tool"]["comfy"]["requires-comfyui"] == f">={tested}"


def test_mediapipe_range_top_is_the_main_venvs_and_the_pack_agrees_with_pyproject():
    low, high = mediapipe_range()
    assert importlib.metadata.version("mediapipe") == high
    assert f"mediapipe>={low},<={high}" in PYPROJECT["project"]["dependencies"]


def test_face_encoding_at_the_oldest_supported_mediapipe():
    python = installed_environment("NFY_OLDEST_MEDIAPIPE_PYTHON")
    low, _ = mediapipe_range()
    probe = subprocess.run([python, "-c", "import mediapipe, sys; print(mediapipe.__version__, mediapipe.__file__)"],
                           capture_output=True, text=True, timeout=120)
    version, where = probe.stdout.split()
    assert version == low and not where.startswith(str(Path(sys.prefix)))  # its own, not the main venv's
    # MediaPipe's landmarks on real portraits into Hallo's masks, bit for bit against Hallo's outputs.
    run = subprocess.run([python, "-m", "pytest", "tests/test_hallo_face.py", "-q", "-p", "no:cacheprovider",
                          "-k", "end_to_end or two_faces or no_face"], cwd=REPO, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0 and re.search(r"\b3 passed", run.stdout), run.stdout[-3000:] + run.stderr[-2000:]


def test_a_fresh_venv_of_comfyuis_requirements_and_ours_passes_pip_check():
    python = installed_environment("NFY_PIP_CHECK_PYTHON")
    listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            timeout=120).stdout.lower().replace("_", "-")
    for name in ("mediapipe==", "comfyui-frontend-package==", "torch==", "safetensors=="):
        assert name in listed, name  # it is the venv of both requirement lists
    assert "pytest==" not in listed and "comfy-cli==" not in listed  # and nothing of the test tools
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr


def test_starting_the_pack_loads_neither_opencv_nor_mediapipe(tmp_path):
    """ComfyUI imports the pack's nodes at start; cv2 and mediapipe load only when a face is encoded."""
    comfyui = recorded_path("COMFYUI_DIR")
    link = tmp_path / "comfyui_narrating_for_you"
    link.symlink_to(REPO)
    start = (f"import sys; sys.path[:0] = [{comfyui!r}, {str(tmp_path)!r}]; sys.argv = ['main.py', '--cpu']\n"
             "import comfy.options; comfy.options.enable_args_parsing()  # as main.py does, so --cpu counts\n"
             "import importlib; importlib.import_module('comfyui_narrating_for_you.nodes')\n")

    def loaded(code: str) -> str:
        code += "\nprint(sorted(m for m in ('cv2', 'mediapipe') if m in sys.modules))"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                                cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout.strip().splitlines()[-1]

    assert loaded(start) == "[]"
    assert loaded("import sys, cv2") == "['cv2']"  # the probe does see OpenCV when something imports it

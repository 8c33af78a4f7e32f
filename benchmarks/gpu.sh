#!/usr/bin/env bash
# The GPU benchmark of issue 14 in one command, on a bare machine that reaches no package registry:
#   bash benchmarks/gpu.sh [--device cuda] [--out FILE] [gpu.py options]    (under 8 minutes on one H200)
#   bash benchmarks/gpu.sh --device cpu --tiny --out /tmp/gpu.json         (every section at toy sizes: CI)
# Python packages the machine lacks (diffusers) travel as wheels in .whl/ (made here by benchmarks/gpu_wheels.sh)
# and are installed into /tmp/site without any index. Writes one JSON (gpu.py's docstring says what is in it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('diffusers') is None)"; then
  echo "gpu.sh: diffusers is not importable; run 'bash benchmarks/gpu_wheels.sh' where pip can download, and" \
       "bring the .whl/ folder along" >&2
  exit 2
fi
# a hard stop under 8 minutes: gpu.py writes its JSON after every section, so what finished is kept
exec timeout --signal=INT "${GPU_SH_TIMEOUT:-470}" "$PYTHON" benchmarks/gpu.py "$@"

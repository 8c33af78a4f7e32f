#!/usr/bin/env bash
# Downloads, here, the wheels benchmarks/gpu.sh installs on a GPU machine without a package registry: only what
# that machine lacks (its image has torch, transformers, accelerate, safetensors, numpy, pillow, huggingface-hub,
# regex, requests, filelock and importlib.metadata in Python 3.12). diffusers is pure Python (6.1 MB for 0.42.1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DIFFUSERS_VERSION="${DIFFUSERS_VERSION:-0.42.1}"  # the version the pack is tested with
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "diffusers==$DIFFUSERS_VERSION"
du -sh .whl

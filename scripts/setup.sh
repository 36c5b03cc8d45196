#!/usr/bin/env bash
# Set up napari-sagegan on a fresh Debian/Ubuntu machine with Python 3.10+:
# Debian packages for the headless Qt tests and the optional scale-bar OCR (when run as root), a virtual environment in
# .venv, the CPU build of PyTorch, and the package with its test and benchmark extras.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0
  libxcb-xkb1 libxkbcommon-x11-0 libxcb-randr0 libxcb-shape0 libxcb-cursor0
  libxcb-xinerama0 libgl1 libegl1 libfontconfig1 libdbus-1-3 libglib2.0-0
  tesseract-ocr tesseract-ocr-eng)  # the last two: optional OCR of scale-bar labels
missing=()
if command -v dpkg >/dev/null 2>&1; then
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: warning: missing Debian packages (GUI tests need them): ${missing[*]}" >&2
    echo "setup:          run as root or: sudo apt-get install ${missing[*]}" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU wheel of torch first: a bare "torch" requirement would pull a multi-GB CUDA build.
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing PyTorch (CPU build)"
  python -m pip install -q "torch==2.13.0" || python -m pip install -q torch \
    --index-url https://download.pytorch.org/whl/cpu
fi
echo "setup: installing napari-sagegan and its test/benchmark extras"
python -m pip install -q -e ".[testing,bench]"
echo "setup: done ($(python -c 'import napari_sagegan, torch; print("napari-sagegan", napari_sagegan.__version__, "torch", torch.__version__)'))"

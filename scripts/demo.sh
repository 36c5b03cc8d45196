#!/usr/bin/env bash
# Set up (if needed), then run the main job on generated sample data with the bundled model:
# generate EM-like sample images with exact labels, segment them with `sagegan segment`,
# and score the result with `sagegan evaluate`. Outputs go to demo_output/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python scripts/demo.py "$@"

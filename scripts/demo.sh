#!/usr/bin/env bash
# Set up (if needed), then run the main job on generated sample data with the bundled model:
# generate calibrated EM-like sample images with exact labels, segment them with
# `sagegan segment --csv` (label TIFFs, particle CSVs in nm, summaries), draw overlay PNGs and a
# size histogram, score against the exact labels with `sagegan evaluate`, and write
# demo_output/report.md. Options go to scripts/demo.py (python scripts/demo.py --help), e.g.
#   bash scripts/demo.sh --train-minutes 3    # fine-tune on generated pairs first
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python scripts/demo.py "$@"

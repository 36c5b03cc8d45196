#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. GUI tests run under Xvfb (pytest-xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks scripts
set +e
python -m pytest -ra "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "test: pytest collected no tests: the set-up is broken" >&2
  exit 1
fi
exit "$rc"

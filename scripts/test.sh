#!/usr/bin/env bash
# Set up .venv and run the test suite. Extra arguments go to pytest (e.g. -k context -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# Tiny models: one intra-op thread per process beats two threads fighting over two cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest "$@"
